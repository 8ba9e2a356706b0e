//! The answer formats of migrate and scaffold: what the prompt asks for, the constraint that
//! enforces it (structured outputs), and the parser that turns an answer into file content.
//!
//! - **Whole file**: the new file in one fenced code block. The Lark grammar
//!   ([`whole_file_grammar`]) admits exactly one block whose body cannot contain the fence, so
//!   generation stops at the closing fence instead of rambling on.
//! - **Edits**, for large files: JSON `{"edits": [{"search": "...", "replace": "..."}]}`
//!   ([`edits_schema`]); each search text must occur exactly once in the file as it stands after
//!   the edits before it.
//! - **File tree** (scaffold): JSON `{"files": [{"path": "...", "content": "..."}]}`
//!   ([`files_schema`]).
//!
//! Unconstrained answers (from a server without structured outputs, or hand-written) are read
//! as leniently as is safe: a whole file may also come as `{"content": "..."}`, edits as
//! `<<<<<<< SEARCH` / `=======` / `>>>>>>> REPLACE` blocks, a tree as `File: path` lines each
//! followed by a fenced block. Anything else is an error naming what was expected: an answer is
//! applied whole or not at all.

use serde_json::{json, Value};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AnswerError {
    #[error("the answer has no fenced code block")]
    NoBlock,
    #[error("the answer's code block is not closed")]
    Unclosed,
    #[error("the answer has {0} code blocks; expected the whole file in one")]
    SeveralBlocks(usize),
    #[error("edit {index}: {problem}")]
    Edit { index: usize, problem: String },
    #[error("the answer has no edits")]
    NoEdits,
    #[error("the answer is not the expected JSON: {0}")]
    Json(String),
    #[error("the answer lists no files")]
    NoFiles,
}

/// A search/replace edit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub search: String,
    pub replace: String,
}

/// A file of a scaffold answer, its path not yet checked (see [`crate::paths`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOut {
    pub path: String,
    pub content: String,
}

/// The fence for a file: three backticks, or one more than the longest run of backticks in it
/// (a Markdown file with code blocks is fenced with four).
pub fn fence(content: &str) -> String {
    let mut longest = 0;
    let mut run = 0;
    for c in content.chars() {
        if c == '`' {
            run += 1;
            longest = longest.max(run);
        } else {
            run = 0;
        }
    }
    "`".repeat((longest + 1).max(3))
}

/// A Lark grammar for exactly one fenced block: `` ```tag ``, a newline, a body without the
/// fence in it, a newline and the closing fence. Nothing may follow, so the answer ends there.
pub fn whole_file_grammar(fence: &str, tag: &str) -> String {
    let n = fence.len();
    // A body is runs of fewer than n backticks each followed by another character, then at most
    // n-1 trailing backticks: no run of n backticks anywhere.
    let step = format!("`{{0,{}}}[^`]", n - 1);
    let tag: String = tag
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '_'))
        .collect();
    format!(
        "start: FILE\nFILE: /{fence}{tag}\\n({step})*`{{0,{}}}\\n{fence}/\n",
        n - 1
    )
}

/// `{"edits": [{"search", "replace"}, …]}`, at least one.
pub fn edits_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "edits": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "properties": {
                        "search": {"type": "string", "minLength": 1},
                        "replace": {"type": "string"}
                    },
                    "required": ["search", "replace"],
                    "additionalProperties": false
                }
            }
        },
        "required": ["edits"],
        "additionalProperties": false
    })
}

/// `{"files": [{"path", "content"}, …]}`, 1 to 200 files.
pub fn files_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "files": {
                "type": "array",
                "minItems": 1,
                "maxItems": 200,
                "items": {
                    "type": "object",
                    "properties": {
                        "path": {"type": "string", "minLength": 1, "maxLength": 255},
                        "content": {"type": "string"}
                    },
                    "required": ["path", "content"],
                    "additionalProperties": false
                }
            }
        },
        "required": ["files"],
        "additionalProperties": false
    })
}

/// A fenced block of an answer: its opening line's index and body.
struct Block<'a> {
    /// The line just before the opening fence (scaffold's `File: path`).
    before: Option<&'a str>,
    body: String,
}

/// The fenced blocks of `text`. A block opens with a line of three or more backticks (and an
/// optional tag) and closes at the first line of at least as many backticks and nothing else.
fn blocks(text: &str) -> Result<Vec<Block<'_>>, AnswerError> {
    let lines: Vec<&str> = text.split('\n').collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim_start();
        let ticks = line.bytes().take_while(|&b| b == b'`').count();
        if ticks >= 3 && !line[ticks..].contains('`') {
            let close = (i + 1..lines.len()).find(|&j| {
                let l = lines[j].trim();
                l.len() >= ticks && l.bytes().all(|b| b == b'`')
            });
            let Some(close) = close else {
                return Err(AnswerError::Unclosed);
            };
            out.push(Block {
                before: i.checked_sub(1).map(|k| lines[k]),
                body: lines[i + 1..close].join("\n"),
            });
            i = close + 1;
        } else {
            i += 1;
        }
    }
    Ok(out)
}

/// Keeps the original's convention for the last newline: a file that ended with one (or was
/// empty) ends with one.
fn with_final_newline(mut body: String, original: &str) -> String {
    if (original.is_empty() || original.ends_with('\n'))
        && !body.is_empty()
        && !body.ends_with('\n')
    {
        body.push('\n');
    }
    body
}

/// The new content of a file from an answer in either format (whole file or edits, fenced,
/// JSON or edit blocks).
pub fn parse_file_answer(text: &str, original: &str) -> Result<String, AnswerError> {
    let trimmed = text.trim();
    if trimmed.starts_with('{') {
        let v: Value =
            serde_json::from_str(trimmed).map_err(|e| AnswerError::Json(e.to_string()))?;
        if let Some(content) = v.get("content").and_then(Value::as_str) {
            return Ok(content.to_string());
        }
        let edits = v.get("edits").and_then(Value::as_array).ok_or_else(|| {
            AnswerError::Json("expected {\"edits\": [...]} or {\"content\": \"...\"}".into())
        })?;
        let mut list = Vec::with_capacity(edits.len());
        for (i, e) in edits.iter().enumerate() {
            let field = |k: &str| {
                e.get(k)
                    .and_then(Value::as_str)
                    .map(String::from)
                    .ok_or(AnswerError::Edit {
                        index: i + 1,
                        problem: format!("no {k:?} string"),
                    })
            };
            list.push(Edit {
                search: field("search")?,
                replace: field("replace")?,
            });
        }
        return apply_edits(original, &list);
    }
    if text.contains("<<<<<<< SEARCH") {
        return apply_edits(original, &edit_blocks(text)?);
    }
    let mut found = blocks(text)?;
    match found.len() {
        0 => Err(AnswerError::NoBlock),
        1 => Ok(with_final_newline(found.remove(0).body, original)),
        n => Err(AnswerError::SeveralBlocks(n)),
    }
}

/// `<<<<<<< SEARCH` … `=======` … `>>>>>>> REPLACE` blocks.
fn edit_blocks(text: &str) -> Result<Vec<Edit>, AnswerError> {
    let mut edits = Vec::new();
    let mut lines = text.split('\n').peekable();
    while let Some(line) = lines.next() {
        if line.trim_end() != "<<<<<<< SEARCH" {
            continue;
        }
        let index = edits.len() + 1;
        let mut search = Vec::new();
        let mut replace = Vec::new();
        let mut in_replace = false;
        let mut closed = false;
        for l in lines.by_ref() {
            match l.trim_end() {
                "=======" if !in_replace => in_replace = true,
                ">>>>>>> REPLACE" if in_replace => {
                    closed = true;
                    break;
                }
                _ if in_replace => replace.push(l),
                _ => search.push(l),
            }
        }
        if !closed {
            return Err(AnswerError::Edit {
                index,
                problem: "not closed by `>>>>>>> REPLACE` (cut off at max_tokens?)".into(),
            });
        }
        // Lines end with newlines in the file; a block's last line has its own.
        let join = |v: Vec<&str>| {
            if v.is_empty() {
                String::new()
            } else {
                v.join("\n") + "\n"
            }
        };
        edits.push(Edit {
            search: join(search),
            replace: join(replace),
        });
    }
    Ok(edits)
}

/// Applies edits in order; each search text must occur exactly once in the text as it stands.
pub fn apply_edits(original: &str, edits: &[Edit]) -> Result<String, AnswerError> {
    if edits.is_empty() {
        return Err(AnswerError::NoEdits);
    }
    let mut text = original.to_string();
    for (i, e) in edits.iter().enumerate() {
        let index = i + 1;
        if e.search.is_empty() {
            if text.is_empty() {
                text = e.replace.clone();
                continue;
            }
            return Err(AnswerError::Edit {
                index,
                problem: "its search text is empty".into(),
            });
        }
        // A search text written without its last line's newline still matches that line.
        let search = if text.matches(e.search.as_str()).count() == 0 && e.search.ends_with('\n') {
            e.search.trim_end_matches('\n')
        } else {
            e.search.as_str()
        };
        match text.matches(search).count() {
            1 => {
                let at = text.find(search).unwrap_or(0);
                let replace = if search.len() < e.search.len() {
                    e.replace.trim_end_matches('\n')
                } else {
                    e.replace.as_str()
                };
                text.replace_range(at..at + search.len(), replace);
            }
            0 => {
                return Err(AnswerError::Edit {
                    index,
                    problem: format!("its search text is not in the file: {:?}", clip(&e.search, 80)),
                })
            }
            n => {
                return Err(AnswerError::Edit {
                    index,
                    problem: format!(
                        "its search text occurs {n} times; it must be unique (include more lines): {:?}",
                        clip(&e.search, 80)
                    ),
                })
            }
        }
    }
    Ok(text)
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n).collect::<String>() + "…"
    }
}

/// The files of a scaffold answer: JSON `{"files": [...]}`, or `File: path` / `### path` lines
/// each followed by a fenced block.
pub fn parse_files_answer(text: &str) -> Result<Vec<FileOut>, AnswerError> {
    let trimmed = text.trim();
    if trimmed.starts_with('{') {
        let v: Value =
            serde_json::from_str(trimmed).map_err(|e| AnswerError::Json(e.to_string()))?;
        let files = v
            .get("files")
            .and_then(Value::as_array)
            .ok_or_else(|| AnswerError::Json("expected {\"files\": [...]}".into()))?;
        let mut out = Vec::with_capacity(files.len());
        for (i, f) in files.iter().enumerate() {
            let field = |k: &str| {
                f.get(k)
                    .and_then(Value::as_str)
                    .map(String::from)
                    .ok_or_else(|| AnswerError::Json(format!("file {}: no {k:?} string", i + 1)))
            };
            out.push(FileOut {
                path: field("path")?,
                content: field("content")?,
            });
        }
        if out.is_empty() {
            return Err(AnswerError::NoFiles);
        }
        return Ok(out);
    }
    let mut out = Vec::new();
    for b in blocks(text)? {
        let Some(name) = b.before.and_then(file_label) else {
            continue;
        };
        let content = with_final_newline(b.body, "");
        out.push(FileOut {
            path: name.to_string(),
            content,
        });
    }
    if out.is_empty() {
        return Err(AnswerError::NoFiles);
    }
    Ok(out)
}

/// `File: src/main.go`, `### src/main.go` or `` **`src/main.go`** `` → the path.
fn file_label(line: &str) -> Option<&str> {
    let l = line.trim();
    let l = l
        .strip_prefix("File:")
        .or_else(|| l.strip_prefix("file:"))
        .or_else(|| l.starts_with('#').then(|| l.trim_start_matches('#')))
        .unwrap_or(l)
        .trim()
        .trim_matches(|c| c == '*' || c == '`')
        .trim();
    (!l.is_empty() && !l.contains(char::is_whitespace)).then_some(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fences_outgrow_the_backticks_inside() {
        assert_eq!(fence("print(1)\n"), "```");
        assert_eq!(fence("Use:\n```sh\nmake\n```\n"), "````");
    }

    #[test]
    fn a_whole_file_comes_from_its_one_block() {
        let a = "Here it is:\n```python\nprint(\"hi\")\n```\nDone.";
        assert_eq!(
            parse_file_answer(a, "print 'hi'\n").expect("parses"),
            "print(\"hi\")\n"
        );
        // No final newline in the original: none added.
        assert_eq!(
            parse_file_answer(a, "print 'hi'").expect("parses"),
            "print(\"hi\")"
        );
        // A four-backtick fence carries a Markdown file's own fences.
        let md = "````markdown\n# T\n```sh\nmake\n```\n````";
        assert_eq!(
            parse_file_answer(md, "x\n").expect("parses"),
            "# T\n```sh\nmake\n```\n"
        );
        assert_eq!(
            parse_file_answer(r#"{"content": "a = 1\n"}"#, "a=1\n").expect("json"),
            "a = 1\n"
        );
    }

    #[test]
    fn half_answers_are_refused_whole() {
        assert_eq!(
            parse_file_answer("I think so.", "x"),
            Err(AnswerError::NoBlock)
        );
        assert_eq!(
            parse_file_answer("```py\nprint(1)\n", "x"),
            Err(AnswerError::Unclosed)
        );
        assert_eq!(
            parse_file_answer("```\na\n```\n```\nb\n```", "x"),
            Err(AnswerError::SeveralBlocks(2))
        );
        assert!(matches!(
            parse_file_answer("{\"edits\": [", "x"),
            Err(AnswerError::Json(_))
        ));
    }

    #[test]
    fn edits_apply_in_order_and_must_be_unique() {
        let file = "def a():\n    return 1\n\ndef b():\n    return 1\n";
        let json = r#"{"edits": [{"search": "def a():\n    return 1\n", "replace": "def a():\n    return 2\n"}]}"#;
        assert_eq!(
            parse_file_answer(json, file).expect("applies"),
            "def a():\n    return 2\n\ndef b():\n    return 1\n"
        );
        let ambiguous = r#"{"edits": [{"search": "return 1", "replace": "return 3"}]}"#;
        let e = parse_file_answer(ambiguous, file).expect_err("twice");
        assert!(
            e.to_string().contains("edit 1") && e.to_string().contains("2 times"),
            "{e}"
        );
        let missing = r#"{"edits": [{"search": "def a", "replace": "def z"}, {"search": "def q", "replace": "x"}]}"#;
        let e = parse_file_answer(missing, file).expect_err("not found");
        assert!(
            e.to_string()
                .starts_with("edit 2: its search text is not in the file"),
            "{e}"
        );
        let blocks = "<<<<<<< SEARCH\ndef b():\n=======\ndef bee():\n>>>>>>> REPLACE\n";
        assert_eq!(
            parse_file_answer(blocks, file).expect("blocks"),
            "def a():\n    return 1\n\ndef bee():\n    return 1\n"
        );
        let cut = "<<<<<<< SEARCH\ndef b():\n=======\ndef bee";
        assert!(parse_file_answer(cut, file)
            .expect_err("cut")
            .to_string()
            .contains("not closed"));
    }

    #[test]
    fn trees_come_as_json_or_labelled_blocks() {
        let j = r#"{"files": [{"path": "go.mod", "content": "module x\n"}]}"#;
        assert_eq!(
            parse_files_answer(j).expect("json"),
            vec![FileOut {
                path: "go.mod".into(),
                content: "module x\n".into()
            }]
        );
        let t = "File: main.go\n```go\npackage main\n```\n### `README.md`\n```\nhi\n```\n";
        let files = parse_files_answer(t).expect("blocks");
        assert_eq!(files.len(), 2);
        assert_eq!(
            files[0],
            FileOut {
                path: "main.go".into(),
                content: "package main\n".into()
            }
        );
        assert_eq!(files[1].path, "README.md");
        assert_eq!(parse_files_answer("```\nx\n```"), Err(AnswerError::NoFiles));
        assert_eq!(
            parse_files_answer(r#"{"files": []}"#),
            Err(AnswerError::NoFiles)
        );
    }

    #[test]
    fn the_whole_file_grammar_names_the_fence_twice() {
        let g = whole_file_grammar("````", "markdown");
        assert!(g.starts_with("start: FILE\nFILE: /````markdown\\n"), "{g}");
        assert!(
            g.contains("`{0,3}[^`]") && g.trim_end().ends_with("\\n````/"),
            "{g}"
        );
    }
}
