//! A shard's results: grouped into messages that fit NATS, published, their PubAcks checked;
//! the error lines of a shard's last delivery; the echo engine's answers.

use super::*;

pub(super) type PendingAck = (Vec<(String, usize)>, jetstream::context::PublishAckFuture);

/// Awaits the PubAcks of published results messages. JetStream answers "duplicate" when a
/// message with the same id is in its dedupe window; the id is a hash of the lines the message
/// reports, so that is a redelivered shard's repeat — unless the stored message says otherwise,
/// which is checked (it is rare) and is an error: the lines were never published.
pub(super) async fn await_acks(
    shared: &Shared,
    acks: &mut Vec<PendingAck>,
    published: &mut HashSet<String>,
) -> Result<(), ShardError> {
    for (keys, ack) in acks.drain(..) {
        let ack = ack.await.map_err(|e| ShardError::Transport(anyhow!(e)))?;
        if ack.duplicate {
            let stored = shared
                .results
                .get_raw_message(ack.sequence)
                .await
                .map_err(|e| ShardError::Transport(anyhow!(e)))?;
            let same = decode_results(&stored.payload).is_ok_and(|rs| {
                rs.len() == keys.len()
                    && rs
                        .iter()
                        .zip(&keys)
                        .all(|(r, (c, l))| &r.custom_id == c && r.line == *l)
            });
            if !same {
                return Err(ShardError::Failed(format!(
                    "JetStream called results message {} a duplicate of sequence {}, which \
                     reports other lines; these results were not stored",
                    keys.len(),
                    ack.sequence
                )));
            }
        }
        published.extend(keys.into_iter().map(|(c, _)| c));
    }
    Ok(())
}

/// The server's `max_payload` less room for headers: the largest results message to send.
pub(super) fn max_message_bytes(client: &async_nats::Client) -> usize {
    (client.server_info().max_payload)
        .saturating_sub(16 * 1024)
        .max(4096)
}

/// A result and its serialised size; a result too large for one message becomes an error
/// result for its line (it could never be published, and retrying would not shrink it).
pub(super) fn fit_result(result: ResultMessage, max_bytes: usize) -> (ResultMessage, usize) {
    let size = serde_json::to_vec(&result).map_or(usize::MAX, |v| v.len());
    if size <= max_bytes {
        return (result, size);
    }
    let failed = ResultMessage {
        outcome: ResultOutcome::Failed {
            error: LineError::new(
                codes::RESPONSE_TOO_LARGE,
                format!(
                    "line {}: the response is {size} bytes, more than the {max_bytes} bytes one \
                     NATS message can carry; lower max_tokens or n",
                    result.line
                ),
            ),
        },
        ..result
    };
    let size = serde_json::to_vec(&failed).map_or(0, |v| v.len());
    (failed, size)
}

/// Publishes an error line for every line of the shard without a result.
pub(super) async fn fail_rest(
    shared: &Shared,
    shard: &ShardMessage,
    published: &HashSet<String>,
    delivered: i64,
    reason: &str,
) -> Result<()> {
    let mut acks = Vec::new();
    for r in shard
        .requests
        .iter()
        .filter(|r| !published.contains(&r.custom_id))
    {
        let result = shard.failed_line(r, delivered, reason);
        let ack = shared
            .js
            .send_publish(
                result_subject(&shard.batch_id),
                jetstream::message::PublishMessage::build()
                    .payload(serde_json::to_vec(&result)?.into())
                    .message_id(result_msg_id(&shard.batch_id, &r.custom_id, r.line)),
            )
            .await?;
        acks.push(ack);
    }
    for a in acks {
        a.await?;
    }
    Ok(())
}

pub(super) fn to_result(
    shard: &ShardMessage,
    o: Outcome,
    model_name: &str,
    ids: &mut IdGen,
) -> ResultMessage {
    match o {
        Outcome::Done(c) => ResultMessage {
            batch_id: shard.batch_id.clone(),
            custom_id: c.custom_id.clone(),
            line: c.line,
            shard: Some(shard.shard),
            outcome: ResultOutcome::Completed {
                body: response_body(&c, model_name, ids),
                finish_reason: c
                    .choices
                    .first()
                    .map_or(FinishReason::Stop, |ch| ch.finish_reason),
                usage: c.usage,
            },
        },
        Outcome::Failed {
            custom_id,
            line,
            error,
        } => ResultMessage {
            batch_id: shard.batch_id.clone(),
            custom_id,
            line,
            shard: Some(shard.shard),
            outcome: ResultOutcome::Failed { error },
        },
    }
}

/// The echo generator's answer: the prompt itself, as one choice per `n`.
pub(super) fn echo(req: Request) -> Outcome {
    let text = match &req.prompt {
        Prompt::Text(t) => t.clone(),
        Prompt::Chat(m) => m.last().map(|m| m.content.clone()).unwrap_or_default(),
        Prompt::Tokens(ids) => ids
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(" "),
    };
    let words = text.split_whitespace().count();
    let n = req.params.n.max(1);
    Outcome::Done(Completion {
        custom_id: req.custom_id,
        line: req.line,
        endpoint: req.endpoint,
        model: req.model,
        choices: (0..n)
            .map(|_| Choice {
                text: text.clone(),
                token_ids: Vec::new(),
                finish_reason: FinishReason::Stop,
                logprobs: None,
            })
            .collect(),
        usage: Usage::new(words, words * n),
        time_to_first_token: Duration::ZERO,
        decode_time: Duration::ZERO,
        tool_choice: None,
    })
}
