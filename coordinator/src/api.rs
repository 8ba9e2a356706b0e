//! The HTTP API: OpenAI's Files and Batches endpoints, with OpenAI's object and error shapes,
//! plus `/healthz`, `/readyz` and `/metrics`.
//!
//! With an API key set, every `/v1` request must carry `Authorization: Bearer <key>` (compared
//! in constant time); the probes and `/metrics` stay open for the kubelet and Prometheus.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, Request, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gristmill_protocol::Endpoint;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::batch::{parse_completion_window, BatchRecord, BatchStatus};
use crate::server::{now_s, Coordinator};

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

    fn internal(e: anyhow::Error) -> Self {
        tracing::error!(error = format!("{e:#}"), "request failed");
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("internal error: {e:#}"),
            kind: "server_error",
            param: None,
            code: None,
        }
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
type AppState = Arc<Coordinator>;

/// The router of the coordinator's HTTP API.
pub fn router(c: Arc<Coordinator>) -> Router {
    // Room for the multipart framing around the largest accepted file.
    let body_limit = c.settings.limits.max_bytes as usize + (1 << 20);
    let v1 = Router::new()
        .route("/v1/files", post(upload_file).get(list_files))
        .route("/v1/files/{id}", get(get_file).delete(delete_file))
        .route("/v1/files/{id}/content", get(file_content))
        .route("/v1/batches", post(create_batch).get(list_batches))
        .route("/v1/batches/{id}", get(get_batch))
        .route("/v1/batches/{id}/cancel", post(cancel_batch))
        .fallback(unknown_route)
        .layer(middleware::from_fn_with_state(c.clone(), require_key))
        .layer(DefaultBodyLimit::max(body_limit));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .merge(v1)
        .with_state(c)
}

async fn unknown_route(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(
        format!("Unknown request URL: {method} {}", uri.path()),
        None,
    )
}

/// Equal-length byte strings compared without an early exit.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_key(State(c): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &c.settings.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.trim().as_bytes(), key.as_bytes()) {
            let message = if given.is_empty() {
                "You didn't provide an API key. Provide it in the Authorization header as `Bearer <key>`."
            } else {
                "Incorrect API key provided."
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
    next.run(req).await
}

async fn ready(State(c): State<AppState>) -> Response {
    if c.ready.load(Ordering::SeqCst) && c.connected() {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not connected to NATS").into_response()
    }
}

async fn metrics(State(c): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        c.metrics().await,
    )
        .into_response()
}

// -------------------------------------------------------------------- files

const PURPOSES: [&str; 4] = ["batch", "batch_output", "user_data", "evals"];

async fn upload_file(State(c): State<AppState>, mut form: Multipart) -> ApiResult<Json<Value>> {
    let max = c.settings.limits.max_bytes;
    let too_large = || ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!(
            "the file is larger than the limit of {max} bytes: split the batch into several files"
        ),
        kind: "invalid_request_error",
        param: Some("file"),
        code: Some("file_too_large"),
    };
    let mut purpose = None;
    let mut file = None;
    loop {
        let field = match form.next_field().await {
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
        match field.name() {
            Some("purpose") => {
                let text = field.text().await.map_err(|e| {
                    ApiError::invalid(format!("unreadable purpose: {e}"), Some("purpose"))
                })?;
                purpose = Some(text);
            }
            Some("file") => {
                let name = field.file_name().unwrap_or("upload.jsonl").to_string();
                let data = field.bytes().await.map_err(|e| {
                    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                        too_large()
                    } else {
                        ApiError::invalid(format!("unreadable file: {e}"), Some("file"))
                    }
                })?;
                file = Some((name, data));
            }
            _ => {}
        }
    }
    let purpose = purpose
        .ok_or_else(|| ApiError::invalid("missing required parameter: purpose", Some("purpose")))?;
    if !PURPOSES.contains(&purpose.as_str()) {
        return Err(ApiError::invalid(
            format!("purpose {purpose:?} is not supported; use one of {PURPOSES:?}"),
            Some("purpose"),
        ));
    }
    let (name, data) =
        file.ok_or_else(|| ApiError::invalid("missing required parameter: file", Some("file")))?;
    if data.len() as u64 > max {
        return Err(too_large());
    }
    let f = c.put_file(name, purpose, data).await?;
    Ok(Json(serde_json::to_value(f).map_err(anyhow::Error::from)?))
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
    State(c): State<AppState>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let limit = parse_limit(&q, 10_000, 10_000)?;
    let mut files = c.list_files().await?;
    if let Some(p) = &q.purpose {
        files.retain(|f| &f.purpose == p);
    }
    if q.order.as_deref() == Some("asc") {
        files.reverse();
    }
    let items = files
        .into_iter()
        .map(|f| Ok((f.id.clone(), serde_json::to_value(f)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Json(page(items, q.after.as_deref(), limit)?))
}

fn no_file(id: &str) -> ApiError {
    ApiError::not_found(format!("No such File object: {id}"), Some("id"))
}

async fn get_file(State(c): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let f = c.file(&id).await?.ok_or_else(|| no_file(&id))?;
    Ok(Json(serde_json::to_value(f).map_err(anyhow::Error::from)?))
}

async fn delete_file(State(c): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    if !c.delete_file(&id).await? {
        return Err(no_file(&id));
    }
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})))
}

async fn file_content(State(c): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    c.file(&id).await?.ok_or_else(|| no_file(&id))?;
    let data = c.file_content(&id).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response())
}

// -------------------------------------------------------------------- batches

async fn create_batch(State(c): State<AppState>, body: Bytes) -> ApiResult<Json<Value>> {
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
    let file = c.file(&input_file_id).await?.ok_or_else(|| {
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
    let rec = BatchRecord::new(
        format!("batch_{}", nuid::next()),
        endpoint,
        input_file_id,
        window_text,
        window,
        metadata,
        now_s(),
    );
    let rec = c.create_batch(rec).await?;
    Ok(Json(rec.to_openai()))
}

fn no_batch(id: &str) -> ApiError {
    ApiError::not_found(format!("No such Batch object: {id}"), Some("id"))
}

async fn get_batch(State(c): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let rec = c.batch(&id).ok_or_else(|| no_batch(&id))?;
    Ok(Json(rec.to_openai()))
}

async fn list_batches(
    State(c): State<AppState>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let limit = parse_limit(&q, 20, 100)?;
    let items = c
        .list_batches()
        .into_iter()
        .map(|b| (b.id.clone(), b.to_openai()))
        .collect();
    Ok(Json(page(items, q.after.as_deref(), limit)?))
}

async fn cancel_batch(State(c): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let rec = c.batch(&id).ok_or_else(|| no_batch(&id))?;
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
    let rec = c.cancel(&id).await?.ok_or_else(|| no_batch(&id))?;
    Ok(Json(rec.to_openai()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_comparison_is_exact() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

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
