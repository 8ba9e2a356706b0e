//! `gristmill scaffold`: a template rendered once per spec row into one request whose answer is
//! a file tree, checked (no absolute paths, no `..`, no symbolic links on the way), verified in
//! a staging copy, and written under `OUT/<name>/`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use gristmill_workflows::answer::{self, parse_files_answer, FileOut};
use gristmill_workflows::paths::{check_tree, write_tree, Written};
use gristmill_workflows::report::{tail, Attempt, Item, Report, Status, TreeFile};
use gristmill_workflows::{specs, template};
use serde_json::{json, Value};

use super::verify::{self, shell_quote, TAIL_BYTES};
use super::JobArgs;

/// Generates one file tree per spec row from a template.
#[derive(Debug, Args)]
#[command(
    after_help = "Each answer must be JSON {\"files\": [{\"path\": …, \"content\": …}]} \
    (a JSON Schema enforces it); answers from elsewhere may also use `File: path` lines each \
    followed by a fenced block. A path that is absolute, has `..` or goes through a symbolic \
    link fails the attempt, and nothing of that tree is written. The cache and the report live \
    in OUT/.gristmill/ unless --cache and --report say otherwise."
)]
pub struct ScaffoldArgs {
    /// The template: text where `{field}` is filled from each spec's fields (`{name}` too;
    /// `{{field}}` is a literal `{field}`).
    #[arg(long, value_name = "FILE")]
    pub template: PathBuf,

    /// The specs: JSONL (one object per line) or CSV with a header (by the `.csv` extension).
    /// Every row needs a `name`, the folder its tree goes to.
    #[arg(long, value_name = "FILE")]
    pub specs: PathBuf,

    /// Where the trees go: OUT/<name>/ per spec.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,

    /// Overwrite files that exist already (otherwise they are kept and the report says so).
    #[arg(long)]
    pub force: bool,

    #[command(flatten)]
    pub job: JobArgs,
}

const SYSTEM: &str = "You are an expert software engineer who creates new projects from a \
description. Answer with JSON {\"files\": [{\"path\": \"…\", \"content\": \"…\"}]} listing every \
file of the project with its complete content. Paths are relative to the project's root, with `/` \
between directories: no absolute paths and no `..`.";

struct TreeJob {
    name: String,
    messages: Vec<Value>,
    item: Item,
    done: bool,
    /// The last answer's files that passed the path checks.
    files: Option<Vec<FileOut>>,
}

impl TreeJob {
    fn feedback(&mut self, answer: &str, problem: String) {
        self.messages
            .push(json!({"role": "assistant", "content": answer}));
        self.messages.push(json!({"role": "user", "content": format!(
            "{problem}\n\nAnswer again with the whole project as JSON {{\"files\": [{{\"path\": \"…\", \"content\": \"…\"}}]}}.")}));
    }
}

pub fn scaffold(args: ScaffoldArgs) -> Result<()> {
    let job = &args.job;
    job.check()?;
    let tmpl = std::fs::read_to_string(&args.template)
        .with_context(|| format!("cannot read the template {}", args.template.display()))?;
    if tmpl.trim().is_empty() {
        bail!("the template {} is empty", args.template.display());
    }
    let spec_text = std::fs::read_to_string(&args.specs)
        .with_context(|| format!("cannot read the specs {}", args.specs.display()))?;
    let csv = args
        .specs
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let rows = specs::parse(&spec_text, csv)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.specs.display()))?;
    if rows.is_empty() {
        bail!("{} has no spec rows", args.specs.display());
    }
    let own = args.out.join(".gristmill");
    let cache_dir = job.cache.clone().unwrap_or_else(|| own.join("cache"));
    let report_path = job
        .report
        .clone()
        .unwrap_or_else(|| own.join("scaffold-report.json"));
    let mut trees = Vec::with_capacity(rows.len());
    for row in rows {
        let spec = match row.spec {
            Ok(s) => s,
            Err(e) => {
                let mut item = Item::new(format!("{} line {}", args.specs.display(), row.line));
                item.error = Some(format!("line {}: {e}", row.line));
                trees.push(TreeJob {
                    name: String::new(),
                    messages: Vec::new(),
                    item,
                    done: true,
                    files: None,
                });
                continue;
            }
        };
        let mut item = Item::new(spec.name.clone());
        let rendered = template::render(&tmpl, |n| spec.fields.get(n).cloned());
        let (messages, done) = match rendered {
            Ok(user) => (
                vec![
                    json!({"role": "system", "content": SYSTEM}),
                    json!({"role": "user", "content": user}),
                ],
                false,
            ),
            Err(e) => {
                item.error = Some(format!("line {}: {e}", row.line));
                (Vec::new(), true)
            }
        };
        trees.push(TreeJob {
            name: spec.name,
            messages,
            item,
            done,
            files: None,
        });
    }

    let mut runner = job.runner(cache_dir.clone())?;
    let constraint = json!({"response_format": {"type": "json_schema", "json_schema": {
        "name": "file_tree", "strict": true, "schema": answer::files_schema()}}});
    let staging = own.join("staging");
    let timeout = job.verify_timeout();
    for attempt in 1..=job.max_attempts {
        let pending: Vec<usize> = (0..trees.len()).filter(|&i| !trees[i].done).collect();
        if pending.is_empty() {
            break;
        }
        let seed = super::seed_of(job, attempt);
        let bodies = pending
            .iter()
            .map(|&i| {
                super::body(
                    &trees[i].messages,
                    job,
                    seed,
                    job.max_tokens,
                    constraint.clone(),
                )
            })
            .collect();
        let answers = runner.attempt(attempt, job.max_attempts, seed, bodies)?;
        // Trees whose answer parsed and whose paths passed: (tree, attempt, answer, files).
        let mut ready: Vec<(usize, Attempt, String, Vec<FileOut>)> = Vec::new();
        for (&i, (mut rec, text)) in pending.iter().zip(answers) {
            let t = &mut trees[i];
            let text = match text {
                Err(failure) => {
                    t.item.error = Some(failure);
                    t.item.push(rec);
                    continue;
                }
                Ok(text) => text,
            };
            let root = args.out.join(&t.name);
            let files = parse_files_answer(&text)
                .map_err(|e| {
                    super::migrate::cut_off(e.to_string(), &rec.finish_reason, job.max_tokens)
                })
                .and_then(|files| {
                    let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
                    let checked =
                        check_tree(&root, &paths).map_err(|e| format!("path refused: {e}"))?;
                    Ok(files
                        .into_iter()
                        .zip(checked)
                        .map(|(f, path)| FileOut {
                            path,
                            content: f.content,
                        })
                        .collect::<Vec<_>>())
                });
            match files {
                Ok(files) => {
                    t.files = Some(files.clone());
                    ready.push((i, rec, text, files));
                }
                Err(problem) => {
                    rec.outcome = format!("unusable: {problem}");
                    t.item.error = Some(rec.outcome.clone());
                    t.item.push(rec);
                    t.feedback(&text, format!("Your answer could not be used: {problem}."));
                }
            }
        }
        // Each tree is verified in its own staging folder, several at once.
        let verdicts: Vec<Option<Result<verify::Verdict>>> = match &job.verify {
            Some(cmd) => {
                let bar = super::bar(ready.len(), "trees verified", job.quiet);
                let workers = vec![(); job.verify_jobs()];
                let v = super::parallel(&workers, &ready, bar.as_ref(), |_, (i, _, _, files)| {
                    let name = &trees[*i].name;
                    let dir = staging.join(name);
                    let v = stage_and_verify(cmd, &dir, name, files, timeout);
                    let _ = std::fs::remove_dir_all(&dir);
                    Some(v)
                });
                if let Some(b) = bar {
                    b.finish_and_clear();
                }
                v
            }
            None => ready.iter().map(|_| None).collect(),
        };
        for ((i, mut rec, text, files), verdict) in ready.into_iter().zip(verdicts) {
            let t = &mut trees[i];
            if let (Some(cmd), Some(v)) = (&job.verify, verdict) {
                let v = v?;
                rec.verify_exit = v.exit;
                let out = tail(&v.output, TAIL_BYTES);
                t.item.verify_output = Some(out.clone());
                if !v.passed {
                    rec.outcome = format!("verify failed ({})", v.describe(timeout));
                    t.item.error = Some(format!("the verifier failed ({})", v.describe(timeout)));
                    t.item.push(rec);
                    t.feedback(
                        &text,
                        format!(
                            "The check `{cmd}` failed ({}) in the project. Its output:\n```\n{}\n```\nFix the project.",
                            v.describe(timeout),
                            out.trim_end()
                        ),
                    );
                    continue;
                }
            }
            let root = args.out.join(&t.name);
            let pairs: Vec<(String, String)> = files
                .iter()
                .map(|f| (f.path.clone(), f.content.clone()))
                .collect();
            match write_tree(&root, &pairs, args.force) {
                Ok(written) => {
                    t.item.files = files
                        .iter()
                        .zip(&written)
                        .map(|(f, w)| TreeFile {
                            path: f.path.clone(),
                            written: match w {
                                Written::Written => "written",
                                Written::Kept => "kept",
                                Written::Unchanged => "unchanged",
                            }
                            .into(),
                            bytes: f.content.len(),
                            content: f.content.clone(),
                        })
                        .collect();
                    let any = written.contains(&Written::Written);
                    t.item.status = if any {
                        Status::Applied
                    } else {
                        Status::NoChange
                    };
                    rec.outcome = t.item.status.as_str().into();
                    t.item.error = written.contains(&Written::Kept).then(|| {
                        "some files existed already and were kept (--force replaces them)".into()
                    });
                    t.done = true;
                }
                Err(e) => {
                    rec.outcome = format!("not written: {e}");
                    t.item.error = Some(rec.outcome.clone());
                    // A link or a file put in the way is not the model's fault: no retry.
                    t.done = true;
                    t.item.status = Status::Failed;
                }
            }
            t.item.push(rec);
        }
    }
    let _ = std::fs::remove_dir(&staging);
    for t in &mut trees {
        if !t.done || t.item.status == Status::Failed {
            t.item.status = Status::Failed;
            // Show what the last answer held, though nothing of it was written.
            if t.item.files.is_empty() {
                t.item.files = t
                    .files
                    .iter()
                    .flatten()
                    .map(|f| TreeFile {
                        path: f.path.clone(),
                        written: "not written".into(),
                        bytes: f.content.len(),
                        content: f.content.clone(),
                    })
                    .collect();
            }
        }
    }
    let mut report = Report::new("scaffold", &runner.identity);
    report.items = trees.into_iter().map(|t| t.item).collect();
    report.tally();
    report
        .outputs
        .insert("out".into(), args.out.display().to_string().into());
    report.outputs.insert(
        "cache".into(),
        if job.no_cache {
            "off".into()
        } else {
            cache_dir.display().to_string().into()
        },
    );
    let st = &mut report.settings;
    st.insert(
        "template".into(),
        args.template.display().to_string().into(),
    );
    st.insert("specs".into(), args.specs.display().to_string().into());
    super::record_settings(job, st);
    st.insert("force".into(), args.force.into());
    let s = report.summary.clone();
    let html = super::write_report(&report, &report_path)?;
    println!(
        "{}",
        super::summary_line(
            "scaffold",
            "tree",
            "written",
            &s,
            &format!("trees in {}; report {}", args.out.display(), html.display())
        )
    );
    Ok(())
}

/// Writes a tree into a fresh staging folder and runs the verifier there.
fn stage_and_verify(
    cmd: &str,
    dir: &Path,
    name: &str,
    files: &[FileOut],
    timeout: std::time::Duration,
) -> Result<verify::Verdict> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    let pairs: Vec<(String, String)> = files
        .iter()
        .map(|f| (f.path.clone(), f.content.clone()))
        .collect();
    write_tree(dir, &pairs, true).map_err(|e| anyhow::anyhow!("staging {}: {e}", dir.display()))?;
    let command = cmd
        .replace("{name}", &shell_quote(name))
        .replace("{path}", &shell_quote(&dir.to_string_lossy()));
    verify::run(&command, dir, &[("GRISTMILL_NAME", name)], timeout)
}
