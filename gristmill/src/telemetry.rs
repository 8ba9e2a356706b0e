//! OpenTelemetry export: with `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, every `tracing` span at the log level in force is
//! exported over OTLP/HTTP with protobuf bodies (`opentelemetry-otlp`, batched), through a small
//! HTTP client of ours over ureq (no second HTTP stack). The standard variables apply:
//! `OTEL_SERVICE_NAME` (default `gristmill-<command>`), `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_BSP_SCHEDULE_DELAY`,
//! `OTEL_SDK_DISABLED`. Only `http/protobuf` is spoken: `OTEL_EXPORTER_OTLP_PROTOCOL=grpc` is
//! refused with a message rather than silently ignored.
//!
//! Span ids are random, except where the coordinator asks for derived ones
//! ([`gristmill_coordinator::telemetry::with_ids`]: a batch's root span).

use std::io::Read;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider};

/// The installed exporter: flushed and shut down when dropped (at the end of `main`).
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// The tracer the `tracing` layer exports through.
    pub fn tracer(&self) -> opentelemetry_sdk::trace::Tracer {
        self.provider.tracer("gristmill")
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        // Spans still queued go out now (bounded by the exporter's timeout).
        if let Err(e) = self.provider.shutdown() {
            eprintln!("OpenTelemetry: spans may be lost at exit: {e}");
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The exporter, when the environment asks for one; `service` names this process by default.
pub fn init(service: &str) -> Result<Option<Telemetry>> {
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    let endpoint =
        env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let Some(endpoint) = endpoint else {
        return Ok(None);
    };
    let protocol =
        env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"));
    if let Some(p) = protocol.filter(|p| p != "http/protobuf") {
        bail!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={p} is not supported: gristmill exports OTLP over HTTP with \
             protobuf bodies (http/protobuf); point OTEL_EXPORTER_OTLP_ENDPOINT at the collector's \
             HTTP port (usually 4318)"
        );
    }
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        bail!("OTEL_EXPORTER_OTLP_ENDPOINT must be an http:// or https:// URL, got {endpoint:?}");
    }
    // The exporter reads the endpoint (appending /v1/traces to the generic one), headers and
    // timeout from the environment itself.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(UreqClient::new())
        .with_timeout(Duration::from_secs(10))
        .build()
        .context("setting up the OTLP exporter")?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if env("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_string());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_id_generator(DerivedIds::default())
        .with_resource(resource.build())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    Ok(Some(Telemetry { provider }))
}

/// Random ids, unless the coordinator forces a batch's derived ones on this thread.
#[derive(Debug, Default)]
struct DerivedIds(RandomIdGenerator);

impl IdGenerator for DerivedIds {
    fn new_trace_id(&self) -> TraceId {
        gristmill_coordinator::telemetry::forced_ids()
            .map_or_else(|| self.0.new_trace_id(), |f| f.0)
    }

    fn new_span_id(&self) -> SpanId {
        gristmill_coordinator::telemetry::forced_ids().map_or_else(|| self.0.new_span_id(), |f| f.1)
    }
}

/// OTLP's HTTP client: blocking ureq, run on the batch span processor's own thread.
#[derive(Debug)]
struct UreqClient(ureq::Agent);

impl UreqClient {
    fn new() -> Self {
        Self(
            ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(10))
                .build(),
        )
    }
}

/// The most of a collector's answer read (it is a small protobuf, or an error text).
const MAX_ANSWER: u64 = 1 << 20;

#[async_trait::async_trait]
impl HttpClient for UreqClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let mut req = self
            .0
            .request(parts.method.as_str(), &parts.uri.to_string());
        for (name, value) in &parts.headers {
            req = req.set(name.as_str(), value.to_str()?);
        }
        let answer = match req.send_bytes(&body) {
            Ok(r) => r,
            // A collector's refusal is an answer for the exporter to judge, not a transport error.
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(Box::new(e)),
        };
        let status = answer.status();
        let mut bytes = Vec::new();
        answer
            .into_reader()
            .take(MAX_ANSWER)
            .read_to_end(&mut bytes)?;
        Ok(Response::builder()
            .status(status)
            .body(Bytes::from(bytes))?)
    }
}
