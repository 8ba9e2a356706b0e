//! OpenTelemetry in the coordinator: each batch is one trace, whichever process works on it.
//!
//! The trace id is the batch's derived one ([`batch_trace_id`]), and its root span id is
//! derived too (`span_id([batch])`), so every coordinator (a new leader included) and every
//! worker puts its spans in the same trace without storing anything:
//!
//! - `dispatch` and `finalize` are children of the batch's root;
//! - each shard travels with a `traceparent` naming the `dispatch` span, and the worker's
//!   `shard` span is its child;
//! - each results message comes back with a `traceparent` naming the worker's `shard` span,
//!   and the coordinator counts it under a `results` span, its child;
//! - the root span itself (`batch`, from creation to the end) is exported once the batch ends,
//!   with the derived ids ([`with_ids`] tells the binary's id generator which).
//!
//! Without an exporter (no `OTEL_EXPORTER_OTLP_ENDPOINT`) nothing here costs more than a span
//! the logs already had, and the `traceparent` headers carry the derived ids as before.

use std::cell::Cell;
use std::time::{Duration, UNIX_EPOCH};

use gristmill_protocol::cluster::{batch_trace_id, span_id, traceparent};
pub use gristmill_protocol::otel::{remote_context, span_traceparent};
use opentelemetry::trace::{SpanId, TraceId, Tracer};
use opentelemetry::{Context, KeyValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::batch::BatchRecord;

thread_local! {
    static FORCED: Cell<Option<(TraceId, SpanId)>> = const { Cell::new(None) };
}

/// The ids the next span built on this thread must have, if any (read by the binary's id
/// generator).
pub fn forced_ids() -> Option<(TraceId, SpanId)> {
    FORCED.with(Cell::get)
}

/// Runs `f` with the ids of the spans it builds on this thread forced to `trace` and `span`.
pub fn with_ids<R>(trace: TraceId, span: SpanId, f: impl FnOnce() -> R) -> R {
    FORCED.with(|c| c.set(Some((trace, span))));
    let r = f();
    FORCED.with(|c| c.set(None));
    r
}

/// The batch's root span id.
fn root_ids(batch_id: &str) -> Option<(TraceId, SpanId)> {
    Some((
        TraceId::from_hex(&batch_trace_id(batch_id)).ok()?,
        SpanId::from_hex(&span_id(&[batch_id])).ok()?,
    ))
}

/// Makes `span` a child of the batch's root span (call before the span is first entered).
pub fn under_batch(span: &tracing::Span, batch_id: &str) {
    if let Some((trace, root)) = root_ids(batch_id) {
        let cx = remote_context(&traceparent(
            &format!("{trace:032x}"),
            &format!("{root:016x}"),
        ));
        if let Some(cx) = cx {
            // Fails only for a span that has started already, which callers do not pass.
            let _ = span.set_parent(cx);
        }
    }
}

/// Exports the batch's root span, `batch`, from its creation to now (once it has ended).
pub fn emit_batch_root(rec: &BatchRecord) {
    let Some((trace, root)) = root_ids(&rec.id) else {
        return;
    };
    let tracer = opentelemetry::global::tracer("gristmill-coordinator");
    let start = UNIX_EPOCH + Duration::from_secs(rec.created_at);
    let attributes = vec![
        KeyValue::new("batch.id", rec.id.clone()),
        KeyValue::new(
            "batch.status",
            crate::server::status_name(rec.status).to_string(),
        ),
        KeyValue::new("batch.total", rec.total as i64),
        KeyValue::new("batch.completed", rec.completed as i64),
        KeyValue::new("batch.failed", rec.failed as i64),
        KeyValue::new("batch.completion_tokens", rec.completion_tokens as i64),
    ];
    let mut span = with_ids(trace, root, || {
        tracer
            .span_builder("batch")
            .with_start_time(start)
            .with_attributes(attributes)
            .start_with_context(&tracer, &Context::new())
    });
    opentelemetry::trace::Span::end(&mut span);
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TraceContextExt;

    #[test]
    fn a_traceparent_becomes_a_remote_parent_and_bad_ones_are_refused() {
        let t = batch_trace_id("batch_x");
        let s = span_id(&["batch_x"]);
        let cx = remote_context(&traceparent(&t, &s)).expect("valid");
        let sc = cx.span().span_context().clone();
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(format!("{:032x}", sc.trace_id()), t);
        assert_eq!(format!("{:016x}", sc.span_id()), s);
        assert!(remote_context("00-xyz-abc-01").is_none());
        assert_eq!(
            root_ids("batch_x").map(|(t, _)| format!("{t:032x}")),
            Some(t)
        );
        // Without an exporter installed, spans have no context to name.
        assert_eq!(span_traceparent(&tracing::info_span!("x")), None);
        let forced = with_ids(TraceId::from(7u128), SpanId::from(9u64), forced_ids);
        assert_eq!(forced, Some((TraceId::from(7u128), SpanId::from(9u64))));
        assert_eq!(forced_ids(), None);
    }
}
