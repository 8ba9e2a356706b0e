//! Globs over repository paths (`/`-separated, relative to the repository's root), as in
//! `.gitignore` and `rg -g`:
//!
//! - `*` matches any run of characters except `/`, `?` one character except `/`;
//! - `[abc]`, `[a-z]`, `[!a-z]` match one character of (or not of) a set;
//! - `{a,b}` matches either alternative (`src/**/*.{ts,tsx}`);
//! - `**` as a whole path component matches any number of directories, none included;
//! - a pattern without a `/` matches a file's name at any depth (`*.py` is every Python file);
//!   one with a `/` matches the whole path from the root (`src/*.py` only directly in `src`).

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("glob {pattern:?}: {problem}")]
pub struct GlobError {
    pub pattern: String,
    pub problem: String,
}

/// A compiled glob.
#[derive(Debug, Clone)]
pub struct Glob {
    text: String,
    /// The brace alternatives, each as path components.
    alternatives: Vec<Vec<String>>,
    /// Matches the file name at any depth.
    basename: bool,
}

impl Glob {
    pub fn new(pattern: &str) -> Result<Glob, GlobError> {
        let err = |problem: &str| GlobError {
            pattern: pattern.to_string(),
            problem: problem.to_string(),
        };
        let p = pattern.trim();
        if p.is_empty() {
            return Err(err("is empty"));
        }
        if p.starts_with('/') {
            return Err(err(
                "is absolute: globs are relative to the repository's root (drop the leading /)",
            ));
        }
        let p = p.strip_prefix("./").unwrap_or(p);
        let alternatives = expand_braces(p).map_err(|e| err(&e))?;
        let mut compiled = Vec::with_capacity(alternatives.len());
        for alt in &alternatives {
            let parts: Vec<String> = alt
                .split('/')
                .filter(|c| !c.is_empty())
                .map(String::from)
                .collect();
            for part in &parts {
                check_classes(part).map_err(|e| err(&e))?;
                if part.contains("**") && part != "**" {
                    return Err(err(
                        "`**` must be a whole path component (`src/**/x.py`, not `src**`)",
                    ));
                }
            }
            compiled.push(parts);
        }
        Ok(Glob {
            text: pattern.to_string(),
            basename: !p.contains('/'),
            alternatives: compiled,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `path` (relative, `/`-separated) matches.
    pub fn matches(&self, path: &str) -> bool {
        let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        self.alternatives.iter().any(|alt| {
            if self.basename {
                parts.last().is_some_and(|name| {
                    alt.len() == 1 && component(alt[0].as_bytes(), name.as_bytes())
                })
            } else {
                components(alt, &parts)
            }
        })
    }
}

/// Whether any of `globs` matches `path`.
pub fn any_matches(globs: &[Glob], path: &str) -> bool {
    globs.iter().any(|g| g.matches(path))
}

fn components(pattern: &[String], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=path.len()).any(|skip| components(rest, &path[skip..]))
        }
        Some((first, rest)) => match path.split_first() {
            Some((p, prest)) => {
                component(first.as_bytes(), p.as_bytes()) && components(rest, prest)
            }
            None => false,
        },
    }
}

/// One component against one name: `*`, `?`, `[...]` and literal bytes (UTF-8 sequences match
/// byte for byte; `?` and classes take one byte of a multi-byte character, which is fine for
/// the ASCII names globs are written for).
fn component(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    // Where to resume after the last `*`: (pattern index after it, string index it now covers).
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() {
            match p[pi] {
                b'*' => {
                    star = Some((pi + 1, si));
                    pi += 1;
                    continue;
                }
                b'?' => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = class(&p[pi..], s[si]) {
                        if matched {
                            pi += next;
                            si += 1;
                            continue;
                        }
                    }
                }
                b'\\' if pi + 1 < p.len() && p[pi + 1] == s[si] => {
                    pi += 2;
                    si += 1;
                    continue;
                }
                c if c == s[si] => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((after, covered)) => {
                pi = after;
                si = covered + 1;
                star = Some((after, covered + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// A `[...]` class at the start of `p` against `c`: (whether it matches, the class's length).
fn class(p: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(p.get(1), Some(b'!' | b'^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == b']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if i + 2 < p.len() && p[i + 1] == b'-' && p[i + 2] != b']' {
            matched |= (p[i]..=p[i + 2]).contains(&c);
            i += 3;
        } else {
            matched |= p[i] == c;
            i += 1;
        }
    }
    None
}

fn check_classes(part: &str) -> Result<(), String> {
    let b = part.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'[' {
            match class(&b[i..], 0) {
                Some((_, len)) => i += len,
                None => return Err("has a `[` without its `]`".into()),
            }
        } else {
            i += 1;
        }
    }
    Ok(())
}

/// `a{b,c}d{e,f}` → `abde`, `abdf`, `acde`, `acdf` (nested braces allowed).
fn expand_braces(p: &str) -> Result<Vec<String>, String> {
    let Some(open) = p.find('{') else {
        if p.contains('}') {
            return Err("has a `}` without its `{`".into());
        }
        return Ok(vec![p.to_string()]);
    };
    let bytes = p.as_bytes();
    let mut depth = 0;
    let mut close = None;
    let mut commas = Vec::new();
    for (i, &c) in bytes.iter().enumerate().skip(open) {
        match c {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    close = Some(i);
                    break;
                }
            }
            b',' if depth == 1 => commas.push(i),
            _ => {}
        }
    }
    let close = close.ok_or("has a `{` without its `}`")?;
    let (head, tail) = (&p[..open], &p[close + 1..]);
    let mut bounds = vec![open];
    bounds.extend(&commas);
    bounds.push(close);
    let mut out = Vec::new();
    for w in bounds.windows(2) {
        let alt = &p[w[0] + 1..w[1]];
        for rest in expand_braces(&format!("{alt}{tail}"))? {
            out.push(format!("{head}{rest}"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pattern: &str, path: &str) -> bool {
        Glob::new(pattern).expect("valid glob").matches(path)
    }

    #[test]
    fn names_match_at_any_depth_and_paths_from_the_root() {
        assert!(m("*.py", "a.py"));
        assert!(m("*.py", "src/deep/a.py"));
        assert!(!m("*.py", "a.pyc"));
        assert!(m("src/*.py", "src/a.py"));
        assert!(!m("src/*.py", "src/deep/a.py"));
        assert!(!m("src/*.py", "lib/src/a.py"));
        assert!(m("./src/*.py", "src/a.py"));
    }

    #[test]
    fn double_stars_span_directories_or_none() {
        assert!(m("src/**/*.py", "src/a.py"));
        assert!(m("src/**/*.py", "src/x/y/a.py"));
        assert!(m("**/test_*.py", "test_a.py"));
        assert!(m("**/test_*.py", "pkg/tests/test_a.py"));
        assert!(!m("src/**/*.py", "lib/a.py"));
        assert!(m("docs/**", "docs/a/b.md"));
    }

    #[test]
    fn classes_braces_and_question_marks() {
        assert!(m("file?.txt", "file1.txt"));
        assert!(!m("file?.txt", "file10.txt"));
        assert!(m("[a-c]*.go", "b_test.go"));
        assert!(!m("[!a-c]*.go", "b_test.go"));
        assert!(m("*.{ts,tsx}", "web/App.tsx"));
        assert!(m("*.{ts,tsx}", "web/api.ts"));
        assert!(!m("*.{ts,tsx}", "web/api.js"));
        assert!(m("{src,lib}/**/*.{c,h}", "lib/x/y.h"));
        assert!(m("a*b*c", "axxbyyc"));
        assert!(!m("a*b*c", "axxbyy"));
    }

    #[test]
    fn malformed_globs_name_their_problem() {
        for (bad, says) in [
            ("", "empty"),
            ("/etc/*.py", "absolute"),
            ("src/[ab.py", "`[`"),
            ("*.{py", "`{`"),
            ("src**/x", "whole path component"),
        ] {
            let e = Glob::new(bad).expect_err(bad);
            assert!(e.to_string().contains(says), "{bad}: {e}");
        }
    }
}
