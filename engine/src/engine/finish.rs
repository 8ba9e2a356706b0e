//! A request in and out of the loop: its prompt's token ids, and when a sequence is finished
//! (end of sequence, stop strings, `max_tokens`, the context) with its visible logprobs.

use super::*;

impl<B: Backend> Engine<B> {
    /// Tokenizes a request and checks it against the model's context.
    pub fn prompt_ids(&self, req: &Request) -> std::result::Result<Vec<u32>, LineError> {
        let line = req.line;
        let ids = match &req.prompt {
            Prompt::Chat(messages) => {
                let text = self
                    .tokenizer
                    .apply_chat_template_with_tools(
                        messages,
                        req.params.tools.as_ref().map(|t| &t.definitions[..]),
                    )
                    .map_err(|e| LineError::new(codes::TEMPLATE_ERROR, format!("line {line}: {e}")))?;
                self.tokenizer.encode(&text)
            }
            Prompt::Text(text) => self.tokenizer.encode_prompt(text),
            Prompt::Tokens(ids) => {
                let vocab = self.model.cfg().vocab_size;
                if let Some((i, t)) = ids.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
                    return Err(LineError::new(
                        codes::INVALID_REQUEST,
                        format!("line {line}: body.prompt[{i}] is token {t}, but the vocabulary has {vocab} tokens"),
                    )
                    .with_param(format!("body.prompt[{i}]")));
                }
                Ok(ids.clone())
            }
        }
        .map_err(|e| LineError::new(codes::INVALID_REQUEST, format!("line {line}: {e}")))?;
        let ctx = self.model.cfg().max_position_embeddings;
        // The tokenizer may know more tokens than the model embeds (a mismatched checkpoint).
        let vocab = self.model.cfg().vocab_size;
        if let Some(&t) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(LineError::new(
                codes::INVALID_REQUEST,
                format!(
                    "line {line}: the prompt tokenizes to id {t}, but the model has only {vocab} \
                     embeddings; the checkpoint's tokenizer and weights do not match"
                ),
            ));
        }
        if ids.is_empty() {
            return Err(LineError::new(
                codes::INVALID_REQUEST,
                format!("line {line}: the prompt is empty"),
            ));
        }
        if ids.len() >= ctx {
            return Err(LineError::new(
                codes::CONTEXT_LENGTH_EXCEEDED,
                format!(
                    "line {line}: the prompt is {} tokens, but the model's context is {ctx} tokens \
                     (at least one must be left to generate)",
                    ids.len()
                ),
            ));
        }
        if let Some(m) = req.params.max_tokens {
            if ids.len() + m > ctx {
                return Err(LineError::new(
                    codes::CONTEXT_LENGTH_EXCEEDED,
                    format!(
                        "line {line}: the prompt is {} tokens and max_tokens is {m}, {} in all, but the model's \
                         context is {ctx} tokens; lower max_tokens to at most {}",
                        ids.len(),
                        ids.len() + m,
                        ctx - ids.len()
                    ),
                )
                .with_param("body.max_tokens"));
            }
        }
        Ok(ids)
    }

    /// Whether a stop string may have just completed. Checked every step, so a new occurrence
    /// ends in the last token: decoding a tail a little longer than the longest stop string is
    /// enough, instead of the whole output each step. The window grows until its text is long
    /// enough (tokens that decode to nothing, such as special tokens, do not count).
    pub(super) fn tail_has_stop(&self, generated: &[u32], stop: &[String]) -> bool {
        let Some(longest) = stop.iter().map(String::len).max() else {
            return false;
        };
        let mut k = (longest + 4).min(generated.len());
        loop {
            let tail = self
                .tokenizer
                .decode(&generated[generated.len() - k..])
                .unwrap_or_default();
            if stop.iter().any(|s| tail.contains(s.as_str())) {
                return true;
            }
            if tail.len() >= longest + 4 || k == generated.len() {
                return false;
            }
            k = (k * 2).min(generated.len());
        }
    }

    /// Decides whether a sequence is done after its latest token, and builds its choice.
    pub(super) fn check_finished(
        &self,
        l: &Live,
        req: &Request,
        seq: &Sequence,
        ctx: usize,
    ) -> Option<Result<Choice, LineError>> {
        let generated = seq.generated();
        let last = *generated.last()?;
        let p = &req.params;
        let is_eos = self.tokenizer.eos_ids.contains(&last);
        let eos = !p.ignore_eos && is_eos;
        // A complete constraint ends the output: its grammar allows nothing but end-of-sequence.
        let complete = l.guide.as_ref().is_some_and(|g| g.is_finished());
        let at_limit = generated.len() >= l.max_tokens || seq.tokens.len() >= ctx;
        if !eos && !complete && !at_limit && !self.tail_has_stop(generated, &p.stop) {
            return None;
        }
        let visible = if is_eos && (eos || complete) {
            &generated[..generated.len() - 1]
        } else {
            generated
        };
        let text = match self.tokenizer.decode(visible) {
            Ok(t) => t,
            Err(e) => {
                return Some(Err(LineError::new(
                    codes::INTERNAL,
                    format!("line {}: {e}", req.line),
                )))
            }
        };
        let cut = p
            .stop
            .iter()
            .filter_map(|stop| text.find(stop.as_str()))
            .min();
        let (text, finish_reason) = match cut {
            Some(cut) => (text[..cut].to_string(), FinishReason::Stop),
            None if eos || complete => (text, FinishReason::Stop),
            None if at_limit => (text, FinishReason::Length),
            None => return None,
        };
        let logprobs = p
            .logprobs
            .map(|_| self.visible_logprobs(&l.logprobs, visible, text.len()));
        Some(Ok(Choice {
            text,
            token_ids: generated.to_vec(),
            finish_reason,
            logprobs,
        }))
    }

    /// The logprobs of the tokens whose text is in the output (`text_len` bytes of the decoded
    /// `visible` tokens), each with its text and its offset in the output.
    pub(super) fn visible_logprobs(
        &self,
        all: &[TokenLogprob],
        visible: &[u32],
        text_len: usize,
    ) -> Vec<OutputLogprob> {
        let piece = |id: u32| self.tokenizer.decode(&[id]).unwrap_or_default();
        let mut out = Vec::new();
        let mut offset = 0;
        for (i, lp) in all.iter().enumerate().take(visible.len()) {
            if offset >= text_len {
                break;
            }
            // Offsets from decoding the prefix, so multi-token characters land where they end.
            let end = self
                .tokenizer
                .decode(&visible[..=i])
                .map_or(offset, |t| t.len());
            out.push(OutputLogprob {
                text: piece(lp.token),
                logprob: lp.logprob,
                offset,
                top: lp.top.iter().map(|&(id, l)| (piece(id), l)).collect(),
            });
            offset = end;
        }
        out
    }
}
