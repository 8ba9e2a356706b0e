//! A standby coordinator forwards every `/v1` request to the leader named in the lease.

use super::*;

/// How long a standby waits for the leader's answer to start (a paused leader accepts
/// connections but never answers; the largest upload must fit).
pub(super) const FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Marks a request a standby forwarded (a standby never forwards one again).
pub(super) const FORWARDED_BY: &str = "gristmill-forwarded-by";

/// Headers of one connection, not of the request (RFC 9110 §7.6.1).
pub(super) const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The leader answers `/v1` itself; a standby forwards to the leader in the lease.
pub(super) async fn to_leader(State(g): State<AppState>, req: Request, next: Next) -> Response {
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
