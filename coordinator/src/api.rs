//! The HTTP API: OpenAI's Files and Batches endpoints, with OpenAI's object and error shapes,
//! plus `/healthz`, `/readyz` and `/metrics`.
//!
//! With an API key set, every `/v1` request must carry `Authorization: Bearer <key>` (compared
//! in constant time); the probes and `/metrics` stay open for the kubelet and Prometheus.
//!
//! The API is served from the moment the process starts, through a [`Gate`]: while this
//! coordinator stands by for the leader lease it forwards every `/v1` request to the leader
//! named in the lease (503 naming the problem when there is none, or it does not answer),
//! `/readyz` says whether it has a leader to forward to, and `/metrics` reports
//! `gristmill_coordinator_leader 0`.

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

/// How long a standby waits for the leader's answer to start (a paused leader accepts
/// connections but never answers; the largest upload must fit).
const FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Marks a request a standby forwarded (a standby never forwards one again).
const FORWARDED_BY: &str = "gristmill-forwarded-by";

/// Headers of one connection, not of the request (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The leader answers `/v1` itself; a standby forwards to the leader in the lease.
async fn to_leader(State(g): State<AppState>, req: Request, next: Next) -> Response {
    if g.coordinator.get().is_some() {
        return next.run(req).await;
    }
    if g.lease.is_valid() {
        return ApiError::unavailable(
            format!(
                "coordinator {} leads and is still loading its batches; retry shortly",
                g.lease.identity()
            ),
            "no_leader",
        )
        .into_response();
    }
    if req.headers().contains_key(FORWARDED_BY) {
        return g
            .standby_error("received a request another standby forwarded")
            .into_response();
    }
    let Some(leader) = g.lease.holder().filter(|h| !h.url.is_empty()) else {
        return g.standby_error("knows no leader yet").into_response();
    };
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = match format!("{}{path}", leader.url.trim_end_matches('/')).parse::<Uri>() {
        Ok(u) => u,
        Err(e) => {
            return g
                .standby_error(&format!(
                    "the leader's URL {:?} is unusable ({e})",
                    leader.url
                ))
                .into_response()
        }
    };
    for h in HOP_BY_HOP.iter().chain(&["host"]) {
        parts.headers.remove(*h);
    }
    if let Ok(v) = HeaderValue::from_str(g.lease.identity()) {
        parts.headers.insert(FORWARDED_BY, v);
    }
    let answer = tokio::time::timeout(
        FORWARD_TIMEOUT,
        g.client.request(Request::from_parts(parts, body)),
    )
    .await;
    let answer = match answer {
        Ok(a) => a,
        Err(_) => {
            return ApiError::unavailable(
                format!(
                    "coordinator {} forwarded the request to the leader {} at {}, which did not answer within {} s",
                    g.lease.identity(),
                    leader.identity,
                    leader.url,
                    FORWARD_TIMEOUT.as_secs()
                ),
                "leader_unreachable",
            )
            .into_response();
        }
    };
    match answer {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            for h in HOP_BY_HOP {
                parts.headers.remove(h);
            }
            Response::from_parts(parts, Body::new(body))
        }
        Err(e) if e.is_connect() => g
            .standby_error(&format!(
                "cannot reach the leader {} at {} ({e})",
                leader.identity, leader.url
            ))
            .into_response(),
        // The request may have reached the leader: only the client knows whether sending it
        // again is safe.
        Err(e) => ApiError::unavailable(
            format!(
                "coordinator {} forwarded the request to the leader {} at {}, whose answer was lost ({e})",
                g.lease.identity(),
                leader.identity,
                leader.url
            ),
            "leader_unreachable",
        )
        .into_response(),
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
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::from_fn_with_state(c.clone(), to_leader))
        .layer(middleware::from_fn_with_state(c.clone(), require_key))
        .layer(DefaultBodyLimit::max(body_limit));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .merge(v1)
        .with_state(c)
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
        let found = given.and_then(|g| keys.tenant(g.as_bytes()));
        if let Some(t) = found {
            tenant = t.to_string();
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
    let mut text = format!(
        "# HELP gristmill_coordinator_leader Whether this coordinator holds the leader lease (standbys forward to the leader).\n# TYPE gristmill_coordinator_leader gauge\ngristmill_coordinator_leader {}\n",
        u8::from(leader.is_some())
    );
    if let Some(c) = leader {
        text.push_str(&c.metrics().await);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

// -------------------------------------------------------------------- files

const PURPOSES: [&str; 4] = ["batch", "batch_output", "user_data", "evals"];

async fn upload_file(
    Leader(c): Leader,
    Tenant(tenant): Tenant,
    form: Result<Multipart, MultipartRejection>,
) -> ApiResult<Json<Value>> {
    let form = form.map_err(|r| ApiError::rejected(r.body_text(), None))?;
    // The file part streams into the object store while the form is read.
    let id = format!("file-{}", nuid::next());
    let (writer, mut reader) = tokio::io::duplex(256 * 1024);
    let (form, stored) = tokio::join!(
        read_upload(form, c.settings.limits.max_bytes, writer),
        c.store_object(&id, &mut reader)
    );
    let up = match (form, stored) {
        (Ok(up), Ok(_)) => up,
        (Err(e), stored) => {
            if stored.is_ok() {
                c.discard_object(&id).await;
            }
            return Err(e);
        }
        (Ok(_), Err(e)) => return Err(e.into()),
    };
    let f = c
        .register_file(id, up.filename, up.purpose, up.bytes, &tenant)
        .await?;
    Ok(Json(f.to_openai()))
}

/// The parts of a Files API upload (the file's bytes went to the caller's writer).
#[derive(Debug)]
pub struct Upload {
    pub purpose: String,
    pub filename: String,
    pub bytes: u64,
}

/// Most bytes of a `purpose` part read (OpenAI's purposes are short words).
const MAX_PURPOSE_BYTES: usize = 64;

/// Reads an upload's multipart form: exactly one `purpose` (one of OpenAI's) and one `file` of
/// at most `max` bytes, whose bytes are written to `file` as they arrive (and `file` shut
/// down at its end); other parts are skipped. Every problem is a 4xx naming it; the caller
/// discards what reached `file` then.
pub async fn read_upload(
    mut form: Multipart,
    max: u64,
    mut file: impl tokio::io::AsyncWrite + Unpin,
) -> Result<Upload, ApiError> {
    use tokio::io::AsyncWriteExt;
    let too_large = || ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!(
            "the file is larger than the limit of {max} bytes: split the batch into several files"
        ),
        kind: "invalid_request_error",
        param: Some("file"),
        code: Some("file_too_large"),
    };
    let unreadable = |what: &'static str, e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            ApiError::invalid(format!("unreadable {what}: {e}"), Some(what))
        }
    };
    let mut purpose: Option<Vec<u8>> = None;
    let mut got_file: Option<(String, u64)> = None;
    loop {
        let mut field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => return Err(too_large()),
            Err(e) => {
                return Err(ApiError::invalid(
                    format!("unreadable multipart body: {e}"),
                    None,
                ))
            }
        };
        let twice = |name: &'static str| {
            ApiError::invalid(
                format!("the form has more than one {name:?} part; send exactly one"),
                Some(name),
            )
        };
        match field.name() {
            Some("purpose") => {
                if purpose.is_some() {
                    return Err(twice("purpose"));
                }
                let mut text = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(|e| unreadable("purpose", e))? {
                    if text.len() + chunk.len() > MAX_PURPOSE_BYTES {
                        return Err(ApiError::invalid(
                            format!("purpose is longer than {MAX_PURPOSE_BYTES} bytes; use one of {PURPOSES:?}"),
                            Some("purpose"),
                        ));
                    }
                    text.extend_from_slice(&chunk);
                }
                purpose = Some(text);
            }
            Some("file") => {
                if got_file.is_some() {
                    return Err(twice("file"));
                }
                let name: String = field
                    .file_name()
                    .unwrap_or("upload.jsonl")
                    .chars()
                    .take(256)
                    .collect();
                let mut bytes = 0u64;
                while let Some(chunk) = field.chunk().await.map_err(|e| unreadable("file", e))? {
                    bytes += chunk.len() as u64;
                    if bytes > max {
                        return Err(too_large());
                    }
                    file.write_all(&chunk).await.map_err(|e| {
                        ApiError::internal(anyhow::anyhow!(e).context("storing the upload"))
                    })?;
                }
                got_file = Some((name, bytes));
            }
            _ => {}
        }
    }
    let purpose = purpose
        .ok_or_else(|| ApiError::invalid("missing required parameter: purpose", Some("purpose")))?;
    let purpose = String::from_utf8_lossy(&purpose).into_owned();
    if !PURPOSES.contains(&purpose.as_str()) {
        return Err(ApiError::invalid(
            format!("purpose {purpose:?} is not supported; use one of {PURPOSES:?}"),
            Some("purpose"),
        ));
    }
    let (filename, bytes) = got_file
        .ok_or_else(|| ApiError::invalid("missing required parameter: file", Some("file")))?;
    file.shutdown()
        .await
        .map_err(|e| ApiError::internal(anyhow::anyhow!(e).context("storing the upload")))?;
    Ok(Upload {
        purpose,
        filename,
        bytes,
    })
}

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

async fn list_files(
    Leader(c): Leader,
    Tenant(tenant): Tenant,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q.map_err(|r| ApiError::rejected(r.body_text(), None))?;
    let limit = parse_limit(&q, 10_000, 10_000)?;
    let mut files = c.list_files().await?;
    files.retain(|f| owns(f.owner.as_deref(), &tenant));
    if let Some(p) = &q.purpose {
        files.retain(|f| &f.purpose == p);
    }
    if q.order.as_deref() == Some("asc") {
        files.reverse();
    }
    let items = files
        .into_iter()
        .map(|f| (f.id.clone(), f.to_openai()))
        .collect();
    Ok(Json(page(items, q.after.as_deref(), limit)?))
}

fn no_file(id: &str) -> ApiError {
    ApiError::not_found(format!("No such File object: {id}"), Some("id"))
}

/// The file `id` if `tenant` owns it (another tenant's file is as good as absent).
async fn owned_file(c: &Coordinator, id: &str, tenant: &str) -> ApiResult<FileObject> {
    c.file(id)
        .await?
        .filter(|f| owns(f.owner.as_deref(), tenant))
        .ok_or_else(|| no_file(id))
}

async fn get_file(Leader(c): Leader, Tenant(t): Tenant, Id(id): Id) -> ApiResult<Json<Value>> {
    Ok(Json(owned_file(&c, &id, &t).await?.to_openai()))
}

async fn delete_file(Leader(c): Leader, Tenant(t): Tenant, Id(id): Id) -> ApiResult<Json<Value>> {
    owned_file(&c, &id, &t).await?;
    if let Some(batch) = c.batch_using(&id) {
        return Err(ApiError::conflict(
            format!("file {id} is the input of batch {batch}, which is still running; delete it once the batch has ended (or cancel the batch)"),
            "file_in_use",
        ));
    }
    if !c.delete_file(&id).await? {
        return Err(no_file(&id));
    }
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})))
}

async fn file_content(Leader(c): Leader, Tenant(t): Tenant, Id(id): Id) -> ApiResult<Response> {
    let f = owned_file(&c, &id, &t).await?;
    let obj = c.file_reader(&id).await?;
    // Streamed in pieces: an output file of gigabytes is never held whole.
    let pieces = futures_util::stream::unfold(Some(obj), |obj| async move {
        use tokio::io::AsyncReadExt;
        let mut obj = obj?;
        let mut buf = vec![0u8; 256 * 1024];
        match obj.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), Some(obj)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, f.bytes.to_string()),
        ],
        Body::from_stream(pieces),
    )
        .into_response())
}

// -------------------------------------------------------------------- batches

async fn create_batch(
    Leader(c): Leader,
    Tenant(tenant): Tenant,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}"), None))?;
    let field = |name: &'static str| -> ApiResult<String> {
        match v.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(ApiError::invalid(
                format!("{name} must be a string, got {other}"),
                Some(name),
            )),
            None => Err(ApiError::invalid(
                format!("missing required parameter: {name}"),
                Some(name),
            )),
        }
    };
    let input_file_id = field("input_file_id")?;
    let endpoint_text = field("endpoint")?;
    let window_text = field("completion_window")?;
    let endpoint = Endpoint::parse(&endpoint_text).ok_or_else(|| {
        ApiError::invalid(
            format!(
                "endpoint {endpoint_text:?} is not supported; use \"/v1/chat/completions\" or \"/v1/completions\""
            ),
            Some("endpoint"),
        )
    })?;
    let window = parse_completion_window(&window_text)
        .map_err(|e| ApiError::invalid(e, Some("completion_window")))?;
    let metadata = match v.get("metadata") {
        None | Some(Value::Null) => None,
        Some(Value::Object(m)) => {
            if m.len() > 16 {
                return Err(ApiError::invalid(
                    "metadata may hold at most 16 keys",
                    Some("metadata"),
                ));
            }
            if let Some((k, _)) = m
                .iter()
                .find(|(k, v)| k.len() > 64 || v.as_str().is_none_or(|s| s.len() > 512))
            {
                return Err(ApiError::invalid(
                    format!("metadata[{k:?}]: keys are strings of at most 64 characters, values strings of at most 512"),
                    Some("metadata"),
                ));
            }
            Some(Value::Object(m.clone()))
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "metadata must be an object of strings",
                Some("metadata"),
            ))
        }
    };
    let file = c
        .file(&input_file_id)
        .await?
        .filter(|f| owns(f.owner.as_deref(), &tenant))
        .ok_or_else(|| {
            ApiError::not_found(
                format!("No such File object: {input_file_id}"),
                Some("input_file_id"),
            )
        })?;
    if file.purpose != "batch" {
        return Err(ApiError::invalid(
            format!("file {input_file_id} has purpose {:?}; a batch's input file must be uploaded with purpose \"batch\"", file.purpose),
            Some("input_file_id"),
        ));
    }
    let mut rec = BatchRecord::new(
        format!("batch_{}", nuid::next()),
        endpoint,
        input_file_id,
        window_text,
        window,
        metadata,
        now_s(),
    );
    rec.owner = (tenant != DEFAULT_TENANT).then_some(tenant);
    let rec = c.create_batch(rec).await?;
    Ok(Json(rec.to_openai()))
}

fn no_batch(id: &str) -> ApiError {
    ApiError::not_found(format!("No such Batch object: {id}"), Some("id"))
}

/// The batch `id` if `tenant` owns it (another tenant's batch is as good as absent).
fn owned_batch(c: &Coordinator, id: &str, tenant: &str) -> ApiResult<BatchRecord> {
    c.batch(id)
        .filter(|b| owns(b.owner.as_deref(), tenant))
        .ok_or_else(|| no_batch(id))
}

async fn get_batch(Leader(c): Leader, Tenant(t): Tenant, Id(id): Id) -> ApiResult<Json<Value>> {
    Ok(Json(batch_json(&c, &owned_batch(&c, &id, &t)?)))
}

/// OpenAI's batch object, and while it runs Gristmill's `progress` extension: the shards the
/// workers say they are running and the tokens those shards' unfinished lines have generated
/// (advisory, between results; `request_counts` and `usage` count finished lines only).
fn batch_json(c: &Coordinator, b: &BatchRecord) -> Value {
    let mut v = b.to_openai();
    if b.status == BatchStatus::InProgress {
        let r = c.running(&b.id);
        v["progress"] = serde_json::json!({
            "running_shards": r.shards,
            "running_output_tokens": r.output_tokens,
        });
    }
    v
}

async fn list_batches(
    Leader(c): Leader,
    Tenant(tenant): Tenant,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = q.map_err(|r| ApiError::rejected(r.body_text(), None))?;
    let limit = parse_limit(&q, 20, 100)?;
    let items = c
        .list_batches()
        .into_iter()
        .filter(|b| owns(b.owner.as_deref(), &tenant))
        .map(|b| (b.id.clone(), batch_json(&c, &b)))
        .collect();
    Ok(Json(page(items, q.after.as_deref(), limit)?))
}

async fn cancel_batch(Leader(c): Leader, Tenant(t): Tenant, Id(id): Id) -> ApiResult<Json<Value>> {
    let rec = owned_batch(&c, &id, &t)?;
    if rec.status.is_terminal() && rec.status != BatchStatus::Cancelled {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            message: format!(
                "batch {id} is already {:?} and cannot be cancelled",
                crate::server::status_name(rec.status)
            ),
            kind: "invalid_request_error",
            param: None,
            code: None,
        });
    }
    let rec = c
        .cancel(&id)
        .await
        .map_err(|e| ApiError::store_unavailable(e, "cancelling the batch"))?
        .ok_or_else(|| no_batch(&id))?;
    Ok(Json(rec.to_openai()))
}

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
