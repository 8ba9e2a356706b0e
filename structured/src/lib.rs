//! Structured outputs: a request's [`Constraint`] compiled by llguidance into a grammar, checked
//! once at intake, and enforced in the engine as a token mask per sequence per step.
//!
//! - [`check`] compiles a constraint over a byte-level vocabulary. Validation calls it, so a
//!   schema llguidance cannot compile is an error line before the batch starts, never a failure
//!   halfway through it.
//! - [`Vocabulary`] holds llguidance's view of one model's tokenizer (each token's bytes, the
//!   end-of-sequence ids) and compiles constraints into [`Guide`]s over it.
//! - A [`Guide`] follows one sequence: [`Guide::mask`] says which tokens may come next,
//!   [`apply`] sends the others' logits to minus infinity, [`Guide::commit`] advances it by the
//!   sampled token, and [`Guide::is_finished`] says when the grammar has nothing more to add.
//!
//! JSON is generated compactly (`", "` between items, `": "` after keys, no other whitespace)
//! unless the schema carries llguidance's own `x-guidance` options: with free whitespace a small
//! model can emit newlines until `max_tokens`, and compact JSON parses the same.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use gristmill_protocol::Constraint;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

/// The llguidance grammar of a constraint.
pub fn grammar(c: &Constraint) -> TopLevelGrammar {
    match c {
        Constraint::JsonSchema { schema } => TopLevelGrammar::from_json_schema(compact(schema)),
        Constraint::JsonObject => {
            TopLevelGrammar::from_json_schema(compact(&json!({"type": "object"})))
        }
        Constraint::Regex { pattern } => TopLevelGrammar::from_regex(pattern),
        Constraint::Choice { choices } => {
            let alternatives: Vec<String> = choices.iter().map(|c| escape_regex(c)).collect();
            TopLevelGrammar::from_regex(&format!("(?:{})", alternatives.join("|")))
        }
        Constraint::Grammar { lark } => TopLevelGrammar::from_lark(lark.clone()),
    }
}

/// The schema with compact-JSON options, unless it brings its own (`x-guidance`) or is not an
/// object (`true`/`false` schemas).
fn compact(schema: &Value) -> Value {
    let mut schema = schema.clone();
    if let Value::Object(map) = &mut schema {
        map.entry("x-guidance").or_insert_with(
            || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

/// `text` with every regular-expression metacharacter escaped.
fn escape_regex(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        if "\\.+*?()|[]{}^$#&-~/".contains(ch) {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

/// Compiles `c` over a byte-level vocabulary: `Ok` when llguidance accepts it and it admits at
/// least one output, else the reason (llguidance's message).
///
/// Verdicts are remembered (by the constraint's JSON), so a file of 50,000 lines with one schema
/// compiles it once per process.
pub fn check(c: &Constraint) -> Result<(), String> {
    static VERDICTS: OnceLock<Mutex<HashMap<String, Result<(), String>>>> = OnceLock::new();
    let verdicts = VERDICTS.get_or_init(Default::default);
    let key = serde_json::to_string(c).map_err(|e| e.to_string())?;
    // A poisoned lock only means another thread panicked mid-insert: the map is still valid.
    if let Some(v) = verdicts.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return v.clone();
    }
    let verdict = compile_check(c);
    let mut map = verdicts.lock().unwrap_or_else(|p| p.into_inner());
    if map.len() >= COMPILED_CACHE_ENTRIES {
        map.clear();
    }
    map.insert(key, verdict.clone());
    verdict
}

fn compile_check(c: &Constraint) -> Result<(), String> {
    static FACTORY: OnceLock<Result<ParserFactory, String>> = OnceLock::new();
    let factory = FACTORY
        .get_or_init(|| {
            let mut f = ParserFactory::new_simple(&ApproximateTokEnv::single_byte_env())
                .map_err(|e| e.to_string())?;
            f.quiet();
            Ok(f)
        })
        .as_ref()?;
    let mut m = Matcher::new(factory.create_parser(grammar(c)));
    let mask = m.compute_mask().map_err(|e| e.to_string())?;
    if mask.is_zero() && !m.is_accepting().unwrap_or(false) {
        return Err("it admits no output at all".into());
    }
    Ok(())
}

/// Why a constraint could not be compiled or followed: llguidance's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuideError(pub String);

impl std::fmt::Display for GuideError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GuideError {}

fn err(e: impl ToString) -> GuideError {
    GuideError(e.to_string())
}

/// Compiled constraints kept per vocabulary, keyed by the constraint's JSON: a batch of 10,000
/// lines with one schema compiles it once. Cleared when full.
const COMPILED_CACHE_ENTRIES: usize = 256;

/// llguidance's view of one model's vocabulary, and the constraints compiled over it.
pub struct Vocabulary {
    factory: ParserFactory,
    eos: Arc<[u32]>,
    compiled: Mutex<HashMap<String, Matcher>>,
}

impl std::fmt::Debug for Vocabulary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vocabulary")
            .field(
                "vocab_size",
                &self.factory.tok_env().tok_trie().vocab_size(),
            )
            .field("eos", &self.eos)
            .finish()
    }
}

impl Vocabulary {
    /// `tokens[id]` is the bytes token `id` stands for (special tokens marked with a leading
    /// 0xFF, llguidance's convention; empty for ids that never appear in text). `eos` must not
    /// be empty; a repeated byte string keeps its first id only.
    pub fn new(mut tokens: Vec<Vec<u8>>, eos: &[u32]) -> Result<Self, GuideError> {
        let Some(&first_eos) = eos.first() else {
            return Err(err(
                "the model has no end-of-sequence token to end a constrained output",
            ));
        };
        if let Some(&bad) = eos.iter().find(|&&e| e as usize >= tokens.len()) {
            return Err(err(format!(
                "end-of-sequence id {bad} is outside the vocabulary of {} tokens",
                tokens.len()
            )));
        }
        // The trie holds each byte string once.
        let mut seen = std::collections::HashSet::new();
        for t in tokens.iter_mut() {
            if !t.is_empty() && !seen.insert(t.clone()) {
                t.clear();
            }
        }
        let info = TokRxInfo::new(tokens.len() as u32, first_eos);
        let trie = TokTrie::from(&info, &tokens).with_eos_tokens(eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(err)?;
        factory.quiet();
        Ok(Self {
            factory,
            eos: eos.into(),
            compiled: Mutex::new(HashMap::new()),
        })
    }

    /// Tokens in the vocabulary (the length of every mask).
    pub fn len(&self) -> usize {
        self.factory.tok_env().tok_trie().vocab_size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A fresh guide for `c`, compiled once per distinct constraint.
    pub fn guide(&self, c: &Constraint) -> Result<Guide, GuideError> {
        let key = serde_json::to_string(c).map_err(err)?;
        // A poisoned lock only means another thread panicked mid-insert: the map is still a
        // valid cache.
        let mut compiled = self.compiled.lock().unwrap_or_else(|p| p.into_inner());
        let matcher = match compiled.get(&key) {
            Some(m) => m.clone(),
            None => {
                let m = Matcher::new(self.factory.create_parser(grammar(c)));
                if let Some(e) = m.get_error() {
                    return Err(GuideError(e));
                }
                if compiled.len() >= COMPILED_CACHE_ENTRIES {
                    compiled.clear();
                }
                compiled.insert(key, m.clone());
                m
            }
        };
        Ok(Guide {
            matcher,
            eos: self.eos.clone(),
        })
    }
}

/// The allowed next tokens of one sequence at one step.
#[derive(Debug, Clone)]
pub struct Mask(SimpleVob);

impl Mask {
    pub fn allows(&self, token: u32) -> bool {
        (token as usize) < self.0.len() && self.0.is_allowed(token)
    }

    /// How many tokens are allowed.
    pub fn count(&self) -> usize {
        self.0.num_set()
    }
}

/// Sends every logit the mask forbids to minus infinity. Logits past the mask's vocabulary
/// (a model with padded embeddings) are forbidden too.
pub fn apply(mask: &Mask, logits: &mut [f32]) {
    let n = mask.0.len().min(logits.len());
    mask.0.iter_unset_entries(|i| {
        if i < n {
            logits[i] = f32::NEG_INFINITY;
        }
    });
    for l in logits.iter_mut().skip(n) {
        *l = f32::NEG_INFINITY;
    }
}

/// One sequence's place in its constraint's grammar.
pub struct Guide {
    matcher: Matcher,
    eos: Arc<[u32]>,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide")
            .field("finished", &self.matcher.is_stopped())
            .finish()
    }
}

impl Clone for Guide {
    fn clone(&self) -> Self {
        Self {
            matcher: self.matcher.clone(),
            eos: self.eos.clone(),
        }
    }
}

impl Guide {
    /// The tokens that may come next. Once the grammar is complete only end-of-sequence ids
    /// are allowed; every end-of-sequence id is allowed where one is.
    pub fn mask(&mut self) -> Result<Mask, GuideError> {
        let mut v = self.matcher.compute_mask_or_eos().map_err(err)?;
        if self.eos.iter().any(|&e| v.is_allowed(e)) {
            for &e in self.eos.iter() {
                v.allow_token(e);
            }
        }
        if v.is_zero() {
            return Err(err("the constraint allows no next token"));
        }
        Ok(Mask(v))
    }

    /// Advances past `token`, which the last mask allowed.
    pub fn commit(&mut self, token: u32) -> Result<(), GuideError> {
        if self.matcher.is_stopped() {
            return Ok(());
        }
        // llguidance knows the first end-of-sequence id; the others end the output the same.
        let token = if self.eos.contains(&token) {
            self.eos[0]
        } else {
            token
        };
        self.matcher.consume_token(token).map_err(err)
    }

    /// Whether the grammar is complete and can take nothing but end-of-sequence.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary of the 256 bytes, a few multi-byte tokens, and an end-of-sequence token.
    fn vocab() -> Vocabulary {
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for w in ["{\"", "\": ", "true", "false", "name", "yes", "no", "  "] {
            tokens.push(w.as_bytes().to_vec());
        }
        tokens.push(b"\xFF<|end|>".to_vec());
        let eos = tokens.len() as u32 - 1;
        Vocabulary::new(tokens, &[eos]).expect("vocabulary")
    }

    /// Greedily drives a guide with a fixed preference order over token texts.
    fn drive(v: &Vocabulary, c: &Constraint, prefer: &[&str]) -> String {
        let mut g = v.guide(c).expect("compiles");
        let mut out = Vec::new();
        for _ in 0..200 {
            if g.is_finished() {
                break;
            }
            let m = g.mask().expect("mask");
            let pick = prefer
                .iter()
                .filter_map(|p| {
                    (0..v.len() as u32).find(|&t| {
                        let bytes = v.factory.tok_env().tok_trie().token(t);
                        bytes == p.as_bytes() && m.allows(t)
                    })
                })
                .next()
                .or_else(|| (0..v.len() as u32).find(|&t| m.allows(t)))
                .expect("some token");
            if v.eos.contains(&pick) {
                break;
            }
            out.extend_from_slice(v.factory.tok_env().tok_trie().token(pick));
            g.commit(pick).expect("allowed token commits");
        }
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn choice_allows_only_the_choices() {
        let v = vocab();
        let c = Constraint::Choice {
            choices: vec!["yes".into(), "no".into(), "a.b|c".into()],
        };
        assert_eq!(drive(&v, &c, &["no", "yes"]), "no");
        assert_eq!(drive(&v, &c, &["a", ".", "b", "|", "c"]), "a.b|c");
    }

    #[test]
    fn a_schema_drives_compact_json() {
        let v = vocab();
        let c = Constraint::JsonSchema {
            schema: json!({"type": "object", "properties": {"ok": {"type": "boolean"}},
                           "required": ["ok"], "additionalProperties": false}),
        };
        let out = drive(&v, &c, &["  ", " ", "{\"", "\": ", "false"]);
        assert_eq!(out, "{\"ok\": false}");
    }

    #[test]
    fn apply_forbids_what_the_mask_forbids_and_the_padding() {
        let v = vocab();
        let mut g = v
            .guide(&Constraint::Regex {
                pattern: "ab".into(),
            })
            .expect("compiles");
        let m = g.mask().expect("mask");
        let mut logits = vec![0.0f32; v.len() + 3];
        apply(&m, &mut logits);
        let open: Vec<usize> = (0..logits.len()).filter(|&i| logits[i] == 0.0).collect();
        assert_eq!(open, vec![b'a' as usize]);
        assert_eq!(m.count(), 1);
    }

    #[test]
    fn finished_grammar_allows_every_eos() {
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        tokens.push(b"\xFF<|im_end|>".to_vec());
        tokens.push(b"\xFF<|endoftext|>".to_vec());
        let v = Vocabulary::new(tokens, &[256, 257]).expect("vocabulary");
        let mut g = v
            .guide(&Constraint::Regex {
                pattern: "x".into(),
            })
            .expect("compiles");
        g.commit(b'x' as u32).expect("commit");
        if !g.is_finished() {
            let m = g.mask().expect("mask");
            assert!(m.allows(256) && m.allows(257));
            assert_eq!(m.count(), 2);
        }
    }

    #[test]
    fn check_rejects_bad_constraints_with_reasons() {
        let bad_regex = check(&Constraint::Regex {
            pattern: "(unclosed".into(),
        });
        assert!(bad_regex.is_err(), "{bad_regex:?}");
        let bad_schema = check(&Constraint::JsonSchema {
            schema: json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}},
                           "required": ["a"]}),
        });
        let why = bad_schema.expect_err("dangling $ref");
        assert!(why.contains("missing"), "{why}");
        let bad_lark = check(&Constraint::Grammar {
            lark: "start: foo".into(),
        });
        assert!(bad_lark.is_err(), "{bad_lark:?}");
        assert!(check(&Constraint::JsonObject).is_ok());
        assert!(check(&Constraint::Grammar {
            lark: "start: \"a\" b\nb: /[0-9]+/".into()
        })
        .is_ok());
    }
}
