//! The HTTP API: OpenAI's Files and Batches endpoints, with OpenAI's object and error shapes,
//! plus `/healthz`, `/readyz`, `/metrics` and the dashboard (`/`, its data at `/v1/dashboard`).
//!
//! With an API key set, every `/v1` request must carry `Authorization: Bearer <key>` (compared
//! in constant time); the probes and `/metrics` stay open for the kubelet and Prometheus.
//!
//! The API is served from the moment the process starts, through a [`Gate`]: while this
//! coordinator stands by for the leader lease it forwards every `/v1` request to the leader
//! named in the lease (503 naming the problem when there is none, or it does not answer),
//! `/readyz` says whether it has a leader to forward to, and `/metrics` reports
//! `gristmill_coordinator_leader 0`.
//!
//! By resource: this file holds errors, the gate, authentication, extractors, the router and
//! the probes; `files` and `batches` the OpenAI endpoints; `dashboard` the operator's page and
//! its data; `forward` the standby's proxy.

mod batches;
mod dashboard;
mod files;
mod forward;

use batches::*;
use files::*;
pub use files::{read_upload, Upload};
use forward::*;

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use axum::body::{Body, Bytes};
use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::QueryRejection;
use axum::extract::FromRequestParts;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gristmill_protocol::Endpoint;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::batch::{parse_completion_window, BatchRecord, BatchStatus};
use crate::lease::Lease;
use crate::server::FileObject;
use crate::server::{now_s, Coordinator, Settings};
use crate::tenants::{owns, ApiKeys, DEFAULT_TENANT};

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    fn not_found(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            ..Self::invalid(message, param)
        }
    }

    fn unavailable(message: String, code: &'static str) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message,
            kind: "server_error",
            param: None,
            code: Some(code),
        }
    }

    /// An internal failure: the details go to the log under a request id, the client gets
    /// the id (internal error text can name NATS subjects, keys and servers).
    fn internal(e: anyhow::Error) -> Self {
        let request_id = format!("req_{}", nuid::next());
        tracing::error!(request_id, error = format!("{e:#}"), "request failed");
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!(
                "the coordinator failed to serve this request; quote request id {request_id} to its operator"
            ),
            kind: "server_error",
            param: None,
            code: Some("internal_error"),
        }
    }

    /// The store (NATS) did not take a change; nothing changed and the request may be sent
    /// again.
    fn store_unavailable(e: anyhow::Error, what: &str) -> Self {
        let request_id = format!("req_{}", nuid::next());
        tracing::error!(
            request_id,
            error = format!("{e:#}"),
            "{what} failed: the store did not take the change"
        );
        Self::unavailable(
            format!("{what} could not be stored (request id {request_id}); nothing changed: retry shortly"),
            "store_unavailable",
        )
    }

    fn conflict(message: String, code: &'static str) -> Self {
        Self {
            status: StatusCode::CONFLICT,
            message,
            kind: "invalid_request_error",
            param: None,
            code: Some(code),
        }
    }

    /// A request the framework could not read (query string, path, multipart framing), in
    /// OpenAI's shape rather than plain text.
    fn rejected(r: impl std::fmt::Display, param: Option<&'static str>) -> Self {
        Self::invalid(format!("the request could not be read: {r}"), param)
    }
}

impl ApiError {
    /// The HTTP status it answers with.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The message it tells the client.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code,
        }});
        (self.status, Json(body)).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        Self::internal(e)
    }
}

type ApiResult<T> = Result<T, ApiError>;
type AppState = Arc<Gate>;

/// What the API serves from: nothing but standby answers until this process leads, then the
/// coordinator.
pub struct Gate {
    api_keys: Option<ApiKeys>,
    max_bytes: u64,
    lease: Arc<Lease>,
    coordinator: OnceLock<Arc<Coordinator>>,
    /// Forwards a standby's requests to the leader.
    client: Client<HttpConnector, Body>,
    /// Request durations by method, route and status class (`/metrics`).
    latency: Latency,
}

/// Labels of a request's duration: method, route (the matched pattern, `/v1/batches/{id}`),
/// status class (`2xx`).
type LatencyLabels = Vec<(&'static str, String)>;
type Latency = prometheus_client::metrics::family::Family<
    LatencyLabels,
    prometheus_client::metrics::histogram::Histogram,
    fn() -> prometheus_client::metrics::histogram::Histogram,
>;

fn latency_histogram() -> prometheus_client::metrics::histogram::Histogram {
    // 1 ms to about 33 s.
    prometheus_client::metrics::histogram::Histogram::new(
        prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 16),
    )
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("lease", &self.lease)
            .field("leading", &self.coordinator.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Gate {
    pub fn new(settings: &Settings, lease: Arc<Lease>) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(std::time::Duration::from_secs(5)));
        Arc::new(Self {
            api_keys: settings.api_keys.clone(),
            max_bytes: settings.limits.max_bytes,
            lease,
            coordinator: OnceLock::new(),
            client: Client::builder(TokioExecutor::new()).build(connector),
            latency: Latency::new_with_constructor(latency_histogram),
        })
    }

    /// Starts serving from `c` (once this process holds the lease).
    pub fn open(&self, c: Arc<Coordinator>) {
        if self.coordinator.set(c).is_err() {
            tracing::error!("the API gate was opened twice; the first coordinator stays");
        }
    }

    /// A standby's 503, code `no_leader`: the request went nowhere and is safe to send again
    /// (`leader_unreachable` replaces the code when a forwarded request's answer was lost).
    fn standby_error(&self, why: &str) -> ApiError {
        ApiError::unavailable(
            format!(
                "coordinator {} is standing by and {why}; retry shortly",
                self.lease.identity()
            ),
            "no_leader",
        )
    }
}

/// The `{id}` of a path: one of our ids (`file-…`, `batch_…`; letters, digits, `-`, `_`), or
/// a 404 in OpenAI's shape before anything is looked up (an id never reaches NATS unchecked).
#[derive(Debug)]
pub struct Id(pub String);

impl FromRequestParts<AppState> for Id {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, g: &AppState) -> Result<Self, ApiError> {
        let Path(id) = Path::<String>::from_request_parts(parts, g)
            .await
            .map_err(|r| ApiError::rejected(r.body_text(), Some("id")))?;
        if !crate::server::valid_id(&id) {
            let shown: String = id.chars().take(80).collect();
            return Err(ApiError::not_found(
                format!("No such object: {shown:?} is not a file or batch id"),
                Some("id"),
            ));
        }
        Ok(Id(id))
    }
}

/// The leading coordinator, or a 503 from a standby.
#[derive(Debug)]
pub struct Leader(pub Arc<Coordinator>);

impl FromRequestParts<AppState> for Leader {
    type Rejection = ApiError;

    async fn from_request_parts(_: &mut Parts, g: &AppState) -> Result<Self, ApiError> {
        // `to_leader` sends a standby's requests elsewhere before they get here.
        g.coordinator
            .get()
            .map(|c| Leader(c.clone()))
            .ok_or_else(|| g.standby_error("cannot answer this itself"))
    }
}

/// The router of the coordinator's HTTP API.
pub fn router(c: Arc<Gate>) -> Router {
    // Room for the multipart framing around the largest accepted file.
    let body_limit = c.max_bytes as usize + (1 << 20);
    let v1 = Router::new()
        .route("/v1/files", post(upload_file).get(list_files))
        .route("/v1/files/{id}", get(get_file).delete(delete_file))
        .route("/v1/files/{id}/content", get(file_content))
        .route("/v1/batches", post(create_batch).get(list_batches))
        .route("/v1/batches/{id}", get(get_batch))
        .route("/v1/batches/{id}/cancel", post(cancel_batch))
        .route("/v1/dashboard", get(dashboard::overview))
        .route("/v1/dashboard/batches/{id}", get(dashboard::batch_page))
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::from_fn_with_state(c.clone(), to_leader))
        .layer(middleware::from_fn_with_state(c.clone(), require_key))
        .layer(DefaultBodyLimit::max(body_limit));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/", get(dashboard::page))
        .route("/dashboard/app.js", get(dashboard::script))
        .route("/dashboard/style.css", get(dashboard::styles))
        .merge(v1)
        .layer(middleware::from_fn_with_state(c.clone(), http_span))
        .with_state(c)
}

/// Every request runs in a span naming it, so that what it logs says which request it was,
/// and its duration is counted by method, route and status class.
async fn http_span(State(g): State<AppState>, req: Request, next: Next) -> Response {
    use tracing::Instrument;
    let span = tracing::info_span!("http", method = %req.method(), path = %req.uri().path());
    // Known methods only: a client's invented method must not make a series of its own.
    let method = match *req.method() {
        Method::GET | Method::POST | Method::DELETE | Method::HEAD | Method::PUT => {
            req.method().to_string()
        }
        _ => "other".to_string(),
    };
    // The pattern, never the path itself: ids would make a series per object.
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let start = std::time::Instant::now();
    let response = next.run(req).instrument(span).await;
    let labels: LatencyLabels = vec![
        ("method", method),
        ("route", route),
        ("code", format!("{}xx", response.status().as_u16() / 100)),
    ];
    g.latency
        .get_or_create(&labels)
        .observe(start.elapsed().as_secs_f64());
    response
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        ..ApiError::invalid(format!("{method} is not allowed on {}", uri.path()), None)
    }
}

async fn unknown_route(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(
        format!("Unknown request URL: {method} {}", uri.path()),
        None,
    )
}

/// Whether a request's key is read-only (absent: no keys, or a full key).
#[derive(Debug, Clone, Copy)]
pub struct ReadOnly(pub bool);

/// The tenant a request acts for (from its API key; the default tenant without keys).
#[derive(Debug, Clone)]
pub struct Tenant(pub String);

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, ApiError> {
        // `require_key` runs before every /v1 handler and always sets it.
        parts
            .extensions
            .get::<Tenant>()
            .cloned()
            .ok_or_else(|| ApiError::internal(anyhow::anyhow!("no tenant on an API request")))
    }
}

/// Authenticates a `/v1` request (keys compared in constant time, [`ApiKeys::tenant`]) and
/// marks it with its tenant.
async fn require_key(State(c): State<AppState>, mut req: Request, next: Next) -> Response {
    let mut tenant = DEFAULT_TENANT.to_string();
    if let Some(keys) = &c.api_keys {
        let header = req
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or("?"));
        // The scheme is case-insensitive (RFC 9110 §11.1).
        let given = header.and_then(|v| {
            let (scheme, key) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
        });
        let found = given.and_then(|g| keys.access(g.as_bytes()));
        if let Some((t, read_only)) = found {
            tenant = t.to_string();
            if read_only && !matches!(*req.method(), Method::GET | Method::HEAD) {
                return ApiError {
                    status: StatusCode::FORBIDDEN,
                    message: format!("This API key is read-only: it can read {t}'s files and batches but not {} {}.", req.method(), req.uri().path()),
                    kind: "invalid_request_error",
                    param: None,
                    code: Some("read_only_key"),
                }
                .into_response();
            }
            req.extensions_mut().insert(ReadOnly(read_only));
        } else {
            let message = match (header, given) {
                (None, _) => "You didn't provide an API key. Provide it in the Authorization header as `Bearer <key>`.",
                (Some(_), None) => "The Authorization header must be `Bearer <key>`.",
                (Some(_), Some(_)) => "Incorrect API key provided.",
            };
            return ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: message.into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("invalid_api_key"),
            }
            .into_response();
        }
    }
    req.extensions_mut().insert(Tenant(tenant));
    next.run(req).await
}

async fn ready(State(g): State<AppState>) -> Response {
    match g.coordinator.get() {
        Some(c) if c.ready.load(Ordering::SeqCst) && c.connected() => "ready".into_response(),
        Some(_) => (StatusCode::SERVICE_UNAVAILABLE, "not connected to NATS").into_response(),
        None if g.lease.is_valid() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "leader: loading batches from NATS",
        )
            .into_response(),
        None => match g.lease.holder() {
            Some(h) if !h.url.is_empty() => format!(
                "standby: forwarding to the leader {} at {}",
                h.identity, h.url
            )
            .into_response(),
            _ => (
                StatusCode::SERVICE_UNAVAILABLE,
                "standby: no leader to forward to yet",
            )
                .into_response(),
        },
    }
}

async fn metrics(State(g): State<AppState>) -> Response {
    let leader = g.coordinator.get();
    let mut registries = vec![crate::server::leader_registry(leader.is_some())];
    let mut http = prometheus_client::registry::Registry::default();
    http.register(
        "gristmill_http_request_duration_seconds",
        "Durations of the coordinator's HTTP requests, by method, route pattern and status class.",
        g.latency.clone(),
    );
    registries.push(http);
    if let Some(c) = leader {
        registries.push(c.metrics().await);
    }
    let text = crate::server::exposition(&registries);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

// -------------------------------------------------------------------- files

#[derive(Debug, Deserialize)]
struct ListQuery {
    after: Option<String>,
    limit: Option<String>,
    purpose: Option<String>,
    order: Option<String>,
}

fn parse_limit(q: &ListQuery, default: usize, max: usize) -> ApiResult<usize> {
    match &q.limit {
        None => Ok(default),
        Some(t) => match t.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(ApiError::invalid(
                format!("limit must be an integer from 1 to {max}, got {t:?}"),
                Some("limit"),
            )),
        },
    }
}

/// A page of a list after the `after` cursor.
fn page(items: Vec<(String, Value)>, after: Option<&str>, limit: usize) -> ApiResult<Value> {
    let start = match after {
        None => 0,
        Some(a) => items
            .iter()
            .position(|(id, _)| id == a)
            .map(|i| i + 1)
            .ok_or_else(|| {
                ApiError::invalid(format!("after: no object with id {a:?}"), Some("after"))
            })?,
    };
    let rest = &items[start.min(items.len())..];
    let data: Vec<Value> = rest.iter().take(limit).map(|(_, v)| v.clone()).collect();
    let first = rest.first().map(|(id, _)| id.clone());
    let last = rest[..limit.min(rest.len())]
        .last()
        .map(|(id, _)| id.clone());
    Ok(json!({
        "object": "list", "data": data, "first_id": first, "last_id": last,
        "has_more": rest.len() > limit,
    }))
}

// -------------------------------------------------------------------- batches

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_follow_the_after_cursor() {
        let items: Vec<(String, Value)> = (0..5).map(|i| (format!("b{i}"), json!(i))).collect();
        let p = page(items.clone(), None, 2).expect("page");
        assert_eq!(p["data"], json!([0, 1]));
        assert_eq!(p["has_more"], true);
        assert_eq!(p["last_id"], "b1");
        let p = page(items.clone(), Some("b3"), 2).expect("page");
        assert_eq!(p["data"], json!([4]));
        assert_eq!(p["has_more"], false);
        assert!(page(items, Some("nope"), 2).is_err());
    }
}
