//! The operator's dashboard: a static page at `/` (its HTML, script and styles compiled into
//! the binary, no build step) and its data under `/v1/dashboard`, behind the same API key as
//! the rest of `/v1` (a standby forwards it to the leader like any `/v1` request).
//!
//! The page asks for the key once and keeps it in the tab's session storage; it polls every
//! 2 s. A `read-only` key (see [`crate::tenants`]) sees everything its tenant owns but gets no
//! cancel buttons, and the API refuses its cancel anyway.

use super::*;

const INDEX_HTML: &str = include_str!("../../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../../assets/dashboard/app.js");
const STYLE_CSS: &str = include_str!("../../assets/dashboard/style.css");

/// Everything the page loads comes from this origin; nothing runs inline.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // A new binary's page replaces the old one at once.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

pub(super) async fn page() -> Response {
    asset(INDEX_HTML, "text/html; charset=utf-8")
}

pub(super) async fn script() -> Response {
    asset(APP_JS, "text/javascript; charset=utf-8")
}

pub(super) async fn styles() -> Response {
    asset(STYLE_CSS, "text/css; charset=utf-8")
}

/// `GET /v1/dashboard?limit=N`: the tenant's newest batches (default 100, at most 1000) with
/// rates and time left, the workers, the autoscaler's last decision, cluster-wide rates.
pub(super) async fn overview(
    Leader(c): Leader,
    Tenant(t): Tenant,
    ReadOnly(read_only): ReadOnly,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    // The lists' query: only `limit` means something here.
    let Query(q) = q.map_err(|r| ApiError::rejected(r.body_text(), None))?;
    let limit = parse_limit(&q, 100, 1000)?;
    let mut v = c.dashboard(&t, limit);
    v["read_only"] = json!(read_only);
    v["tenant"] = json!(t);
    Ok(Json(v))
}

/// `GET /v1/dashboard/batches/{id}`: one batch's counts over time, shards and errors by code.
pub(super) async fn batch_page(
    Leader(c): Leader,
    Tenant(t): Tenant,
    Id(id): Id,
) -> ApiResult<Json<Value>> {
    c.dashboard_batch(&id, &t)
        .map(Json)
        .ok_or_else(|| no_batch(&id))
}

impl FromRequestParts<AppState> for ReadOnly {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, ApiError> {
        // Set by `require_key` for keyed requests; a coordinator without keys has none.
        Ok(parts
            .extensions
            .get::<ReadOnly>()
            .copied()
            .unwrap_or(ReadOnly(false)))
    }
}
