//! SentencePiece BPE vocabularies from GGUF (`tokenizer.ggml.model = "llama"`: Llama 2, Mistral,
//! Phi-3, Gemma), built the way HF transformers builds them from a GGUF file, so that ids agree
//! with HF's: a BPE over the `▁`-spelled vocabulary with byte fallback, merges recovered from the
//! pieces' scores when the file has none, and the space handling of the model's family.

use serde_json::{json, Map, Value};

/// The merges a SentencePiece vocabulary implies (HF's `generate_merges`): every split of a
/// piece into two pieces of the vocabulary, best piece score first; among equal scores the
/// longer left piece, then the longer right piece, first, and otherwise the vocabulary's order
/// (pieces by id, splits by the ids of their halves).
pub fn merges_from_scores(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    let ids: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    // (score, left, right) in the order HF generates them.
    let mut merges: Vec<(f64, usize, usize)> = Vec::new();
    for (piece, &score) in tokens.iter().zip(scores) {
        let mut local: Vec<(usize, usize)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| Some((*ids.get(&piece[..at])?, *ids.get(&piece[at..])?)))
            .collect();
        local.sort_unstable();
        merges.extend(local.into_iter().map(|(l, r)| (score, l, r)));
    }
    // Python's stable `sorted(..., reverse=True)` on (score, len(left), len(right)): keys
    // descending, ties kept in generation order.
    let chars = |i: usize| tokens[i].chars().count();
    merges.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then_with(|| chars(b.1).cmp(&chars(a.1)))
            .then_with(|| chars(b.2).cmp(&chars(a.2)))
    });
    merges
        .into_iter()
        .map(|(_, l, r)| (tokens[l].clone(), tokens[r].clone()))
        .collect()
}

/// The `tokenizer.json` of a SentencePiece BPE vocabulary for the architecture `arch`: Phi-3
/// prefixes a space through a normalizer (every run of spaces keeps its own mark), Gemma marks
/// spaces without a prefix, the rest (`LlamaTokenizer`) prefix the first piece of the text.
pub fn tokenizer_spec(
    arch: &str,
    added: Vec<Value>,
    vocab: Map<String, Value>,
    merges: Vec<Value>,
) -> Value {
    let mark = "\u{2581}";
    let decode_spaces = json!({"type": "Replace", "pattern": {"String": mark}, "content": " "});
    let (normalizer, pre_tokenizer, decoder) = if arch == "phi3" {
        (
            json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": mark},
                {"type": "Replace", "pattern": {"String": " "}, "content": mark}]}),
            Value::Null,
            json!({"type": "Sequence", "decoders": [decode_spaces, {"type": "ByteFallback"},
                {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}),
        )
    } else if arch.starts_with("gemma") {
        (
            json!({"type": "Replace", "pattern": {"String": " "}, "content": mark}),
            json!({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                   "invert": false}),
            json!({"type": "Sequence", "decoders": [decode_spaces, {"type": "ByteFallback"},
                {"type": "Fuse"}]}),
        )
    } else {
        (
            Value::Null,
            json!({"type": "Metaspace", "replacement": mark, "prepend_scheme": "first",
                   "split": false}),
            json!({"type": "Sequence", "decoders": [decode_spaces, {"type": "ByteFallback"},
                {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}),
        )
    };
    let unk = if arch.starts_with("gemma") && vocab.contains_key("<unk>") {
        json!("<unk>")
    } else {
        Value::Null
    };
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": decoder,
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_come_from_splits_into_known_pieces_best_score_first() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "abc", "bc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = [0.0, 0.0, 0.0, -1.0, -3.0, -2.0];
        let m = merges_from_scores(&tokens, &scores);
        let pairs: Vec<(&str, &str)> = m.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        // ab (-1), then bc (-2), then abc's two splits (-3): longer left piece first.
        assert_eq!(pairs, [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]);
    }
}
