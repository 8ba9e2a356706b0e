//! The report of a migrate or scaffold run: JSON for machines (`--report PATH.json`) and a
//! static HTML page beside it for people — the summary, a bar per status, the table, and each
//! file's diff (or each tree's files) — with no scripts or outside links, readable offline.

use serde::Serialize;

/// How one file (migrate) or one tree (scaffold) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Changed, verified if a verifier was given, and in the branch, worktree, patch or tree.
    Applied,
    /// The model's answer left the file as it was.
    NoChange,
    /// No attempt produced an answer that parsed, applied and verified.
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Applied => "applied",
            Status::NoChange => "no_change",
            Status::Failed => "failed",
        }
    }
}

/// One request and what became of its answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attempt {
    pub attempt: usize,
    pub seed: u64,
    /// Served from the cache: no request was sent.
    pub cached: bool,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// `stop`, `length`, or `error` when the request itself failed.
    pub finish_reason: String,
    /// `applied`, `no_change`, or what went wrong (`unparsable: …`, `verify failed (exit 1)`).
    pub outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_exit: Option<i32>,
}

/// A file a scaffold tree wrote or kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TreeFile {
    pub path: String,
    /// `written`, `kept` (it existed; no `--force`) or `unchanged`.
    pub written: String,
    pub bytes: usize,
    #[serde(skip)]
    pub content: String,
}

/// One file (migrate) or tree (scaffold).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Item {
    pub path: String,
    pub status: Status,
    pub attempts: usize,
    /// Every attempt came from the cache.
    pub cached: bool,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// The tail of the last verifier run's output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_output: Option<String>,
    /// Why it failed, or a note (a binary file, a spec row's problem).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub history: Vec<Attempt>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<TreeFile>,
    /// The unified diff of the last answer against the file (HTML only; the patch has it too).
    #[serde(skip)]
    pub diff: String,
}

impl Item {
    pub fn new(path: impl Into<String>) -> Item {
        Item {
            path: path.into(),
            status: Status::Failed,
            attempts: 0,
            cached: false,
            prompt_tokens: 0,
            completion_tokens: 0,
            verify_output: None,
            error: None,
            history: Vec::new(),
            files: Vec::new(),
            diff: String::new(),
        }
    }

    /// Adds an attempt and its tokens.
    pub fn push(&mut self, a: Attempt) {
        self.prompt_tokens += a.prompt_tokens;
        self.completion_tokens += a.completion_tokens;
        self.history.push(a);
        self.attempts = self.history.len();
        self.cached = self.history.iter().all(|a| a.cached);
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub total: usize,
    pub applied: usize,
    pub no_change: usize,
    pub failed: usize,
    /// Requests sent to the model (cache misses).
    pub requests_sent: usize,
    /// Answers served from the cache.
    pub cache_hits: usize,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `migrate` or `scaffold`.
    pub kind: String,
    /// The model's identity as the cache keys it.
    pub model: String,
    pub summary: Summary,
    /// What the run produced: `branch`, `commit`, `worktree`, `patch`, `out`, `cache`.
    pub outputs: serde_json::Map<String, serde_json::Value>,
    /// The settings it ran with (instruction, verifier, attempts, sampling).
    pub settings: serde_json::Map<String, serde_json::Value>,
    pub items: Vec<Item>,
}

impl Report {
    pub fn new(kind: &str, model: &str) -> Report {
        Report {
            kind: kind.into(),
            model: model.into(),
            summary: Summary::default(),
            outputs: Default::default(),
            settings: Default::default(),
            items: Vec::new(),
        }
    }

    /// Recounts the summary from the items (requests and cache hits from their attempts).
    pub fn tally(&mut self) {
        let mut s = Summary {
            total: self.items.len(),
            ..Summary::default()
        };
        for i in &self.items {
            match i.status {
                Status::Applied => s.applied += 1,
                Status::NoChange => s.no_change += 1,
                Status::Failed => s.failed += 1,
            }
            for a in &i.history {
                if a.cached {
                    s.cache_hits += 1;
                } else {
                    s.requests_sent += 1;
                }
            }
            s.prompt_tokens += i.prompt_tokens;
            s.completion_tokens += i.completion_tokens;
        }
        self.summary = s;
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The static HTML page.
    pub fn to_html(&self) -> String {
        let s = &self.summary;
        let mut h = String::new();
        h.push_str("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n");
        h.push_str(&format!(
            "<title>gristmill {} report</title>\n<style>{STYLE}</style></head><body>\n",
            esc(&self.kind)
        ));
        h.push_str(&format!(
            "<h1>gristmill {}</h1>\n<p class=\"meta\">model <code>{}</code> · {} {} · {} requests sent, {} answers from the cache · {} prompt + {} generated tokens</p>\n",
            esc(&self.kind),
            esc(&self.model),
            s.total,
            if self.kind == "scaffold" { "trees" } else { "files" },
            s.requests_sent,
            s.cache_hits,
            s.prompt_tokens,
            s.completion_tokens
        ));
        if !self.outputs.is_empty() {
            h.push_str("<ul class=\"outputs\">");
            for (k, v) in &self.outputs {
                let v = v.as_str().map_or_else(|| v.to_string(), String::from);
                h.push_str(&format!("<li>{}: <code>{}</code></li>", esc(k), esc(&v)));
            }
            h.push_str("</ul>\n");
        }
        // One bar per status, as wide as its share.
        h.push_str("<table class=\"bars\">");
        for (status, n) in [
            (Status::Applied, s.applied),
            (Status::NoChange, s.no_change),
            (Status::Failed, s.failed),
        ] {
            let pct = if s.total == 0 {
                0.0
            } else {
                100.0 * n as f64 / s.total as f64
            };
            h.push_str(&format!(
                "<tr><th>{}</th><td><div class=\"bar {}\" style=\"width:{pct:.1}%\"></div></td><td class=\"n\">{n}</td></tr>",
                status.as_str(),
                status.as_str()
            ));
        }
        h.push_str("</table>\n");
        h.push_str("<table class=\"items\"><thead><tr><th>path</th><th>status</th><th>attempts</th><th>cached</th><th>prompt tokens</th><th>completion tokens</th></tr></thead><tbody>\n");
        for (i, it) in self.items.iter().enumerate() {
            h.push_str(&format!(
                "<tr><td><a href=\"#item{i}\"><code>{}</code></a></td><td class=\"{}\">{}</td><td class=\"n\">{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>\n",
                esc(&it.path),
                it.status.as_str(),
                it.status.as_str(),
                it.attempts,
                if it.cached { "yes" } else { "no" },
                it.prompt_tokens,
                it.completion_tokens
            ));
        }
        h.push_str("</tbody></table>\n");
        for (i, it) in self.items.iter().enumerate() {
            h.push_str(&format!(
                "<section id=\"item{i}\"><h2><code>{}</code> <span class=\"{}\">{}</span></h2>\n",
                esc(&it.path),
                it.status.as_str(),
                it.status.as_str()
            ));
            if let Some(e) = &it.error {
                h.push_str(&format!("<p class=\"error\">{}</p>\n", esc(e)));
            }
            if !it.history.is_empty() {
                h.push_str("<ol class=\"attempts\">");
                for a in &it.history {
                    h.push_str(&format!(
                        "<li>seed {}{}: {} ({} + {} tokens, {})</li>",
                        a.seed,
                        if a.cached { ", cached" } else { "" },
                        esc(&a.outcome),
                        a.prompt_tokens,
                        a.completion_tokens,
                        esc(&a.finish_reason)
                    ));
                }
                h.push_str("</ol>\n");
            }
            if !it.diff.is_empty() {
                h.push_str("<pre class=\"diff\">");
                for line in it.diff.lines() {
                    let class = match line.as_bytes().first() {
                        _ if line.starts_with("+++") || line.starts_with("---") => "h",
                        Some(b'+') => "add",
                        Some(b'-') => "del",
                        Some(b'@') => "hunk",
                        _ => "ctx",
                    };
                    h.push_str(&format!("<span class=\"{class}\">{}</span>\n", esc(line)));
                }
                h.push_str("</pre>\n");
            }
            for f in &it.files {
                h.push_str(&format!(
                    "<details><summary><code>{}</code> ({}, {} bytes)</summary><pre>{}</pre></details>\n",
                    esc(&f.path),
                    esc(&f.written),
                    f.bytes,
                    esc(&clip_bytes(&f.content, 20_000))
                ));
            }
            if let Some(v) = &it.verify_output {
                h.push_str(&format!(
                    "<details><summary>verifier output (last attempt)</summary><pre>{}</pre></details>\n",
                    esc(v)
                ));
            }
            h.push_str("</section>\n");
        }
        h.push_str("</body></html>\n");
        h
    }
}

/// At most `n` bytes of `s`, cut at a character boundary, with a note when cut.
pub fn clip_bytes(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut end = n;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}\n… ({} more bytes)", &s[..end], s.len() - end)
}

/// The last `n` bytes of `s` (a verifier's output), cut at a character boundary.
pub fn tail(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut start = s.len() - n;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("… ({} bytes before)\n{}", start, &s[start..])
}

/// HTML-escapes text.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:72em;padding:0 1em;color:#222}\
code,pre{font-family:ui-monospace,Menlo,Consolas,monospace}\
.meta{color:#555}\
table.bars{width:40em;border-collapse:collapse}table.bars th{text-align:left;width:7em;font-weight:normal}\
table.bars td{padding:2px 0}.bar{height:14px;min-width:1px}\
.bar.applied{background:#2e7d32}.bar.no_change{background:#9e9e9e}.bar.failed{background:#c62828}\
td.applied,span.applied{color:#2e7d32}td.failed,span.failed{color:#c62828}td.no_change,span.no_change{color:#757575}\
table.items{border-collapse:collapse;margin:1em 0}table.items th,table.items td{border-bottom:1px solid #ddd;padding:3px 10px;text-align:left}\
td.n{text-align:right}\
section{border-top:1px solid #ccc;margin-top:1.5em}h2{font-size:1.05em}\
pre{background:#f6f8fa;padding:.6em;overflow:auto;max-height:40em}\
pre.diff .add{color:#1b5e20;background:#e8f5e9}pre.diff .del{color:#b71c1c;background:#ffebee}\
pre.diff .hunk{color:#6a1b9a}pre.diff .h{color:#555;font-weight:bold}\
.error{color:#c62828}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_escapes_everything_the_model_wrote() {
        let mut r = Report::new("migrate", "m");
        let mut it = Item::new("src/<script>.py");
        it.push(Attempt {
            attempt: 1,
            seed: 0,
            cached: false,
            prompt_tokens: 10,
            completion_tokens: 5,
            finish_reason: "stop".into(),
            outcome: "applied".into(),
            verify_exit: Some(0),
        });
        it.status = Status::Applied;
        it.diff = "--- a/x\n+++ b/x\n@@ -1 +1 @@\n-<b>\n+</b>\n".into();
        r.items.push(it);
        r.items.push(Item::new("b.py"));
        r.tally();
        assert_eq!(
            (r.summary.applied, r.summary.failed, r.summary.requests_sent),
            (1, 1, 1)
        );
        let html = r.to_html();
        assert!(!html.contains("<script>") && html.contains("&lt;script&gt;"));
        assert!(html.contains("<span class=\"add\">+&lt;/b&gt;</span>"));
        assert!(html.contains("width:50.0%"));
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
        assert_eq!(json["items"][0]["status"], "applied");
        assert_eq!(json["items"][1]["status"], "failed");
        assert!(json["items"][0].get("diff").is_none());
    }

    #[test]
    fn tails_and_clips_cut_at_characters() {
        assert_eq!(tail("abc", 10), "abc");
        assert!(tail("ééééé", 3).ends_with('é'));
        assert!(clip_bytes("ééééé", 3).starts_with('é'));
    }
}
