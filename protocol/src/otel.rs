//! `traceparent` values (the NATS header a batch's trace travels in, see
//! [`crate::cluster::TRACEPARENT_HEADER`]) as OpenTelemetry contexts, and back: what the
//! coordinator and the workers need to make one batch one trace across processes.

use crate::cluster::{parse_traceparent, traceparent};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The trace context a `traceparent` value names (a remote parent), if it is one.
pub fn remote_context(value: &str) -> Option<Context> {
    let (trace, span) = parse_traceparent(value)?;
    let sc = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    Some(Context::new().with_remote_span_context(sc))
}

/// The `traceparent` naming `span`, when spans are exported (else `None`).
pub fn span_traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| {
        traceparent(
            &format!("{:032x}", sc.trace_id()),
            &format!("{:016x}", sc.span_id()),
        )
    })
}
