//! `{placeholder}` templates, for migrate's instruction (`{path}`, `{language}`, `{content}`)
//! and scaffold's template (the spec's fields).
//!
//! Only `{name}` with `name` an identifier (letters, digits, `_`, `-`, `.`; not starting with a
//! digit) is a placeholder, so code in a template (`func() { return }`, JSON) stays as written.
//! `{{name}}` writes a literal `{name}`.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("the template uses {} that {} no value: {}", if .0.len() == 1 { "a placeholder" } else { "placeholders" }, if .0.len() == 1 { "has" } else { "have" }, .0.iter().map(|n| format!("{{{n}}}")).collect::<Vec<_>>().join(", "))]
    Missing(Vec<String>),
}

/// A piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece<'a> {
    Text(&'a str),
    Hole(&'a str),
}

fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn pieces(t: &str) -> Vec<Piece<'_>> {
    let mut out = Vec::new();
    let mut rest = t;
    let mut text_start = 0;
    let mut pos = 0;
    while let Some(i) = rest.find('{') {
        let at = pos + i;
        let after = &t[at + 1..];
        // `{{name}}`: a literal `{name}`.
        if let Some(inner) = after.strip_prefix('{') {
            if let Some(end) = inner.find("}}") {
                if is_name(&inner[..end]) {
                    out.push(Piece::Text(&t[text_start..at]));
                    out.push(Piece::Text(&t[at + 1..at + 2 + end + 1]));
                    pos = at + 2 + end + 2;
                    text_start = pos;
                    rest = &t[pos..];
                    continue;
                }
            }
        }
        if let Some(end) = after.find('}') {
            if is_name(&after[..end]) {
                out.push(Piece::Text(&t[text_start..at]));
                out.push(Piece::Hole(&after[..end]));
                pos = at + 1 + end + 1;
                text_start = pos;
                rest = &t[pos..];
                continue;
            }
        }
        pos = at + 1;
        rest = &t[pos..];
    }
    out.push(Piece::Text(&t[text_start..]));
    out.retain(|p| *p != Piece::Text(""));
    out
}

/// The placeholders a template uses, in order of first use.
pub fn placeholders(template: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for p in pieces(template) {
        if let Piece::Hole(n) = p {
            if !names.iter().any(|x| x == n) {
                names.push(n.to_string());
            }
        }
    }
    names
}

/// Fills every placeholder from `value`; a placeholder without a value is an error naming it.
pub fn render(
    template: &str,
    value: impl Fn(&str) -> Option<String>,
) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len());
    let mut missing = Vec::new();
    for p in pieces(template) {
        match p {
            Piece::Text(t) => out.push_str(t),
            Piece::Hole(n) => match value(n) {
                Some(v) => out.push_str(&v),
                None => {
                    if !missing.iter().any(|m: &String| m == n) {
                        missing.push(n.to_string());
                    }
                }
            },
        }
    }
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(TemplateError::Missing(missing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(n: &str) -> Option<String> {
        match n {
            "path" => Some("src/a.py".into()),
            "language" => Some("Python".into()),
            _ => None,
        }
    }

    #[test]
    fn placeholders_fill_and_code_braces_stay() {
        let t =
            "Port {path} ({language}). Keep `def f(): return {}` and {not a name} and {{path}}.";
        assert_eq!(
            render(t, vars).expect("renders"),
            "Port src/a.py (Python). Keep `def f(): return {}` and {not a name} and {path}."
        );
        assert_eq!(placeholders(t), vec!["path", "language"]);
        assert_eq!(
            render("func() { return x }", vars).expect("renders"),
            "func() { return x }"
        );
    }

    #[test]
    fn missing_values_are_named_once_each() {
        let e = render("{service} on {port}, {service}", vars).expect_err("missing");
        assert_eq!(
            e,
            TemplateError::Missing(vec!["service".into(), "port".into()])
        );
        assert!(e.to_string().contains("{service}, {port}"), "{e}");
    }
}
