//! The git that migrate needs, through the `git` command and its plumbing only: the working
//! tree, the index and the current branch are never touched. Files are read from `HEAD`, the
//! result is built in a temporary index, committed with `commit-tree` and named with
//! `update-ref`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};

/// The trailer that marks a commit as migrate's, so that a later run may move its branch.
pub const TRAILER: &str = "Gristmill-Migrate:";

#[derive(Debug, Clone)]
pub struct Git {
    pub root: PathBuf,
}

/// A tracked file at `HEAD`.
#[derive(Debug, Clone)]
pub struct Entry {
    pub mode: String,
    pub blob: String,
    pub path: String,
}

impl Git {
    /// The repository that contains `dir`.
    pub fn open(dir: &Path) -> Result<Git> {
        if !dir.is_dir() {
            bail!("--repo {}: not a directory", dir.display());
        }
        let out = Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(["rev-parse", "--show-toplevel"])
            .output()
            .context("cannot run git (is it installed?)")?;
        if !out.status.success() {
            bail!(
                "--repo {} is not inside a git repository: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let root = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Ok(Git { root })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("git");
        c.arg("-C").arg(&self.root).args(args);
        // Never page, prompt or pick up a user's diff colours.
        c.env("GIT_TERMINAL_PROMPT", "0").env("GIT_PAGER", "cat");
        c
    }

    /// Runs git; its stdout, or an error with its stderr.
    pub fn run(
        &self,
        args: &[&str],
        input: Option<&[u8]>,
        env: &[(&str, &str)],
    ) -> Result<Vec<u8>> {
        let mut c = self.command(args);
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = c.spawn().context("cannot run git")?;
        if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
            // git reads its whole input before answering for the commands used here.
            stdin.write_all(data).context("writing to git")?;
        }
        let out = child.wait_with_output().context("waiting for git")?;
        if !out.status.success() {
            bail!(
                "git {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out.stdout)
    }

    /// Runs git; its stdout as trimmed text.
    pub fn text(&self, args: &[&str]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.run(args, None, &[])?)
            .trim()
            .to_string())
    }

    /// The commit `HEAD` names.
    pub fn head(&self) -> Result<String> {
        self.text(&["rev-parse", "--verify", "--quiet", "HEAD^{commit}"])
            .map_err(|_| {
                anyhow!(
                    "{} has no commits yet: migrate reads files from HEAD",
                    self.root.display()
                )
            })
    }

    /// The repository's git directory shared by all its worktrees (where migrate keeps its
    /// cache and report: beside the repository, never in its working tree).
    pub fn common_dir(&self) -> Result<PathBuf> {
        let d = PathBuf::from(self.text(&["rev-parse", "--git-common-dir"])?);
        Ok(if d.is_absolute() {
            d
        } else {
            self.root.join(d)
        })
    }

    /// Regular files and executables at `commit` (links and submodules are not files to edit).
    pub fn files(&self, commit: &str) -> Result<Vec<Entry>> {
        let out = self.run(&["ls-tree", "-r", "-z", "--full-tree", commit], None, &[])?;
        let mut entries = Vec::new();
        for rec in out.split(|&b| b == 0).filter(|r| !r.is_empty()) {
            let rec = String::from_utf8_lossy(rec);
            let Some((meta, path)) = rec.split_once('\t') else {
                continue;
            };
            let mut f = meta.split(' ');
            let (Some(mode), Some(kind), Some(blob)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            if kind == "blob" && (mode == "100644" || mode == "100755") {
                entries.push(Entry {
                    mode: mode.into(),
                    blob: blob.into(),
                    path: path.into(),
                });
            }
        }
        Ok(entries)
    }

    /// The bytes of blobs, in order, through one `git cat-file --batch`.
    pub fn blobs(&self, ids: &[&str]) -> Result<Vec<Vec<u8>>> {
        let input: String = ids.iter().map(|id| format!("{id}\n")).collect();
        let out = self.run(&["cat-file", "--batch"], Some(input.as_bytes()), &[])?;
        let mut at = 0;
        let mut blobs = Vec::with_capacity(ids.len());
        for id in ids {
            let nl = out[at..]
                .iter()
                .position(|&b| b == b'\n')
                .ok_or_else(|| anyhow!("git cat-file: short answer for {id}"))?;
            let header = String::from_utf8_lossy(&out[at..at + nl]).to_string();
            let size: usize = header
                .rsplit(' ')
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| anyhow!("git cat-file: unexpected header {header:?}"))?;
            let start = at + nl + 1;
            let end = start + size;
            if end > out.len() {
                bail!("git cat-file: short answer for {id}");
            }
            blobs.push(out[start..end].to_vec());
            at = end + 1;
        }
        Ok(blobs)
    }

    /// Tracked files among `paths` whose working-tree or index copy differs from `HEAD`.
    pub fn dirty(&self, paths: &[&str]) -> Result<Vec<String>> {
        if paths.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = vec!["status", "--porcelain", "-z", "--untracked-files=no", "--"];
        args.extend(paths);
        let out = self.run(&args, None, &[])?;
        Ok(out
            .split(|&b| b == 0)
            .filter(|r| r.len() > 3)
            .map(|r| String::from_utf8_lossy(&r[3..]).into_owned())
            .collect())
    }

    /// Stores content as a blob; its id.
    pub fn hash_object(&self, content: &[u8]) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.run(
            &["hash-object", "-w", "--stdin"],
            Some(content),
            &[],
        )?)
        .trim()
        .to_string())
    }

    /// The tree of `base` with `changes` (mode, blob, path) in place, built in a temporary
    /// index.
    pub fn tree_with(&self, base: &str, changes: &[(String, String, String)]) -> Result<String> {
        let dir = tempfile::tempdir().context("cannot make a temporary directory")?;
        let index = dir.path().join("index");
        let index = index.to_string_lossy().into_owned();
        let env = [("GIT_INDEX_FILE", index.as_str())];
        self.run(&["read-tree", base], None, &env)?;
        if !changes.is_empty() {
            let info: String = changes
                .iter()
                .map(|(mode, blob, path)| format!("{mode} {blob}\t{path}\0"))
                .collect();
            self.run(
                &["update-index", "-z", "--index-info"],
                Some(info.as_bytes()),
                &env,
            )?;
        }
        Ok(
            String::from_utf8_lossy(&self.run(&["write-tree"], None, &env)?)
                .trim()
                .to_string(),
        )
    }

    /// `git diff-tree -p` between two trees or commits, as a patch.
    pub fn diff(&self, from: &str, to: &str) -> Result<String> {
        Ok(String::from_utf8_lossy(&self.run(
            &[
                "diff-tree",
                "-p",
                "--no-color",
                "--no-ext-diff",
                "--binary",
                from,
                to,
            ],
            None,
            &[],
        )?)
        .into_owned())
    }

    /// A commit of `tree` on `parent`, with a fallback identity when none is configured.
    pub fn commit(&self, tree: &str, parent: &str, message: &str) -> Result<String> {
        let configured = |key: &str| self.text(&["config", key]).is_ok_and(|v| !v.is_empty());
        let mut env: Vec<(&str, &str)> = Vec::new();
        if !configured("user.name") {
            env.extend([
                ("GIT_AUTHOR_NAME", "gristmill"),
                ("GIT_COMMITTER_NAME", "gristmill"),
            ]);
        }
        if !configured("user.email") {
            env.extend([
                ("GIT_AUTHOR_EMAIL", "gristmill@localhost"),
                ("GIT_COMMITTER_EMAIL", "gristmill@localhost"),
            ]);
        }
        let out = self.run(
            &["commit-tree", tree, "-p", parent, "-F", "-"],
            Some(message.as_bytes()),
            &env,
        )?;
        Ok(String::from_utf8_lossy(&out).trim().to_string())
    }

    /// The commit a branch names, if it exists.
    pub fn branch_tip(&self, branch: &str) -> Option<String> {
        self.text(&[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("refs/heads/{branch}^{{commit}}"),
        ])
        .ok()
        .filter(|s| !s.is_empty())
    }

    /// Where a branch is checked out, if in any worktree.
    pub fn checked_out_at(&self, branch: &str) -> Result<Option<PathBuf>> {
        let text = self.text(&["worktree", "list", "--porcelain"])?;
        let mut path = None;
        for line in text.lines() {
            if let Some(p) = line.strip_prefix("worktree ") {
                path = Some(PathBuf::from(p));
            } else if line == format!("branch refs/heads/{branch}") {
                return Ok(path);
            }
        }
        Ok(None)
    }
}

/// A detached worktree of `HEAD` in a temporary directory, for verifiers; removed on drop.
#[derive(Debug)]
pub struct Scratch {
    git: Git,
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new(git: &Git, commit: &str) -> Result<Scratch> {
        let dir = tempfile::Builder::new()
            .prefix("gristmill-verify-")
            .tempdir()
            .context("cannot make a temporary directory for the verifier")?;
        let path = dir.path().join("tree");
        let p = path.to_string_lossy().into_owned();
        // The repository's hooks (post-checkout) do not run for a scratch copy.
        git.run(
            &[
                "-c",
                "core.hooksPath=/dev/null",
                "worktree",
                "add",
                "--detach",
                "--quiet",
                &p,
                commit,
            ],
            None,
            &[],
        )
        .context("cannot make a scratch worktree for the verifier")?;
        Ok(Scratch {
            git: git.clone(),
            path,
            _dir: dir,
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let p = self.path.to_string_lossy().into_owned();
        if let Err(e) = self
            .git
            .run(&["worktree", "remove", "--force", &p], None, &[])
        {
            tracing::warn!("cannot remove the scratch worktree {p}: {e:#}");
        }
    }
}
