//! `gristmill migrate`: one instruction applied to every matching file of a git repository —
//! one request per file, answers parsed into whole files or edits, verified per file or per
//! round, failures retried with the verifier's output, the verified changes committed on a new
//! branch (or left in a worktree, or only in a patch) without touching the working tree.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use gristmill_workflows::answer::{self, parse_file_answer};
use gristmill_workflows::glob::{any_matches, Glob};
use gristmill_workflows::report::{tail, Item, Report, Status};
use gristmill_workflows::{language, template};
use serde_json::{json, Value};

use super::git::{self, Git, Scratch};
use super::verify::{self, shell_quote, TAIL_BYTES};
use super::JobArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ApplyMode {
    /// Commit the applied files on a new branch (one commit on HEAD).
    Branch,
    /// As `branch`, and check the branch out in a new git worktree.
    Worktree,
    /// Change no ref: only the report and the patch.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AnswerFormat {
    /// Whole files up to --edits-above lines, edits above.
    Auto,
    /// The whole new file in one fenced block (a grammar stops the answer at its end).
    Whole,
    /// JSON search/replace edits (a JSON Schema enforces the shape).
    Edits,
}

/// Rewrites the files of a git repository that match globs, one request per file.
#[derive(Debug, Args)]
#[command(
    after_help = "Files are read from HEAD (commit what you want migrated), never from \
    the working tree, and results go to a branch, a worktree or a patch: the working tree, the \
    index and the current branch are never touched. The cache and the report live in the \
    repository's git directory (.git/gristmill/) unless --cache and --report say otherwise. A \
    re-run on an unchanged repository sends no request and makes the same branch."
)]
pub struct MigrateArgs {
    /// The repository (any directory inside it).
    #[arg(long, default_value = ".", value_name = "DIR")]
    pub repo: PathBuf,

    /// Files to migrate: a glob over the paths tracked at HEAD (repeatable). Without a `/` it
    /// matches names at any depth (`*.py`); with one, paths from the root (`src/**/*.java`).
    #[arg(long = "include", required = true, value_name = "GLOB")]
    pub include: Vec<String>,

    /// Files to leave out, as --include (repeatable).
    #[arg(long = "exclude", value_name = "GLOB")]
    pub exclude: Vec<String>,

    /// The instruction: a text file, a template where `{path}`, `{language}` and `{content}`
    /// are filled per file (`{{path}}` is a literal `{path}`). Without `{content}` the file
    /// follows the instruction in a fenced block. Text before the first placeholder is shared
    /// by every request, so the prefix cache computes it once.
    #[arg(long, value_name = "FILE")]
    pub instruction: PathBuf,

    /// A file every request sees as reference (repeatable): an API's new signatures, a style
    /// guide, an example already migrated.
    #[arg(long = "context", value_name = "FILE")]
    pub context: Vec<PathBuf>,

    /// What to do with the verified changes.
    #[arg(long, value_enum, default_value = "branch")]
    pub apply: ApplyMode,

    /// The branch to create or move [default: gristmill/migrate-<hash of the instruction>]. A
    /// branch that exists is moved only if migrate made it (its commit has the
    /// `Gristmill-Migrate:` trailer).
    #[arg(long, value_name = "NAME")]
    pub branch: Option<String>,

    /// Where --apply worktree puts the worktree [default: beside the repository,
    /// `<repo>-<branch>`].
    #[arg(long, value_name = "DIR")]
    pub worktree_dir: Option<PathBuf>,

    /// How answers are asked for.
    #[arg(long, value_enum, default_value = "auto")]
    pub format: AnswerFormat,

    /// With --format auto, files longer than this many lines are answered with edits.
    #[arg(long, default_value_t = 400, value_name = "LINES")]
    pub edits_above: usize,

    #[command(flatten)]
    pub job: JobArgs,
}

/// Largest file sent: a bigger one fails with a message instead of a request.
const MAX_FILE_BYTES: usize = 512 << 10;

const SYSTEM: &str = "You are an expert software engineer applying one change across a codebase, \
one file at a time. Change what the instruction asks and nothing else: keep the rest of the file \
exactly as it is, comments and formatting included. Each request ends by saying how to answer.";

struct FileJob {
    entry: git::Entry,
    original: String,
    fence: String,
    tag: &'static str,
    edits: bool,
    max_tokens: usize,
    messages: Vec<Value>,
    item: Item,
    /// The last answer that parsed and applied.
    candidate: Option<String>,
    done: bool,
}

impl FileJob {
    fn how_to_answer(&self) -> String {
        if self.edits {
            format!(
                "Answer with JSON edits to `{}`: {{\"edits\": [{{\"search\": \"…\", \"replace\": \"…\"}}]}}. \
                 Each search is copied exactly from the file (whole lines, indentation included) and \
                 occurs only once in it; its replace takes its place; edits apply in order. If the \
                 file needs no change, give one edit whose replace equals its search.",
                self.entry.path
            )
        } else {
            format!(
                "Answer with the complete new content of `{}` in one fenced code block \
                 ({}{} … {}) and nothing else. If the file needs no change, answer with it unchanged.",
                self.entry.path, self.fence, self.tag, self.fence
            )
        }
    }

    fn constraint(&self) -> Value {
        if self.edits {
            json!({"response_format": {"type": "json_schema", "json_schema": {
                "name": "edits", "strict": true, "schema": answer::edits_schema()}}})
        } else {
            json!({"structured_outputs": {"grammar": answer::whole_file_grammar(&self.fence, self.tag)}})
        }
    }

    /// The last answer stands: applied, or no change.
    fn accept(&mut self) {
        self.item.status = if self.candidate.as_deref() == Some(self.original.as_str()) {
            Status::NoChange
        } else {
            Status::Applied
        };
        self.item.error = None;
        self.done = true;
    }

    /// Appends the failed answer and what was wrong with it, for the next attempt.
    fn feedback(&mut self, answer: &str, problem: String) {
        let again = self.how_to_answer();
        self.messages
            .push(json!({"role": "assistant", "content": answer}));
        self.messages
            .push(json!({"role": "user", "content": format!("{problem}\n\n{again}")}));
    }
}

pub fn migrate(args: MigrateArgs) -> Result<()> {
    let job = &args.job;
    job.check()?;
    let git = Git::open(&args.repo)?;
    let head = git.head()?;
    let includes = args
        .include
        .iter()
        .map(|g| Glob::new(g))
        .collect::<Result<Vec<_>, _>>()?;
    let excludes = args
        .exclude
        .iter()
        .map(|g| Glob::new(g))
        .collect::<Result<Vec<_>, _>>()?;
    let instruction = std::fs::read_to_string(&args.instruction)
        .with_context(|| format!("cannot read the instruction {}", args.instruction.display()))?;
    if instruction.trim().is_empty() {
        bail!("the instruction {} is empty", args.instruction.display());
    }
    let holes = template::placeholders(&instruction);
    for name in &holes {
        if !["path", "language", "content"].contains(&name.as_str()) {
            bail!(
                "the instruction {} uses {{{name}}}; the placeholders are {{path}}, {{language}} and {{content}} (write {{{{{name}}}}} for a literal {{{name}}})",
                args.instruction.display()
            );
        }
    }
    let mut system = SYSTEM.to_string();
    for c in &args.context {
        let text = std::fs::read_to_string(c)
            .with_context(|| format!("cannot read the context file {}", c.display()))?;
        let label = c.display().to_string();
        let fence = answer::fence(&text);
        system.push_str(&format!(
            "\n\nReference file `{label}` (do not rewrite it):\n{fence}{}\n{}{}{fence}",
            language::of(&label).1,
            text,
            if text.ends_with('\n') { "" } else { "\n" }
        ));
    }

    let entries: Vec<git::Entry> = git
        .files(&head)?
        .into_iter()
        .filter(|e| any_matches(&includes, &e.path) && !any_matches(&excludes, &e.path))
        .collect();
    if entries.is_empty() {
        bail!(
            "no file tracked at HEAD ({}) matches --include {}{}",
            &head[..12.min(head.len())],
            args.include.join(" --include "),
            if args.exclude.is_empty() {
                String::new()
            } else {
                format!(" outside --exclude {}", args.exclude.join(" --exclude "))
            }
        );
    }
    let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    let dirty = git.dirty(&paths)?;
    if !dirty.is_empty() && !job.quiet {
        eprintln!(
            "warning: {} uncommitted changes ({}{}); migrate reads HEAD, so commit them to include them",
            crate::client::plural(dirty.len() as u64, "matching file has"),
            dirty.iter().take(3).cloned().collect::<Vec<_>>().join(", "),
            if dirty.len() > 3 { ", …" } else { "" }
        );
    }
    let blobs = git.blobs(&entries.iter().map(|e| e.blob.as_str()).collect::<Vec<_>>())?;

    let gdir = git.common_dir()?.join("gristmill");
    let cache_dir = job.cache.clone().unwrap_or_else(|| gdir.join("cache"));
    let report_path = job
        .report
        .clone()
        .unwrap_or_else(|| gdir.join("migrate-report.json"));
    let mut jobs: Vec<FileJob> = Vec::with_capacity(entries.len());
    for (entry, bytes) in entries.into_iter().zip(blobs) {
        let mut item = Item::new(entry.path.clone());
        let original = match String::from_utf8(bytes) {
            Ok(t) if t.len() <= MAX_FILE_BYTES => t,
            Ok(t) => {
                item.error = Some(format!(
                    "{} bytes is too large for one request (at most {MAX_FILE_BYTES}); --exclude it or split it",
                    t.len()
                ));
                String::new()
            }
            Err(_) => {
                item.error = Some("not UTF-8 text (a binary file?): skipped".into());
                String::new()
            }
        };
        let (lang, tag) = language::of(&entry.path);
        let fence = answer::fence(&original);
        let lines = original.lines().count();
        let edits = match args.format {
            AnswerFormat::Whole => false,
            AnswerFormat::Edits => true,
            AnswerFormat::Auto => lines > args.edits_above,
        };
        // About 3.5 bytes per token in code; room for the file to grow by half, and the fences.
        let estimate = original.len() * 2 / 7 + 64;
        let max_tokens = if edits {
            estimate / 2 + 512
        } else {
            estimate * 3 / 2 + 64
        }
        .clamp(256.min(job.max_tokens), job.max_tokens);
        let done = item.error.is_some();
        let mut fj = FileJob {
            entry,
            original,
            fence,
            tag,
            edits,
            max_tokens,
            messages: Vec::new(),
            item,
            candidate: None,
            done,
        };
        if !done {
            let path = fj.entry.path.clone();
            let user = template::render(&instruction, |n| match n {
                "path" => Some(path.clone()),
                "language" => Some(lang.to_string()),
                "content" => Some(fj.original.clone()),
                _ => None,
            })?;
            let mut user = user;
            if !holes.iter().any(|p| p == "content") {
                user.push_str(&format!(
                    "\n\nThe file `{path}` ({lang}):\n{}{tag}\n{}{}{}",
                    fj.fence,
                    fj.original,
                    if fj.original.ends_with('\n') || fj.original.is_empty() {
                        ""
                    } else {
                        "\n"
                    },
                    fj.fence
                ));
            }
            user.push_str("\n\n");
            user.push_str(&fj.how_to_answer());
            fj.messages = vec![
                json!({"role": "system", "content": system}),
                json!({"role": "user", "content": user}),
            ];
        }
        jobs.push(fj);
    }

    let mut runner = job.runner(cache_dir.clone())?;
    // Scratch worktrees for the verifier: one per verifier running at once.
    let to_do = jobs.iter().filter(|j| !j.done).count();
    let scratches = match &job.verify {
        Some(cmd) if to_do > 0 => {
            let n = if cmd.contains("{path}") {
                job.verify_jobs().min(to_do)
            } else {
                1
            };
            (0..n)
                .map(|_| Scratch::new(&git, &head))
                .collect::<Result<Vec<_>>>()?
        }
        _ => Vec::new(),
    };
    let timeout = job.verify_timeout();
    for attempt in 1..=job.max_attempts {
        let pending: Vec<usize> = (0..jobs.len()).filter(|&i| !jobs[i].done).collect();
        if pending.is_empty() {
            break;
        }
        let seed = super::seed_of(job, attempt);
        let bodies = pending
            .iter()
            .map(|&i| {
                let fj = &jobs[i];
                super::body(&fj.messages, job, seed, fj.max_tokens, fj.constraint())
            })
            .collect();
        let answers = runner.attempt(attempt, job.max_attempts, seed, bodies)?;
        // (job, answer text) of the answers that parsed and applied, to verify.
        let mut answered: Vec<(usize, String)> = Vec::new();
        for (&i, (mut rec, text)) in pending.iter().zip(answers) {
            let fj = &mut jobs[i];
            match text {
                Err(failure) => fj.item.error = Some(failure),
                Ok(text) => match parse_file_answer(&text, &fj.original) {
                    Err(err) => {
                        let err = cut_off(err.to_string(), &rec.finish_reason, fj.max_tokens);
                        rec.outcome = format!("unparsable: {err}");
                        fj.item.error = Some(rec.outcome.clone());
                        fj.feedback(&text, format!("Your answer could not be used: {err}."));
                    }
                    Ok(new) => {
                        // An unchanged file is verified too: a check that fails on it (a
                        // compiler for the new language) says the work is not done.
                        rec.outcome = if new == fj.original {
                            "no_change"
                        } else {
                            "applied"
                        }
                        .into();
                        fj.candidate = Some(new);
                        answered.push((i, text));
                    }
                },
            }
            fj.item.push(rec);
        }
        match &job.verify {
            Some(cmd) if !answered.is_empty() && !scratches.is_empty() => {
                verify_round(cmd, &scratches, &mut jobs, &answered, timeout, job.quiet)?;
            }
            _ => {
                for (i, _) in answered {
                    jobs[i].accept();
                }
            }
        }
    }
    for fj in &mut jobs {
        if !fj.done {
            fj.item.status = Status::Failed;
        }
    }
    drop(scratches);

    // The branch's tree holds the applied files; the diffs in the report also show the last
    // answer of each failed file.
    let mut applied = Vec::new();
    let mut shown = Vec::new();
    for fj in &jobs {
        if let Some(c) = &fj.candidate {
            if c == &fj.original {
                continue;
            }
            let blob = git.hash_object(c.as_bytes())?;
            let change = (fj.entry.mode.clone(), blob, fj.entry.path.clone());
            if fj.item.status == Status::Applied {
                applied.push(change.clone());
            }
            shown.push(change);
        }
    }
    let mut diffs = split_patch(&git.diff(&head, &git.tree_with(&head, &shown)?)?);
    for fj in &mut jobs {
        if let Some(d) = diffs.remove(&fj.entry.path) {
            fj.item.diff = d;
        }
    }
    let tree = git.tree_with(&head, &applied)?;
    let patch = git.diff(&head, &tree)?;

    let mut report = Report::new("migrate", &runner.identity);
    report.items = jobs.into_iter().map(|j| j.item).collect();
    report.tally();
    let s = report.summary.clone();
    let patch_path = report_path.with_extension("patch");
    if let Some(dir) = patch_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(&patch_path, &patch)
        .with_context(|| format!("cannot write {}", patch_path.display()))?;
    let o = &mut report.outputs;
    o.insert("base".into(), head.clone().into());
    o.insert("tree".into(), tree.clone().into());
    o.insert("patch".into(), patch_path.display().to_string().into());
    o.insert(
        "cache".into(),
        if job.no_cache {
            "off".into()
        } else {
            cache_dir.display().to_string().into()
        },
    );
    let st = &mut report.settings;
    st.insert("repo".into(), git.root.display().to_string().into());
    st.insert("include".into(), json!(args.include));
    st.insert("exclude".into(), json!(args.exclude));
    st.insert(
        "instruction".into(),
        args.instruction.display().to_string().into(),
    );
    st.insert(
        "context".into(),
        json!(args
            .context
            .iter()
            .map(|c| c.display().to_string())
            .collect::<Vec<_>>()),
    );
    super::record_settings(job, st);

    let mut where_to = format!("patch {}", patch_path.display());
    if args.apply != ApplyMode::None && s.applied > 0 {
        let branch = args.branch.clone().unwrap_or_else(|| {
            let d = ring::digest::digest(&ring::digest::SHA256, instruction.as_bytes());
            format!(
                "gristmill/migrate-{}",
                gristmill_workflows::cache::hex(&d.as_ref()[..4])
            )
        });
        let first_line = instruction
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim();
        let message = format!(
            "gristmill migrate: {}\n\n{}\n\n{} applied, {} unchanged, {} failed of {} files.\n\n{} {}\n",
            crate::client::plural(s.applied as u64, "file"),
            first_line.chars().take(200).collect::<String>(),
            s.applied,
            s.no_change,
            s.failed,
            s.total,
            git::TRAILER,
            args.instruction.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        );
        let commit = publish(&git, &args, &branch, &head, &tree, &message, &mut report)?;
        report
            .outputs
            .insert("branch".into(), branch.clone().into());
        report
            .outputs
            .insert("commit".into(), commit.clone().into());
        where_to = format!(
            "branch {branch} (commit {})",
            &commit[..12.min(commit.len())]
        );
        if let Some(wt) = report.outputs.get("worktree").and_then(Value::as_str) {
            where_to.push_str(&format!(", worktree {wt}"));
        }
    } else if args.apply != ApplyMode::None {
        where_to = "no branch: no file changed".into();
    }
    let html = super::write_report(&report, &report_path)?;
    println!(
        "{}",
        super::summary_line(
            "migrate",
            "file",
            "applied",
            &s,
            &format!("{where_to}; report {}", html.display())
        )
    );
    Ok(())
}

/// Says so when an answer that did not parse was cut off at max_tokens.
pub fn cut_off(problem: String, finish_reason: &str, max_tokens: usize) -> String {
    if finish_reason == "length" {
        format!("{problem}; the answer was cut off at {max_tokens} tokens (--max-tokens)")
    } else {
        problem
    }
}

/// Verifies one round's answered files in the scratch worktree: per file when the command names
/// `{path}`, else once for all of them.
fn verify_round(
    cmd: &str,
    scratches: &[Scratch],
    jobs: &mut [FileJob],
    changed: &[(usize, String)],
    timeout: std::time::Duration,
    quiet: bool,
) -> Result<()> {
    let write_in = |scratch: &Scratch, path: &str, content: &str| -> Result<()> {
        let p = scratch.path.join(path);
        std::fs::write(&p, content).with_context(|| format!("cannot write {}", p.display()))
    };
    let scratch = &scratches[0];
    let write = |path: &str, content: &str| write_in(scratch, path, content);
    let bar = super::bar(changed.len(), "verified", quiet);
    if cmd.contains("{path}") {
        // (path, candidate, original) per file; each verifier thread has its own worktree.
        let work: Vec<(String, String, String)> = changed
            .iter()
            .map(|(i, _)| {
                let fj = &jobs[*i];
                (
                    fj.entry.path.clone(),
                    fj.candidate.clone().unwrap_or_default(),
                    fj.original.clone(),
                )
            })
            .collect();
        let verdicts = super::parallel(
            scratches,
            &work,
            bar.as_ref(),
            |scratch, (path, candidate, original)| -> Result<(String, verify::Verdict)> {
                write_in(scratch, path, candidate)?;
                let command = cmd.replace("{path}", &shell_quote(path));
                let v = verify::run(
                    &command,
                    &scratch.path,
                    &[("GRISTMILL_PATH", path)],
                    timeout,
                );
                write_in(scratch, path, original)?;
                Ok((command, v?))
            },
        );
        for ((i, text), verdict) in changed.iter().zip(verdicts) {
            let (command, v) = verdict?;
            settle(&mut jobs[*i], text, &v, &command, timeout);
        }
    } else {
        // Files applied in earlier rounds are part of the tree being verified.
        for fj in jobs.iter().filter(|j| j.item.status == Status::Applied) {
            write(
                &fj.entry.path,
                fj.candidate.as_deref().unwrap_or(&fj.original),
            )?;
        }
        for (i, _) in changed {
            write(
                &jobs[*i].entry.path,
                jobs[*i].candidate.as_deref().unwrap_or(""),
            )?;
        }
        let v = verify::run(cmd, &scratch.path, &[], timeout)?;
        let named: Vec<bool> = changed
            .iter()
            .map(|(i, _)| v.output.contains(&jobs[*i].entry.path))
            .collect();
        let blame_all = !named.iter().any(|&n| n);
        for ((i, text), named) in changed.iter().zip(named) {
            let fj = &mut jobs[*i];
            if v.passed || !(named || blame_all) {
                let ok = verify::Verdict {
                    passed: true,
                    ..v.clone()
                };
                settle(fj, text, &ok, cmd, timeout);
            } else {
                settle(fj, text, &v, cmd, timeout);
                write(&fj.entry.path, &fj.original)?;
            }
        }
        if let Some(b) = &bar {
            b.inc(changed.len() as u64);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(())
}

/// Records a verifier's verdict on a file's answer: applied, or feedback for the next attempt.
fn settle(
    fj: &mut FileJob,
    answer: &str,
    v: &verify::Verdict,
    cmd: &str,
    timeout: std::time::Duration,
) {
    let out = tail(&v.output, TAIL_BYTES);
    fj.item.verify_output = Some(out.clone());
    if let Some(last) = fj.item.history.last_mut() {
        last.verify_exit = v.exit;
        if !v.passed {
            last.outcome = format!("verify failed ({})", v.describe(timeout));
        }
    }
    if v.passed {
        fj.accept();
    } else {
        fj.item.error = Some(format!("the verifier failed ({})", v.describe(timeout)));
        let path = fj.entry.path.clone();
        fj.feedback(
            answer,
            format!(
                "The check `{cmd}` failed ({}) on your version of `{path}`. Its output:\n```\n{}\n```\nFix the file.",
                v.describe(timeout),
                out.trim_end()
            ),
        );
    }
}

/// Moves (or creates) the branch to a commit of `tree` on `head`, and with --apply worktree
/// checks it out in a worktree. The commit.
fn publish(
    git: &Git,
    args: &MigrateArgs,
    branch: &str,
    head: &str,
    tree: &str,
    message: &str,
    report: &mut Report,
) -> Result<String> {
    git.run(&["check-ref-format", "--branch", branch], None, &[])
        .with_context(|| format!("--branch {branch:?} is not a valid branch name"))?;
    let tip = git.branch_tip(branch);
    let same = tip.as_deref().is_some_and(|t| {
        git.text(&["rev-parse", &format!("{t}^{{tree}}")])
            .is_ok_and(|tr| tr == tree)
            && git
                .text(&["rev-parse", &format!("{t}^")])
                .is_ok_and(|p| p == head)
    });
    if let Some(t) = &tip {
        let msg = git.text(&["log", "-1", "--format=%B", t])?;
        if !same && !msg.contains(git::TRAILER) {
            bail!(
                "the branch {branch} exists and was not made by gristmill migrate (no `{}` trailer): pass another --branch or delete it",
                git::TRAILER
            );
        }
    }
    let checked_out = git.checked_out_at(branch)?;
    let commit = match (&tip, same) {
        (Some(t), true) => t.clone(),
        _ => git.commit(tree, head, message)?,
    };
    match (&checked_out, args.apply) {
        (Some(at), _) if !same => {
            // The branch is checked out: move it there, where its index and files follow.
            let status = Git { root: at.clone() }.text(&[
                "status",
                "--porcelain",
                "--untracked-files=no",
            ])?;
            if args.apply != ApplyMode::Worktree || !status.is_empty() {
                bail!(
                    "the branch {branch} is checked out at {}{}: remove that worktree (git worktree remove) or pass another --branch",
                    at.display(),
                    if status.is_empty() { "" } else { " with uncommitted changes" }
                );
            }
            Git { root: at.clone() }.run(&["reset", "--hard", "--quiet", &commit], None, &[])?;
        }
        _ => {
            if !same {
                git.run(
                    &[
                        "update-ref",
                        "-m",
                        "gristmill migrate",
                        &format!("refs/heads/{branch}"),
                        &commit,
                        tip.as_deref().unwrap_or(""),
                    ],
                    None,
                    &[],
                )?;
            }
        }
    }
    if args.apply == ApplyMode::Worktree {
        let dir = match (&checked_out, &args.worktree_dir) {
            (Some(at), _) => at.clone(),
            (None, Some(d)) => d.clone(),
            (None, None) => {
                let name = git
                    .root
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "repo".into());
                git.root
                    .with_file_name(format!("{name}-{}", branch.replace('/', "-")))
            }
        };
        if checked_out.is_none() {
            if dir.exists() {
                bail!(
                    "--worktree-dir {} exists already; name another",
                    dir.display()
                );
            }
            let d = dir.to_string_lossy().into_owned();
            git.run(&["worktree", "add", "--quiet", &d, branch], None, &[])?;
        }
        report
            .outputs
            .insert("worktree".into(), dir.display().to_string().into());
    }
    Ok(commit)
}

/// A `git diff` split per file (`diff --git a/P b/P` headers; P is the same on both sides here).
fn split_patch(patch: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut current: Option<(String, String)> = None;
    for line in patch.split_inclusive('\n') {
        if let Some(rest) = line.strip_prefix("diff --git a/") {
            if let Some((p, d)) = current.take() {
                out.insert(p, d);
            }
            let rest = rest.trim_end();
            let path = rest[..rest.len().saturating_sub(3) / 2].to_string();
            current = Some((path, String::new()));
        }
        if let Some((_, d)) = &mut current {
            d.push_str(line);
        }
    }
    if let Some((p, d)) = current {
        out.insert(p, d);
    }
    out
}
