//! `gristmill run`: a whole batch file through the engine on this machine.

use std::cell::RefCell;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use gristmill_batch::LineValidator;
use gristmill_engine::response::{error_line, output_line, IdGen};
use gristmill_engine::Outcome;
use gristmill_protocol::{LineError, Request};
use indicatif::{ProgressBar, ProgressStyle};

use crate::engine_args::EngineArgs;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The batch input: JSONL, one OpenAI batch request per line (`/v1/chat/completions` or
    /// `/v1/completions`).
    pub input: PathBuf,

    /// Where completed requests go, one OpenAI batch output line each (order not guaranteed).
    #[arg(short, long, env = "GRISTMILL_OUTPUT")]
    pub output: PathBuf,

    /// Where failed requests go, with their input line numbers [default: OUTPUT with
    /// `.errors.jsonl` in place of its extension].
    #[arg(long, env = "GRISTMILL_ERRORS")]
    pub errors: Option<PathBuf>,

    #[command(flatten)]
    pub engine: EngineArgs,

    /// Print nothing but errors.
    #[arg(short, long, env = "GRISTMILL_QUIET")]
    pub quiet: bool,

    /// At the end, print the first lines of this many results (those of the first lines of the
    /// input that completed), so that the text can be seen without opening the output file.
    #[arg(long, default_value_t = 0, value_name = "N", env = "GRISTMILL_SHOW")]
    pub show: usize,
}

/// Counts of a finished run.
#[derive(Debug, Default)]
struct Tally {
    completed: usize,
    failed: usize,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// Completed requests whose every choice ended on its own (end of sequence or a stop
    /// string), not at `max_tokens`.
    stopped: usize,
}

struct Sink {
    out: BufWriter<File>,
    err: BufWriter<File>,
    ids: IdGen,
    tally: Tally,
    model_name: String,
    progress: Progress,
    io_error: Option<std::io::Error>,
    /// (line, custom_id, text) of the completed results of the earliest input lines, for
    /// `--show`.
    shown: Vec<(usize, String, String)>,
    show: usize,
}

impl Sink {
    fn write(&mut self, to_errors: bool, json: String) {
        let w = if to_errors {
            &mut self.err
        } else {
            &mut self.out
        };
        if let Err(e) = writeln!(w, "{json}") {
            self.io_error.get_or_insert(e);
        }
    }

    fn failed(&mut self, custom_id: Option<String>, line: usize, error: LineError) {
        tracing::debug!(line, message = %error.message, "request failed");
        let l = error_line(custom_id, line, error, &mut self.ids);
        self.write(true, serde_json::to_string(&l).unwrap_or_default());
        self.tally.failed += 1;
        self.progress.tick(&self.tally);
    }

    fn outcome(&mut self, o: Outcome) {
        match o {
            Outcome::Done(c) => {
                self.tally.completed += 1;
                self.tally.prompt_tokens += c.usage.prompt_tokens;
                self.tally.completion_tokens += c.usage.completion_tokens;
                if c.choices
                    .iter()
                    .all(|ch| ch.finish_reason == gristmill_protocol::FinishReason::Stop)
                {
                    self.tally.stopped += 1;
                }
                let full = self.shown.len() == self.show;
                if self.show > 0 && !(full && self.shown.last().is_some_and(|l| l.0 < c.line)) {
                    let text = c.choices.first().map_or("", |ch| ch.text.as_str());
                    self.shown
                        .push((c.line, c.custom_id.clone(), text.to_string()));
                    self.shown.sort_by_key(|(line, ..)| *line);
                    self.shown.truncate(self.show);
                }
                let l = output_line(&c, &self.model_name, &mut self.ids);
                self.write(false, serde_json::to_string(&l).unwrap_or_default());
                self.progress.tick(&self.tally);
            }
            Outcome::Failed {
                custom_id,
                line,
                error,
            } => self.failed(Some(custom_id), line, error),
        }
    }
}

/// A progress bar on a terminal, a log line every few seconds otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    total: usize,
    started: Instant,
    last_log: Instant,
    quiet: bool,
}

impl Progress {
    fn tick(&mut self, t: &Tally) {
        let done = t.completed + t.failed;
        let rate = t.completion_tokens as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
            if t.failed > 0 {
                bar.set_prefix(format!("{} failed", t.failed));
            }
        } else if !self.quiet
            && (self.last_log.elapsed() > Duration::from_secs(5) || done == self.total)
        {
            self.last_log = Instant::now();
            eprintln!(
                "progress: {done}/{} requests ({} failed), {} tokens generated, {rate:.1} tok/s",
                self.total, t.failed, t.completion_tokens
            );
        }
    }
}

/// Lines of each result `--show` prints.
const SHOW_LINES: usize = 6;

fn plural(n: usize, noun: &str) -> String {
    crate::client::plural(n as u64, noun)
}

fn default_errors_path(output: &Path) -> PathBuf {
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "output".into());
    output.with_file_name(format!("{stem}.errors.jsonl"))
}

pub fn run(args: RunArgs) -> Result<()> {
    let opts = args.engine.options()?;
    // Check the input before spending seconds on the model.
    let total = count_lines(&args.input)?;
    let load_start = Instant::now();
    let engine = args.engine.load_engine()?;
    if !args.quiet {
        let secs = load_start.elapsed().as_secs_f64();
        eprintln!("{}", args.engine.describe(&engine, secs));
    }
    let errors_path = args
        .errors
        .clone()
        .unwrap_or_else(|| default_errors_path(&args.output));
    let create = |p: &Path| -> Result<BufWriter<File>> {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        Ok(BufWriter::new(File::create(p).with_context(|| {
            format!("cannot create {}", p.display())
        })?))
    };
    let bar = (std::io::stderr().is_terminal() && !args.quiet).then(|| {
        let bar = ProgressBar::new(total as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} requests {prefix} | {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message("starting");
        // Redraw twice a second so the bar (and its clock) shows before the first request ends.
        bar.enable_steady_tick(Duration::from_millis(500));
        bar
    });
    let started = Instant::now();
    let sink = RefCell::new(Sink {
        out: create(&args.output)?,
        err: create(&errors_path)?,
        ids: IdGen::new(),
        tally: Tally::default(),
        model_name: engine.model_name.clone(),
        progress: Progress {
            bar,
            total,
            started,
            last_log: started,
            quiet: args.quiet,
        },
        io_error: None,
        shown: Vec::new(),
        show: args.show,
    });

    let reader = BufReader::new(
        File::open(&args.input).with_context(|| format!("cannot open {}", args.input.display()))?,
    );
    let mut validator = LineValidator::new();
    let mut read_error = None;
    let mut lines = reader.lines().enumerate();
    // Requests are validated lazily as the engine asks for more work, so a file of any length
    // streams through with bounded memory. Invalid lines go straight to the error file.
    let requests = std::iter::from_fn(|| loop {
        let (i, line) = lines.next()?;
        let line_no = i + 1;
        let text = match line {
            Ok(t) => t,
            Err(e) => {
                // Not UTF-8 or an I/O error: report this line, keep reading.
                if e.kind() == std::io::ErrorKind::InvalidData {
                    sink.borrow_mut().failed(
                        None,
                        line_no,
                        LineError::new(
                            gristmill_protocol::codes::INVALID_JSON,
                            format!("line {line_no} is not valid UTF-8"),
                        ),
                    );
                    continue;
                }
                read_error = Some(e);
                return None;
            }
        };
        if text.trim().is_empty() {
            continue;
        }
        match validator.validate(line_no, &text) {
            Ok(req) => return Some::<Request>(req),
            Err(bad) => sink.borrow_mut().failed(bad.custom_id, bad.line, bad.error),
        }
    });
    let bar = sink.borrow().progress.bar.clone();
    let finished = std::sync::atomic::AtomicBool::new(false);
    let stats = std::thread::scope(|scope| {
        // Live token count on the bar: requests finish seconds apart, tokens every step.
        if let Some(bar) = bar {
            let (engine, finished) = (&engine, &finished);
            scope.spawn(move || {
                while !finished.load(std::sync::atomic::Ordering::Relaxed) {
                    let tokens = engine
                        .generated_tokens
                        .load(std::sync::atomic::Ordering::Relaxed);
                    let rate = tokens as f64 / started.elapsed().as_secs_f64().max(1e-9);
                    bar.set_message(format!("{tokens} tokens generated, {rate:.0} tok/s"));
                    std::thread::sleep(Duration::from_millis(250));
                }
            });
        }
        let stats = engine.run(requests, opts, |o| sink.borrow_mut().outcome(o));
        finished.store(true, std::sync::atomic::Ordering::Relaxed);
        stats
    });

    let mut sink = sink.into_inner();
    if let Some(bar) = &sink.progress.bar {
        bar.finish_and_clear();
    }
    if let Some(e) = read_error {
        return Err(e).with_context(|| format!("reading {} failed part-way", args.input.display()));
    }
    sink.out
        .flush()
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    sink.err
        .flush()
        .with_context(|| format!("cannot write {}", errors_path.display()))?;
    if let Some(e) = sink.io_error {
        return Err(e).context("writing results failed");
    }
    let t = &sink.tally;
    let secs = started.elapsed().as_secs_f64();
    // An errors file exists only when a line failed (as with `submit --wait`).
    if t.failed == 0 {
        drop(sink.err);
        std::fs::remove_file(&errors_path)
            .with_context(|| format!("cannot remove the empty {}", errors_path.display()))?;
    }
    if !args.quiet {
        for (_, id, text) in &sink.shown {
            eprintln!("── {id}");
            let lines: Vec<&str> = text.lines().collect();
            for l in lines.iter().take(SHOW_LINES) {
                eprintln!("   {l}");
            }
            if lines.len() > SHOW_LINES {
                eprintln!("   … {}", plural(lines.len() - SHOW_LINES, "more line"));
            }
        }
        eprintln!("results: {}", args.output.display());
        if t.failed > 0 {
            eprintln!(
                "errors:  {} ({})",
                errors_path.display(),
                plural(t.failed, "line")
            );
        } else {
            eprintln!("errors:  none (no errors file written)");
        }
        let sc = stats.scheduler;
        eprintln!(
            "engine: {} steps, up to {} sequences per step, prefix cache hit rate {:.1}% ({} of {} prompt tokens reused), {} preemptions",
            stats.steps,
            stats.max_batch,
            100.0 * sc.cached_tokens as f64 / sc.prefill_tokens.max(1) as f64,
            sc.cached_tokens,
            sc.prefill_tokens,
            sc.preemptions
        );
    }
    println!(
        "{}: {} completed ({} finished on their own, {} at max_tokens), {} failed; {} prompt + {} generated tokens in {:.1} s ({:.1} generated tok/s, {:.1} total tok/s)",
        plural(t.completed + t.failed, "request"),
        t.completed,
        t.stopped,
        t.completed - t.stopped,
        t.failed,
        t.prompt_tokens,
        t.completion_tokens,
        secs,
        t.completion_tokens as f64 / secs.max(1e-9),
        (t.prompt_tokens + t.completion_tokens) as f64 / secs.max(1e-9),
    );
    Ok(())
}

/// Non-blank lines of the input, for the progress bar; also fails early on an unreadable file.
fn count_lines(path: &Path) -> Result<usize> {
    let f =
        File::open(path).with_context(|| format!("cannot open the input {}", path.display()))?;
    let mut n = 0;
    for chunk in BufReader::new(f).split(b'\n') {
        let chunk = chunk.with_context(|| format!("cannot read {}", path.display()))?;
        if chunk.iter().any(|b| !b.is_ascii_whitespace()) {
            n += 1;
        }
    }
    Ok(n)
}
