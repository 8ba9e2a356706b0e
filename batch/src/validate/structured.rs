//! The structured-output fields of a line: OpenAI's `response_format`, vLLM's
//! `structured_outputs` object and `guided_*` fields, and `tools` with `tool_choice`. Each
//! becomes at most one [`Constraint`], compiled here by `gristmill_structured::check`, so a
//! constraint llguidance rejects is the line's error before the batch runs.

use gristmill_protocol::{codes, Constraint, Endpoint, LineError, ToolChoice, Tools};
use serde_json::Value;

use super::{type_name, Fields};

/// The fields that may constrain the output, besides `response_format`: vLLM's
/// `structured_outputs` object and its older `guided_*` spellings.
const STRUCTURED_OUTPUTS_KEYS: [&str; 5] = ["json", "regex", "choice", "grammar", "json_object"];
const GUIDED_FIELDS: [&str; 4] = [
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
];

/// The longest compiler message quoted in an error line.
const MAX_REASON_BYTES: usize = 600;

impl Fields<'_> {
    /// The request's structured-output constraint: OpenAI's `response_format`, vLLM's
    /// `structured_outputs` object, or vLLM's older `guided_json`/`guided_regex`/
    /// `guided_choice`/`guided_grammar` fields; at most one of them. Compiled here, so a
    /// constraint llguidance rejects is this line's error before the batch runs.
    pub(super) fn constraint(&self) -> Result<Option<Constraint>, LineError> {
        let mut found: Vec<(String, Constraint)> = Vec::new();
        if let Some(c) = self.response_format()? {
            found.push(c);
        }
        if let Some(so) = self.present("structured_outputs") {
            let Value::Object(so) = so else {
                return Err(self.err(
                    "structured_outputs",
                    format!("expected an object, got {}", type_name(so)),
                ));
            };
            for (key, v) in so {
                let field = format!("structured_outputs.{key}");
                if v.is_null() || v == &Value::Bool(false) && key == "json_object" {
                    continue;
                }
                if !STRUCTURED_OUTPUTS_KEYS.contains(&key.as_str()) {
                    return Err(self.err(
                        &field,
                        format!(
                            "is not supported; structured_outputs takes one of {}",
                            STRUCTURED_OUTPUTS_KEYS.join(", ")
                        ),
                    ));
                }
                found.push((field.clone(), self.constraint_field(&field, key, v)?));
            }
        }
        for name in GUIDED_FIELDS {
            if let Some(v) = self.present(name) {
                let kind = name.trim_start_matches("guided_");
                found.push((name.to_string(), self.constraint_field(name, kind, v)?));
            }
        }
        match found.len() {
            0 => Ok(None),
            1 => {
                let (field, c) = found.remove(0);
                self.compiles(&field, c).map(Some)
            }
            _ => Err(self.err(
                &found[1].0,
                format!(
                    "and body.{} both constrain the output; give only one",
                    found[0].0
                ),
            )),
        }
    }

    /// OpenAI's `tools` and `tool_choice` (chat only). A call is honoured when it is forced
    /// (`"required"` or a named function), where the call's JSON is enforced; `"none"` only
    /// shows the tools to the model. `"auto"` would need the model's own tool-call syntax
    /// parsed back out of free text, which Gristmill does not do: it is an error, not a
    /// silent plain-text answer.
    pub(super) fn tools(&self, endpoint: Endpoint) -> Result<Option<Tools>, LineError> {
        let tools = self.present("tools");
        let choice = self.present("tool_choice");
        let Some(tools) = tools else {
            if choice.is_some() {
                return Err(self.err("tool_choice", "needs \"tools\"".into()));
            }
            return Ok(None);
        };
        if endpoint != Endpoint::ChatCompletions {
            return Err(self.err("tools", "is only for /v1/chat/completions".into()));
        }
        let Value::Array(list) = tools else {
            return Err(self.err(
                "tools",
                format!("expected an array, got {}", type_name(tools)),
            ));
        };
        if list.is_empty() {
            return Err(self.err("tools", "must contain at least one tool".into()));
        }
        let mut names: Vec<&str> = Vec::new();
        for (i, t) in list.iter().enumerate() {
            let field = format!("tools[{i}]");
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(self.err(&format!("{field}.type"), "must be \"function\"".into()));
            }
            let Some(Value::Object(f)) = t.get("function") else {
                return Err(self.err(&format!("{field}.function"), "must be an object".into()));
            };
            match f.get("name").and_then(Value::as_str) {
                Some(n) if valid_name(n) => {
                    if names.contains(&n) {
                        return Err(self.err(
                            &format!("{field}.function.name"),
                            format!("{n:?} is used by an earlier tool"),
                        ));
                    }
                    names.push(n);
                }
                _ => {
                    return Err(self.err(
                        &format!("{field}.function.name"),
                        "must be 1 to 64 letters, digits, underscores or dashes".into(),
                    ))
                }
            }
            match f.get("parameters") {
                None | Some(Value::Null | Value::Object(_)) => {}
                Some(other) => {
                    return Err(self.err(
                        &format!("{field}.function.parameters"),
                        format!("expected a JSON Schema object, got {}", type_name(other)),
                    ))
                }
            }
        }
        let choice = match choice {
            None => None,
            Some(Value::String(c)) if c == "none" => Some(ToolChoice::None),
            Some(Value::String(c)) if c == "required" => Some(ToolChoice::Required),
            Some(Value::String(c)) if c == "auto" => None,
            Some(Value::Object(c)) => {
                let name = c
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str);
                match name {
                    Some(n) if names.contains(&n) => Some(ToolChoice::Function(n.to_string())),
                    Some(n) => {
                        return Err(self.err(
                            "tool_choice.function.name",
                            format!("{n:?} is not one of the tools ({})", names.join(", ")),
                        ))
                    }
                    None => {
                        return Err(self.err(
                            "tool_choice",
                            "expected {\"type\": \"function\", \"function\": {\"name\": …}}".into(),
                        ))
                    }
                }
            }
            Some(other) => {
                return Err(self.err(
                    "tool_choice",
                    format!("expected \"none\", \"required\" or a named function, got {other}"),
                ))
            }
        };
        let Some(choice) = choice else {
            return Err(self.err(
                "tool_choice",
                "\"auto\" (the default when tools are given) is not supported: Gristmill makes \
                 a tool call only when it is forced; set \"required\", name a function with \
                 {\"type\": \"function\", \"function\": {\"name\": …}}, or \"none\""
                    .into(),
            ));
        };
        Ok(Some(Tools {
            definitions: list.clone(),
            choice,
        }))
    }

    /// OpenAI's `response_format`: `text`, `json_object` or `json_schema`.
    fn response_format(&self) -> Result<Option<(String, Constraint)>, LineError> {
        let Some(rf) = self.present("response_format") else {
            return Ok(None);
        };
        let Value::Object(rf) = rf else {
            return Err(self.err(
                "response_format",
                format!("expected an object, got {}", type_name(rf)),
            ));
        };
        match rf.get("type") {
            Some(Value::String(t)) if t == "text" => Ok(None),
            Some(Value::String(t)) if t == "json_object" => {
                Ok(Some(("response_format".into(), Constraint::JsonObject)))
            }
            Some(Value::String(t)) if t == "json_schema" => {
                let field = "response_format.json_schema";
                let js = match rf.get("json_schema") {
                    Some(Value::Object(js)) => js,
                    Some(other) => {
                        return Err(self.err(
                            field,
                            format!("expected an object, got {}", type_name(other)),
                        ))
                    }
                    None => {
                        return Err(self.err(
                            field,
                            "is missing; \"type\": \"json_schema\" needs \"json_schema\": \
                             {\"name\", \"schema\", \"strict\"}"
                                .into(),
                        ))
                    }
                };
                match js.get("name") {
                    Some(Value::String(n)) if valid_name(n) => {}
                    Some(Value::String(n)) => {
                        return Err(self.err(
                            &format!("{field}.name"),
                            format!("{n:?} must be 1 to 64 letters, digits, underscores or dashes"),
                        ))
                    }
                    Some(other) => {
                        return Err(self.err(
                            &format!("{field}.name"),
                            format!("expected a string, got {}", type_name(other)),
                        ))
                    }
                    None => return Err(self.err(&format!("{field}.name"), "is missing".into())),
                }
                if let Some(strict) = js.get("strict").filter(|v| !v.is_null() && !v.is_boolean()) {
                    return Err(self.err(
                        &format!("{field}.strict"),
                        format!("expected a boolean, got {}", type_name(strict)),
                    ));
                }
                let schema_field = format!("{field}.schema");
                match js.get("schema") {
                    Some(schema @ (Value::Object(_) | Value::Bool(_))) => Ok(Some((
                        schema_field,
                        Constraint::JsonSchema {
                            schema: schema.clone(),
                        },
                    ))),
                    Some(other) => Err(self.err(
                        &schema_field,
                        format!("expected a JSON Schema object, got {}", type_name(other)),
                    )),
                    None => Err(self.err(&schema_field, "is missing".into())),
                }
            }
            Some(Value::String(t)) => Err(self.err(
                "response_format.type",
                format!("{t:?} is not supported; use \"text\", \"json_object\" or \"json_schema\""),
            )),
            Some(other) => Err(self.err(
                "response_format.type",
                format!("expected a string, got {}", type_name(other)),
            )),
            None => Err(self.err("response_format.type", "is missing".into())),
        }
    }

    /// One constraint given as `kind` (`json`, `regex`, `choice`, `grammar`, `json_object`)
    /// in `field`.
    fn constraint_field(
        &self,
        field: &str,
        kind: &str,
        v: &Value,
    ) -> Result<Constraint, LineError> {
        let string = |what: &str| match v {
            Value::String(s) if !s.is_empty() => Ok(s.clone()),
            other => Err(self.err(
                field,
                format!("expected a non-empty {what} string, got {other}"),
            )),
        };
        Ok(match kind {
            "json" => match v {
                Value::Object(_) | Value::Bool(_) => Constraint::JsonSchema { schema: v.clone() },
                Value::String(s) => Constraint::JsonSchema {
                    schema: serde_json::from_str(s).map_err(|e| {
                        self.err(
                            field,
                            format!("is a string but not a JSON Schema in JSON: {e}"),
                        )
                    })?,
                },
                other => {
                    return Err(self.err(
                        field,
                        format!("expected a JSON Schema object, got {}", type_name(other)),
                    ))
                }
            },
            "regex" => Constraint::Regex {
                pattern: string("regular expression")?,
            },
            "grammar" => Constraint::Grammar {
                lark: string("Lark grammar")?,
            },
            "choice" => match v {
                Value::Array(items) if !items.is_empty() => Constraint::Choice {
                    choices: items
                        .iter()
                        .enumerate()
                        .map(|(i, c)| match c {
                            Value::String(s) => Ok(s.clone()),
                            other => Err(self.err(
                                &format!("{field}[{i}]"),
                                format!("expected a string, got {}", type_name(other)),
                            )),
                        })
                        .collect::<Result<_, _>>()?,
                },
                other => {
                    return Err(self.err(
                        field,
                        format!("expected a non-empty array of strings, got {other}"),
                    ))
                }
            },
            "json_object" => match v {
                Value::Bool(true) => Constraint::JsonObject,
                other => return Err(self.err(field, format!("expected true, got {other}"))),
            },
            other => return Err(self.err(field, format!("{other:?} is not a kind of constraint"))),
        })
    }

    /// `c` if llguidance compiles it, else an error naming `field` and the compiler's reason.
    pub(super) fn compiles(&self, field: &str, c: Constraint) -> Result<Constraint, LineError> {
        match gristmill_structured::check(&c) {
            Ok(()) => Ok(c),
            Err(why) => {
                let mut why = why.trim().replace('\n', " ");
                if why.len() > MAX_REASON_BYTES {
                    let mut end = MAX_REASON_BYTES;
                    while !why.is_char_boundary(end) {
                        end -= 1;
                    }
                    why.truncate(end);
                    why.push('…');
                }
                Err(LineError::new(
                    codes::INVALID_REQUEST,
                    format!(
                        "line {}: body.{field} cannot be enforced ({} constraint): {why}",
                        self.line,
                        c.kind()
                    ),
                )
                .with_param(format!("body.{field}")))
            }
        }
    }
}

/// OpenAI's rule for schema and function names.
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The constraint of a forced tool call: the named function's arguments, or, for
/// `"required"`, `{"name", "arguments"}` of any one tool.
pub(super) fn forced_call(choice: &ToolChoice, definitions: &[Value]) -> Option<Constraint> {
    let parameters = |t: &Value| -> Value {
        match t["function"].get("parameters") {
            Some(p @ Value::Object(_)) => p.clone(),
            _ => serde_json::json!({"type": "object"}),
        }
    };
    match choice {
        ToolChoice::None => None,
        ToolChoice::Function(name) => definitions
            .iter()
            .find(|t| t["function"]["name"] == name.as_str())
            .map(|t| Constraint::JsonSchema {
                schema: parameters(t),
            }),
        ToolChoice::Required => Some(Constraint::JsonSchema {
            schema: serde_json::json!({"anyOf": definitions.iter().map(|t| serde_json::json!({
                "type": "object",
                "properties": {"name": {"const": t["function"]["name"]}, "arguments": parameters(t)},
                "required": ["name", "arguments"],
                "additionalProperties": false
            })).collect::<Vec<_>>()}),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{check, err};
    use super::*;

    fn chat(extra: &str) -> String {
        format!(
            r#"{{"custom_id":"a","url":"/v1/chat/completions","body":{{"messages":[{{"role":"user","content":"hi"}}]{extra}}}}}"#
        )
    }

    fn constraint_of(extra: &str) -> Option<Constraint> {
        check(&[&chat(extra)])
            .remove(0)
            .expect("valid")
            .params
            .constraint
    }

    #[test]
    fn every_spelling_of_a_constraint_is_read() {
        let schema =
            serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            constraint_of(&format!(
                r#","response_format":{{"type":"json_schema","json_schema":{{"name":"x","strict":true,"schema":{schema}}}}}"#
            )),
            Some(Constraint::JsonSchema {
                schema: schema.clone()
            })
        );
        assert_eq!(
            constraint_of(r#","response_format":{"type":"json_object"}"#),
            Some(Constraint::JsonObject)
        );
        assert_eq!(constraint_of(r#","response_format":{"type":"text"}"#), None);
        assert_eq!(
            constraint_of(&format!(r#","structured_outputs":{{"json":{schema}}}"#)),
            Some(Constraint::JsonSchema {
                schema: schema.clone()
            })
        );
        let as_string = serde_json::to_string(&schema.to_string()).expect("string");
        assert_eq!(
            constraint_of(&format!(r#","guided_json":{as_string}"#)),
            Some(Constraint::JsonSchema { schema })
        );
        assert_eq!(
            constraint_of(r#","structured_outputs":{"regex":"[a-z]+"}"#),
            Some(Constraint::Regex {
                pattern: "[a-z]+".into()
            })
        );
        assert_eq!(
            constraint_of(r#","guided_choice":["yes","no"]"#),
            Some(Constraint::Choice {
                choices: vec!["yes".into(), "no".into()]
            })
        );
        assert_eq!(
            constraint_of(r#","structured_outputs":{"grammar":"start: \"a\"+"}"#),
            Some(Constraint::Grammar {
                lark: "start: \"a\"+".into()
            })
        );
        // Completions lines take the extensions too.
        let r = check(&[r#"{"custom_id":"a","url":"/v1/completions","body":{"prompt":"x","structured_outputs":{"choice":["a"]}}}"#])
            .remove(0)
            .expect("valid");
        assert!(r.params.constraint.is_some());
    }

    #[test]
    fn a_bad_constraint_is_an_error_naming_line_and_field() {
        let cases = [
            (
                r##","response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"object","properties":{"a":{"$ref":"#/$defs/nope"}},"required":["a"]}}}"##,
                "body.response_format.json_schema.schema cannot be enforced",
            ),
            (
                r#","response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"strnig"}}}"#,
                "body.response_format.json_schema.schema cannot be enforced",
            ),
            (
                r#","response_format":{"type":"json_schema","json_schema":{"schema":{}}}"#,
                "body.response_format.json_schema.name is missing",
            ),
            (
                r#","response_format":{"type":"json_schema"}"#,
                "body.response_format.json_schema is missing",
            ),
            (
                r#","response_format":{"type":"yaml"}"#,
                "body.response_format.type \"yaml\" is not supported",
            ),
            (
                r#","response_format":"json""#,
                "body.response_format expected an object",
            ),
            (
                r#","guided_regex":"(open""#,
                "body.guided_regex cannot be enforced (regex constraint)",
            ),
            (
                r#","structured_outputs":{"grammar":"start: undefined_rule"}"#,
                "body.structured_outputs.grammar cannot be enforced",
            ),
            (
                r#","structured_outputs":{"choice":[]}"#,
                "body.structured_outputs.choice expected a non-empty array",
            ),
            (
                r#","structured_outputs":{"ebnf":"x"}"#,
                "body.structured_outputs.ebnf is not supported",
            ),
            (
                r#","structured_outputs":{"regex":"a"},"response_format":{"type":"json_object"}"#,
                "both constrain the output",
            ),
        ];
        for (extra, expected) in cases {
            let e = err(&chat(extra));
            assert!(e.message.starts_with("line 1: "), "{}", e.message);
            assert!(e.message.contains(expected), "{extra}: {}", e.message);
            assert_eq!(e.code, codes::INVALID_REQUEST);
        }
        // The next line is still read.
        let results = check(&[
            &chat(r#","guided_regex":"(open""#),
            r#"{"custom_id":"b","url":"/v1/completions","body":{"prompt":"x"}}"#,
        ]);
        assert!(results[0].is_err() && results[1].is_ok());
    }

    #[test]
    fn forced_tool_calls_become_constraints_and_auto_is_refused_clearly() {
        let weather = r#"{"type":"function","function":{"name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"],"additionalProperties":false}}}"#;
        let time = r#"{"type":"function","function":{"name":"get_time"}}"#;
        let named = check(&[&chat(&format!(
            r#","tools":[{weather},{time}],"tool_choice":{{"type":"function","function":{{"name":"get_weather"}}}}"#
        ))])
        .remove(0)
        .expect("valid");
        let tools = named.params.tools.expect("tools");
        assert_eq!(tools.choice, ToolChoice::Function("get_weather".into()));
        assert_eq!(tools.definitions.len(), 2);
        match named.params.constraint {
            Some(Constraint::JsonSchema { schema }) => assert_eq!(schema["required"][0], "city"),
            other => panic!("{other:?}"),
        }
        let required = check(&[&chat(&format!(
            r#","tools":[{weather},{time}],"tool_choice":"required""#
        ))])
        .remove(0)
        .expect("valid");
        match required.params.constraint {
            Some(Constraint::JsonSchema { schema }) => {
                assert_eq!(
                    schema["anyOf"][1]["properties"]["name"]["const"],
                    "get_time"
                );
                assert_eq!(
                    schema["anyOf"][1]["properties"]["arguments"]["type"],
                    "object"
                );
            }
            other => panic!("{other:?}"),
        }
        let none = check(&[&chat(&format!(r#","tools":[{time}],"tool_choice":"none""#))])
            .remove(0)
            .expect("valid");
        assert_eq!(none.params.constraint, None);
        assert_eq!(none.params.tools.map(|t| t.choice), Some(ToolChoice::None));

        let cases = [
            (format!(r#","tools":[{time}]"#), "body.tool_choice \"auto\" (the default when tools are given) is not supported"),
            (format!(r#","tools":[{time}],"tool_choice":"auto""#), "is not supported"),
            (r#","tool_choice":"required""#.to_string(), "body.tool_choice needs \"tools\""),
            (format!(r#","tools":[{time},{time}],"tool_choice":"required""#), "body.tools[1].function.name \"get_time\" is used by an earlier tool"),
            (format!(r#","tools":[{time}],"tool_choice":{{"type":"function","function":{{"name":"nope"}}}}"#), "body.tool_choice.function.name \"nope\" is not one of the tools"),
            (r#","tools":[{"type":"retrieval"}],"tool_choice":"required""#.to_string(), "body.tools[0].type must be \"function\""),
            (format!(r#","tools":[{time}],"tool_choice":"required","response_format":{{"type":"json_object"}}"#), "give only one"),
            (r#","tools":[{"type":"function","function":{"name":"f","parameters":{"type":"nonsense"}}}],"tool_choice":"required""#.to_string(), "body.tool_choice cannot be enforced"),
        ];
        for (extra, expected) in cases {
            let e = err(&chat(&extra));
            assert!(e.message.contains(expected), "{extra}: {}", e.message);
        }
    }
}
