//! Running a verifier: a shell command (`sh -c`) in a directory, its stdout and stderr together
//! in one log, killed with its whole process group after a timeout.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The last bytes of a verifier's output kept for the report and the retry's prompt.
pub const TAIL_BYTES: usize = 4000;

#[derive(Debug, Clone)]
pub struct Verdict {
    pub passed: bool,
    /// The exit status, `None` when killed by a signal or the timeout.
    pub exit: Option<i32>,
    pub timed_out: bool,
    /// The whole output (stdout and stderr interleaved as written).
    pub output: String,
}

impl Verdict {
    /// `exit 1`, `timed out after 600 s`, `killed by a signal`.
    pub fn describe(&self, timeout: Duration) -> String {
        match (self.exit, self.timed_out) {
            (_, true) => format!("timed out after {} s", timeout.as_secs()),
            (Some(c), _) => format!("exit {c}"),
            (None, _) => "killed by a signal".into(),
        }
    }
}

/// Quotes a string for `sh` (single quotes; a single quote as `'\''`).
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Runs `command` with `sh -c` in `dir`, with `env` added.
pub fn run(command: &str, dir: &Path, env: &[(&str, &str)], timeout: Duration) -> Result<Verdict> {
    let log = tempfile::tempfile().context("cannot make the verifier's log file")?;
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(command)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("verifier log")?)
        .stderr(log.try_clone().context("verifier log")?)
        // Its own process group, so that a timeout kills what it started too.
        .process_group(0);
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c
        .spawn()
        .with_context(|| format!("cannot start the verifier `{command}`"))?;
    let started = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().context("waiting for the verifier")? {
            break s;
        }
        if started.elapsed() > timeout {
            timed_out = true;
            // The child leads its own process group (above), whose id is its pid: never 0 or
            // 1 here, which would name our own group or every process.
            if let Ok(pgid) = i32::try_from(child.id()) {
                if pgid > 1 {
                    // SAFETY: kill(2) has no memory effects; it signals the verifier's group.
                    unsafe {
                        libc::kill(-pgid, libc::SIGKILL);
                    }
                }
            }
            let _ = child.kill();
            break child.wait().context("waiting for the verifier")?;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut log = log;
    let mut bytes = Vec::new();
    std::io::Seek::rewind(&mut log).context("reading the verifier's log")?;
    log.read_to_end(&mut bytes)
        .context("reading the verifier's log")?;
    Ok(Verdict {
        passed: status.success() && !timed_out,
        exit: status.code(),
        timed_out,
        output: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifiers_report_exit_output_and_timeouts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v = run(
            "echo out; echo err >&2; exit 3",
            dir.path(),
            &[],
            Duration::from_secs(20),
        )
        .expect("runs");
        assert!(!v.passed);
        assert_eq!(v.exit, Some(3));
        assert!(
            v.output.contains("out") && v.output.contains("err"),
            "{}",
            v.output
        );
        let v = run(
            "test \"$X\" = y && pwd",
            dir.path(),
            &[("X", "y")],
            Duration::from_secs(20),
        )
        .expect("runs");
        assert!(v.passed, "{}", v.output);
        let started = Instant::now();
        let v = run("sleep 30", dir.path(), &[], Duration::from_millis(300)).expect("runs");
        assert!(v.timed_out && !v.passed);
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(shell_quote("src/a b.py"), "'src/a b.py'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote("src/a.py"), "src/a.py");
    }
}
