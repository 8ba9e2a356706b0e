//! Writing a model's file tree without letting it write anywhere else: every path is relative,
//! has no `..`, no `.`-only or empty components, no backslashes or NULs, and no component of it
//! that already exists under the root may be a symbolic link (a link could point anywhere).

use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PathError {
    #[error("{0:?} is empty")]
    Empty(String),
    #[error("{0:?} is absolute; paths must be relative to the tree")]
    Absolute(String),
    #[error("{0:?} climbs out of the tree with `..`")]
    ParentDir(String),
    #[error("{0:?} has a backslash, a NUL or a drive letter")]
    Forbidden(String),
    #[error("{path:?} goes through the symbolic link {link:?}, which could lead out of the tree")]
    Symlink { path: String, link: String },
    #[error("{0:?} is listed twice")]
    Duplicate(String),
    #[error("{path:?}: {message}")]
    Io { path: String, message: String },
}

/// Checks one relative path and returns it normalised (`./a//b` → `a/b`).
pub fn check_relative(path: &str) -> Result<String, PathError> {
    if path.trim().is_empty() {
        return Err(PathError::Empty(path.into()));
    }
    if path.starts_with('/') || path.starts_with('~') {
        return Err(PathError::Absolute(path.into()));
    }
    let drive =
        path.len() >= 2 && path.as_bytes()[1] == b':' && path.as_bytes()[0].is_ascii_alphabetic();
    if path.contains('\\') || path.contains('\0') || drive {
        return Err(PathError::Forbidden(path.into()));
    }
    let mut parts = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(PathError::ParentDir(path.into())),
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Err(PathError::Empty(path.into()));
    }
    Ok(parts.join("/"))
}

/// Refuses a path under `root` that passes through an existing symbolic link, `root` included.
pub fn check_no_symlinks(root: &Path, rel: &str) -> Result<(), PathError> {
    let mut at = root.to_path_buf();
    let is_link = |p: &Path| std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink());
    if is_link(&at) {
        return Err(PathError::Symlink {
            path: rel.into(),
            link: root.display().to_string(),
        });
    }
    for c in rel.split('/') {
        at.push(c);
        if is_link(&at) {
            return Err(PathError::Symlink {
                path: rel.into(),
                link: at.display().to_string(),
            });
        }
    }
    Ok(())
}

/// Checks a whole tree's paths before anything is written: all valid, none twice, none through
/// a symbolic link under `root`. Returns the normalised paths in order.
pub fn check_tree(root: &Path, paths: &[&str]) -> Result<Vec<String>, PathError> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(paths.len());
    for p in paths {
        let rel = check_relative(p)?;
        if !seen.insert(rel.clone()) {
            return Err(PathError::Duplicate(rel));
        }
        check_no_symlinks(root, &rel)?;
        out.push(rel);
    }
    // `a` and `a/b` cannot both be files.
    for rel in &out {
        let mut prefix = String::new();
        for c in rel.split('/') {
            if !prefix.is_empty() && seen.contains(&prefix) {
                return Err(PathError::Io {
                    path: rel.clone(),
                    message: format!("{prefix:?} is also listed as a file"),
                });
            }
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(c);
        }
    }
    Ok(out)
}

/// What happened to one file of a tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Written {
    /// Written (new, or replaced with `force`).
    Written,
    /// Already there and kept (no `force`).
    Kept,
    /// Already there with the same content.
    Unchanged,
}

/// Writes checked files under `root` (created if missing). An existing file is kept unless
/// `force`. Each file is written to a temporary name beside it and renamed into place, so a
/// reader never sees half a file, and a link put in the way after the check is replaced, not
/// followed.
pub fn write_tree(
    root: &Path,
    files: &[(String, String)],
    force: bool,
) -> Result<Vec<Written>, PathError> {
    let rels: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
    let checked = check_tree(root, &rels)?;
    let io = |path: &Path, e: std::io::Error| PathError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    std::fs::create_dir_all(root).map_err(|e| io(root, e))?;
    let mut out = Vec::with_capacity(files.len());
    for (rel, (_, content)) in checked.iter().zip(files) {
        let target: PathBuf = root.join(rel);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        // Checked again right before writing: directories made above are ours.
        check_no_symlinks(root, rel)?;
        match std::fs::read(&target) {
            Ok(old) if old == content.as_bytes() => {
                out.push(Written::Unchanged);
                continue;
            }
            Ok(_) if !force => {
                out.push(Written::Kept);
                continue;
            }
            _ => {}
        }
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = target.with_file_name(format!(".{name}.gristmill-tmp"));
        std::fs::write(&tmp, content).map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, &target).map_err(|e| io(&target, e))?;
        out.push(Written::Written);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_leave_the_tree_are_refused() {
        assert_eq!(check_relative("./src//main.go").expect("ok"), "src/main.go");
        for (bad, kind) in [
            ("../../etc/passwd", "climbs"),
            ("src/../../x", "climbs"),
            ("/etc/passwd", "absolute"),
            ("~/.ssh/id_rsa", "absolute"),
            ("C:/Windows/x", "drive"),
            ("a\\..\\b", "backslash"),
            ("", "empty"),
            ("./", "empty"),
        ] {
            let e = check_relative(bad).expect_err(bad);
            assert!(e.to_string().contains(kind), "{bad}: {e}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn symbolic_links_are_never_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        let root = dir.path().join("tree");
        std::fs::create_dir(&root).expect("mkdir");
        std::os::unix::fs::symlink(&outside, root.join("escape")).expect("symlink");
        let e = write_tree(&root, &[("escape/pwned.txt".into(), "x".into())], true)
            .expect_err("through a link");
        assert!(matches!(e, PathError::Symlink { .. }), "{e}");
        assert!(!outside.join("pwned.txt").exists());
        // A link as the tree itself.
        let linked_root = dir.path().join("linked");
        std::os::unix::fs::symlink(&outside, &linked_root).expect("symlink");
        assert!(write_tree(&linked_root, &[("a.txt".into(), "x".into())], true).is_err());
        assert!(!outside.join("a.txt").exists());
        // A link as the file.
        std::os::unix::fs::symlink(outside.join("target"), root.join("file.txt")).expect("symlink");
        assert!(write_tree(&root, &[("file.txt".into(), "x".into())], true).is_err());
        assert!(!outside.join("target").exists());
    }

    #[test]
    fn existing_files_are_kept_unless_forced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("svc");
        let files = vec![("a/b.txt".to_string(), "one\n".to_string())];
        assert_eq!(
            write_tree(&root, &files, false).expect("writes"),
            vec![Written::Written]
        );
        assert_eq!(
            write_tree(&root, &files, false).expect("same"),
            vec![Written::Unchanged]
        );
        let changed = vec![("a/b.txt".to_string(), "two\n".to_string())];
        assert_eq!(
            write_tree(&root, &changed, false).expect("kept"),
            vec![Written::Kept]
        );
        assert_eq!(
            std::fs::read_to_string(root.join("a/b.txt")).expect("read"),
            "one\n"
        );
        assert_eq!(
            write_tree(&root, &changed, true).expect("forced"),
            vec![Written::Written]
        );
        assert_eq!(
            std::fs::read_to_string(root.join("a/b.txt")).expect("read"),
            "two\n"
        );
        let dup = vec![
            ("x".to_string(), String::new()),
            ("./x".to_string(), String::new()),
        ];
        assert_eq!(
            write_tree(&root, &dup, true),
            Err(PathError::Duplicate("x".into()))
        );
        let clash = vec![
            ("x".to_string(), String::new()),
            ("x/y".to_string(), String::new()),
        ];
        assert!(write_tree(&root, &clash, true).is_err());
    }
}
