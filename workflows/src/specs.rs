//! Scaffold's spec files: one service (or project) per row, as JSONL objects or CSV with a
//! header. Every row needs a `name`, which names its tree (`OUT/<name>/`): one path component of
//! letters, digits, `.`, `_` and `-`, not starting with `.` (`OUT/.gristmill/` is scaffold's own). A bad row fails alone; the others still run.

use std::collections::BTreeMap;

/// A row's fields, or why it has none.
type Fields = Result<BTreeMap<String, String>, String>;

/// One row: its line number and its fields, or why it cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub line: usize,
    pub spec: Result<Spec, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub name: String,
    pub fields: BTreeMap<String, String>,
}

/// Reads a spec file's text; `csv` picks the format (else JSONL). A file-level problem (a CSV
/// without a header, an unclosed quote) is an `Err`; a row's is in its `Row`.
pub fn parse(text: &str, csv: bool) -> Result<Vec<Row>, String> {
    let rows: Vec<(usize, Fields)> = if csv {
        parse_csv(text)?
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| (i + 1, jsonl_row(l)))
            .collect()
    };
    let mut seen = std::collections::HashSet::new();
    Ok(rows
        .into_iter()
        .map(|(line, fields)| {
            let spec = fields.and_then(|fields| {
                let name = fields
                    .get("name")
                    .filter(|n| !n.trim().is_empty())
                    .ok_or("has no `name` (it names the tree: OUT/<name>/)")?
                    .clone();
                if !is_safe_name(&name) {
                    return Err(format!(
                        "name {name:?} must be one path component of letters, digits, `.`, `_` and `-`, not starting with `.`"
                    ));
                }
                if !seen.insert(name.clone()) {
                    return Err(format!("name {name:?} is used by an earlier row"));
                }
                Ok(Spec { name, fields })
            });
            Row { line, spec }
        })
        .collect())
}

fn is_safe_name(n: &str) -> bool {
    !n.starts_with('.')
        && n.len() <= 100
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn jsonl_row(line: &str) -> Result<BTreeMap<String, String>, String> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("is not valid JSON: {e}"))?;
    let obj = v.as_object().ok_or("is not a JSON object")?;
    Ok(obj
        .iter()
        .map(|(k, v)| {
            let s = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), s)
        })
        .collect())
}

/// RFC 4180: a header row, then records; quoted fields may hold commas, quotes (doubled) and
/// newlines.
fn parse_csv(text: &str) -> Result<Vec<(usize, Fields)>, String> {
    let mut records: Vec<(usize, Vec<String>)> = Vec::new();
    let mut field = String::new();
    let mut record = Vec::new();
    let mut line = 1;
    let mut record_line = 1;
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                '\n' => {
                    line += 1;
                    field.push('\n');
                }
                c => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() => quoted = true,
            ',' => record.push(std::mem::take(&mut field)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                record.push(std::mem::take(&mut field));
                records.push((record_line, std::mem::take(&mut record)));
                line += 1;
                record_line = line;
            }
            c => field.push(c),
        }
    }
    if quoted {
        return Err(format!("line {record_line}: a quoted field is not closed"));
    }
    if !field.is_empty() || !record.is_empty() {
        record.push(field);
        records.push((record_line, record));
    }
    records.retain(|(_, r)| !(r.len() == 1 && r[0].trim().is_empty()));
    let mut it = records.into_iter();
    let (_, header) = it
        .next()
        .ok_or("the CSV file is empty (it needs a header row)")?;
    let header: Vec<String> = header.into_iter().map(|h| h.trim().to_string()).collect();
    if !header.iter().any(|h| h == "name") {
        return Err(format!(
            "the CSV header has no `name` column: {}",
            header.join(",")
        ));
    }
    Ok(it
        .map(|(line, r)| {
            if r.len() != header.len() {
                return (
                    line,
                    Err(format!(
                        "has {} fields; the header has {}",
                        r.len(),
                        header.len()
                    )),
                );
            }
            (line, Ok(header.iter().cloned().zip(r).collect()))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_rows_with_quotes_commas_and_newlines() {
        let text = "name,language,description\r\nbilling,go,\"Bills, \"\"monthly\"\"\"\nusers,python,\"two\nlines\"\n";
        let rows = parse(text, true).expect("parses");
        assert_eq!(rows.len(), 2);
        let billing = rows[0].spec.as_ref().expect("ok");
        assert_eq!(billing.name, "billing");
        assert_eq!(billing.fields["description"], "Bills, \"monthly\"");
        assert_eq!(rows[1].line, 3);
        assert_eq!(
            rows[1].spec.as_ref().expect("ok").fields["description"],
            "two\nlines"
        );
    }

    #[test]
    fn bad_rows_fail_alone_and_say_why() {
        let text = "{\"name\": \"a\", \"port\": 8080}\nnot json\n{\"port\": 1}\n{\"name\": \"../x\"}\n{\"name\": \"a\"}\n{\"name\": \"b\"}\n";
        let rows = parse(text, false).expect("parses");
        assert_eq!(rows.len(), 6);
        assert_eq!(rows[0].spec.as_ref().expect("ok").fields["port"], "8080");
        assert!(rows[1]
            .spec
            .as_ref()
            .expect_err("json")
            .contains("not valid JSON"));
        assert!(rows[2]
            .spec
            .as_ref()
            .expect_err("no name")
            .contains("no `name`"));
        assert!(rows[3]
            .spec
            .as_ref()
            .expect_err("path")
            .contains("one path component"));
        assert!(rows[4]
            .spec
            .as_ref()
            .expect_err("dup")
            .contains("earlier row"));
        assert!(rows[5].spec.is_ok());
        assert!(parse("a,b\n1,2\n", true)
            .expect_err("no name")
            .contains("no `name` column"));
        assert!(parse("name\n\"x\n", true)
            .expect_err("open")
            .contains("not closed"));
        let short = parse("name,port\nsvc\n", true).expect("parses");
        assert!(short[0]
            .spec
            .as_ref()
            .expect_err("short")
            .contains("1 fields"));
    }
}
