//! Tokenizer and chat template.
//!
//! A `tokenizers::Tokenizer` is built from `tokenizer.json` or from GGUF metadata, exactly as HF
//! transformers converts a GGUF: byte-level BPE (vocabulary, merges, the pre-tokenizer named by
//! `tokenizer.ggml.pre`) or SentencePiece BPE ([`crate::spm`]: merges recovered from the scores,
//! byte fallback, the `▁` space mark), control tokens as special added tokens. Special tokens written in
//! text are matched as added tokens, as HF does. The chat template is the model's own Jinja
//! template, rendered with minijinja.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use gristmill_protocol::ChatMessage;
use minijinja::{context, Environment, ErrorKind};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::weights::gguf::{GgufFile, MetaValue};

/// A model's tokenizer with the special tokens and template around it.
#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// End-of-sequence ids: generation stops at any of them (unless `ignore_eos`).
    pub eos_ids: Vec<u32>,
    pub bos_id: Option<u32>,
    /// Whether `/v1/completions` prompts get a BOS (GGUF `add_bos_token`, or the tokenizer's own
    /// post-processor for HF checkpoints).
    add_bos: bool,
    /// HF checkpoints: encode completions with the tokenizer's post-processor.
    use_post_processor: bool,
    bos_text: String,
    eos_text: String,
    template: Option<String>,
    /// The template compiled once, on first use (a broken one fails each request that needs it,
    /// with the same message, and never the load).
    chat_env: OnceLock<std::result::Result<Environment<'static>, String>>,
    source: PathBuf,
}

fn tok_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl Tokenizer {
    /// Builds the tokenizer from GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path();
        let model = g
            .meta("tokenizer.ggml.model")
            .and_then(MetaValue::as_str)
            .unwrap_or("");
        if model != "gpt2" && model != "llama" {
            return Err(tok_err(
                path,
                format!(
                    "tokenizer.ggml.model is {model:?}; byte-level BPE (\"gpt2\") and SentencePiece BPE \
                     (\"llama\") GGUF tokenizers are supported — use the HF checkpoint directory with its \
                     tokenizer.json instead"
                ),
            ));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            g.meta(key)
                .and_then(MetaValue::as_array)
                .ok_or_else(|| tok_err(path, format!("metadata {key} is missing")))?
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| tok_err(path, format!("{key} holds a non-string")))
                })
                .collect()
        };
        let arch = g
            .meta("general.architecture")
            .and_then(MetaValue::as_str)
            .unwrap_or("");
        let spm = model == "llama";
        let gemma = spm && arch.starts_with("gemma");
        let mut tokens = strings("tokenizer.ggml.tokens")?;
        if gemma {
            // Gemma files store tokens of two or more spaces as spaces; its vocabulary (and HF's
            // conversion) spells them with the SentencePiece space mark.
            for t in tokens.iter_mut() {
                if t.len() > 1 && t.chars().all(|c| c == ' ') {
                    *t = "\u{2581}".repeat(t.len());
                }
            }
        }
        let split = |m: &String| {
            let (a, b) = m.split_once(' ').unwrap_or((m.as_str(), ""));
            (a.to_string(), b.to_string())
        };
        let merges: Vec<(String, String)> = match (spm, g.meta("tokenizer.ggml.merges")) {
            (false, _) | (true, Some(_)) => strings("tokenizer.ggml.merges")?
                .iter()
                .map(split)
                .collect(),
            (true, None) => {
                let scores: Vec<f64> = if gemma {
                    // Gemma's scores do not follow its merge order; its file order does.
                    (0..tokens.len()).map(|i| -(i as f64)).collect()
                } else {
                    g.meta("tokenizer.ggml.scores")
                        .and_then(MetaValue::as_array)
                        .ok_or_else(|| {
                            tok_err(path, "metadata tokenizer.ggml.scores is missing (SentencePiece vocabulary without merges)")
                        })?
                        .iter()
                        .map(|v| v.as_f64().unwrap_or(0.0))
                        .collect()
                };
                crate::spm::merges_from_scores(&tokens, &scores)
            }
        };
        let types: Vec<i64> = match g
            .meta("tokenizer.ggml.token_type")
            .and_then(MetaValue::as_array)
        {
            Some(a) => a
                .iter()
                .map(|v| if let MetaValue::Int(i) = v { *i } else { 1 })
                .collect(),
            None => vec![1; tokens.len()],
        };
        let id = |key: &str| g.meta(key).and_then(MetaValue::as_u64).map(|v| v as u32);
        let bos_id = id("tokenizer.ggml.bos_token_id");
        let eos_id = id("tokenizer.ggml.eos_token_id");
        let mut eos_ids: Vec<u32> = eos_id.into_iter().collect();
        if let Some(eot) = id("tokenizer.ggml.eot_token_id") {
            if !eos_ids.contains(&eot) {
                eos_ids.push(eot);
            }
        }
        // A SentencePiece vocabulary that does not say gets a BOS, as llama.cpp and HF do.
        let add_bos = g
            .meta("tokenizer.ggml.add_bos_token")
            .and_then(MetaValue::as_bool)
            .unwrap_or(spm);
        let pre = g
            .meta("tokenizer.ggml.pre")
            .and_then(MetaValue::as_str)
            .unwrap_or("default");

        let vocab: serde_json::Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let merges: Vec<Value> = merges.iter().map(|(a, b)| json!([a, b])).collect();
        // Control (3) and user-defined (4) tokens are added tokens; control ones are special, and
        // so is a SentencePiece vocabulary's unknown token (2), which HF registers as `unk_token`.
        let special = |ty: Option<&i64>| ty == Some(&3) || (spm && ty == Some(&2));
        let added: Vec<Value> = tokens
            .iter()
            .enumerate()
            .filter(|(i, _)| special(types.get(*i)) || types.get(*i) == Some(&4))
            .map(|(i, t)| {
                json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": false, "special": special(types.get(i))})
            })
            .collect();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let pre_tokenizer = match pre {
            // SmolLM's own tokenizer splits digits one by one before the GPT-2 regex.
            "smollm" => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level]}),
            "llama3" | "llama-bpe" | "qwen2" | "deepseek-llm" => {
                let re = if pre == "qwen2" {
                    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
                } else {
                    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
                };
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]})
            }
            _ => byte_level,
        };
        let spec = if spm {
            crate::spm::tokenizer_spec(arch, added, vocab, merges)
        } else {
            json!({
                "version": "1.0", "truncation": null, "padding": null,
                "added_tokens": added,
                "normalizer": null,
                "pre_tokenizer": pre_tokenizer,
                "post_processor": null,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                          "ignore_merges": false, "vocab": vocab, "merges": merges},
            })
        };
        let inner: tokenizers::Tokenizer = spec.to_string().parse().map_err(|e| {
            tok_err(
                path,
                format!("cannot build a BPE tokenizer from the GGUF vocabulary: {e}"),
            )
        })?;
        let text_of = |id: Option<u32>| {
            id.and_then(|i| tokens.get(i as usize).cloned())
                .unwrap_or_default()
        };
        Ok(Self {
            inner,
            bos_text: text_of(bos_id),
            eos_text: text_of(eos_id),
            eos_ids,
            bos_id,
            add_bos,
            use_post_processor: false,
            template: g
                .meta("tokenizer.chat_template")
                .and_then(MetaValue::as_str)
                .map(str::to_string),
            chat_env: OnceLock::new(),
            source: path.to_path_buf(),
        })
    }

    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` (chat template, BOS and
    /// EOS) and `generation_config.json` (extra EOS ids) from an HF checkpoint directory.
    pub fn from_hf_dir(dir: &Path, config_eos: &[u32], config_bos: Option<u32>) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let inner =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| tok_err(&path, e.to_string()))?;
        let read_json = |name: &str| -> Result<Option<Value>> {
            let p = dir.join(name);
            if !p.exists() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| Error::config(&p, format!("not valid JSON: {e}")))
        };
        let tc = read_json("tokenizer_config.json")?.unwrap_or(Value::Null);
        let token_text = |v: Option<&Value>| -> Option<String> {
            match v? {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
                _ => None,
            }
        };
        let bos_text = token_text(tc.get("bos_token"));
        let eos_text = token_text(tc.get("eos_token"));
        let mut eos_ids: Vec<u32> = config_eos.to_vec();
        if let Some(id) = eos_text.as_deref().and_then(|t| inner.token_to_id(t)) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        if let Some(gen) = read_json("generation_config.json")? {
            for id in ids_of(gen.get("eos_token_id")) {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        let bos_id = bos_text
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            .or(config_bos);
        let template = match tc.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        let id_text = |id: Option<u32>| id.and_then(|i| inner.id_to_token(i)).unwrap_or_default();
        Ok(Self {
            bos_text: bos_text.unwrap_or_else(|| id_text(bos_id)),
            eos_text: eos_text.unwrap_or_else(|| id_text(eos_ids.first().copied())),
            inner,
            eos_ids,
            bos_id,
            add_bos: tc
                .get("add_bos_token")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            use_post_processor: true,
            template,
            chat_env: OnceLock::new(),
            source: path,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes text without adding any special tokens (special tokens written in the text are
    /// still recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| tok_err(&self.source, format!("cannot encode text: {e}")))
    }

    /// Encodes a `/v1/completions` prompt: a BOS only where the model asks for one.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        if self.use_post_processor {
            let ids = self
                .inner
                .encode_fast(text, true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| tok_err(&self.source, format!("cannot encode text: {e}")))?;
            return Ok(self.with_bos(ids));
        }
        // As HF and llama.cpp do, a prompt that already starts with BOS gets another.
        let mut ids = self.encode(text)?;
        if let (true, Some(bos)) = (self.add_bos, self.bos_id) {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// `ids` with a BOS in front unless the post-processor already put one there.
    fn with_bos(&self, mut ids: Vec<u32>) -> Vec<u32> {
        if let (true, Some(bos)) = (self.add_bos, self.bos_id) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        ids
    }

    /// Decodes ids to text, keeping special tokens out (as OpenAI-compatible servers do).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| tok_err(&self.source, format!("cannot decode ids: {e}")))
    }

    /// The bytes each of the first `vocab_size` ids stands for, as llguidance wants them:
    /// special tokens as 0xFF followed by their text, byte-level BPE symbols mapped back to
    /// bytes, SentencePiece's `▁` as a space and its `<0xNN>` pieces as the byte. Ids the
    /// tokenizer does not know (a model's padded embeddings) are empty: never generated.
    pub fn token_bytes(&self, vocab_size: usize) -> Vec<Vec<u8>> {
        let byte_level = serde_json::to_string(&self.inner.get_decoder())
            .is_ok_and(|d| d.contains("\"ByteLevel\""));
        let unicode_to_byte = byte_level_alphabet();
        let mut out = vec![Vec::new(); vocab_size];
        for (text, id) in self.inner.get_vocab(false) {
            let Some(slot) = out.get_mut(id as usize) else {
                continue;
            };
            *slot = if byte_level {
                // Every symbol of a byte-level vocabulary is one of the 256 byte stand-ins; one
                // that is not keeps its UTF-8 text.
                text.chars()
                    .map(|c| {
                        unicode_to_byte
                            .get(&c)
                            .copied()
                            .map_or_else(|| c.to_string().into_bytes(), |b| vec![b])
                    })
                    .collect::<Vec<_>>()
                    .concat()
            } else if let Some(b) = text
                .strip_prefix("<0x")
                .and_then(|h| h.strip_suffix('>'))
                .filter(|h| h.len() == 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                vec![b]
            } else {
                text.replace('\u{2581}', " ").into_bytes()
            };
        }
        for (id, added) in self.inner.get_added_tokens_decoder() {
            if let Some(slot) = out.get_mut(id as usize) {
                let mut bytes = added.content.into_bytes();
                if added.special {
                    bytes.insert(0, 0xFF);
                }
                *slot = bytes;
            }
        }
        out
    }

    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Renders chat messages with the model's template and `add_generation_prompt = true`.
    pub fn apply_chat_template(&self, messages: &[ChatMessage]) -> Result<String> {
        self.apply_chat_template_with_tools(messages, None)
    }

    /// Renders chat messages and, when given, the request's `tools` (the template sees them as
    /// `tools`, as with HF's `apply_chat_template(tools=...)`; templates that ignore tools
    /// render as without them).
    pub fn apply_chat_template_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[Value]>,
    ) -> Result<String> {
        let template = self.template.as_deref().ok_or_else(|| {
            Error::Template(
                "the model has no chat template; send /v1/completions lines instead".into(),
            )
        })?;
        let env = self
            .chat_env
            .get_or_init(|| chat_environment(template.to_string()).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| Error::Template(e.clone()))?;
        render(env, messages, tools, &self.bos_text, &self.eos_text)
    }
}

/// Renders a chat template (Jinja, as HF's `apply_chat_template` does: `raise_exception`,
/// `strftime_now`, Python string methods) with `add_generation_prompt = true`.
pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    render(
        &chat_environment(template.to_string())?,
        messages,
        None,
        bos_token,
        eos_token,
    )
}

/// A Jinja environment holding `template` as `chat`, with the functions HF templates call.
fn chat_environment(template: String) -> Result<Environment<'static>> {
    let mut env = Environment::new();
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |fmt: String| -> String {
        // Templates use it for "today's date" lines; render the date in UTC.
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        format_date(&fmt, secs)
    });
    env.add_template_owned("chat", template)
        .map_err(|e| Error::Template(format!("cannot parse the model's template: {e}")))?;
    Ok(env)
}

fn render(
    env: &Environment<'static>,
    messages: &[ChatMessage],
    tools: Option<&[Value]>,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let tmpl = env
        .get_template("chat")
        .map_err(|e| Error::Template(e.to_string()))?;
    tmpl.render(context! {
        messages => messages,
        tools => tools,
        add_generation_prompt => true,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| Error::Template(format!("rendering failed: {e}")))
}

fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|i| vec![i as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|i| i as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// Minimal strftime for `%d %b %Y`-style date lines (UTC).
fn format_date(fmt: &str, secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    const FULL: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let m = (month - 1) as usize;
    fmt.replace("%d", &format!("{day:02}"))
        .replace("%m", &format!("{month:02}"))
        .replace("%Y", &year.to_string())
        .replace("%b", MONTHS[m])
        .replace("%B", FULL[m])
}

/// GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte.
/// Printable Latin-1 bytes stand for themselves; the other 68 map to U+0100 onwards in order.
fn byte_level_alphabet() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut next = 0u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                char::from(b)
            } else {
                next += 1;
                // 256 + n is below 0x200: always a valid char.
                char::from_u32(255 + next).unwrap_or(char::REPLACEMENT_CHARACTER)
            };
            (c, b)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::format_date;

    #[test]
    fn dates_render() {
        assert_eq!(format_date("%d %b %Y", 0), "01 Jan 1970");
        assert_eq!(format_date("%Y-%m-%d", 1_795_996_800), "2026-11-30");
    }
}
