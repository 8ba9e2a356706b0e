//! The health probe and the stop signals.

use super::*;

/// The health endpoint for the kubelet's probes (axum): any path gets 200 while the worker is
/// connected to NATS and not stopping, 503 otherwise.
pub(super) async fn health(
    listener: tokio::net::TcpListener,
    client: async_nats::Client,
    stopping: Arc<std::sync::atomic::AtomicBool>,
) {
    use axum::http::StatusCode;
    let probe = move || {
        let ok = client.connection_state() == async_nats::connection::State::Connected
            && !stopping.load(Ordering::SeqCst);
        async move {
            if ok {
                (StatusCode::OK, "ok")
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not connected to NATS, or stopping",
                )
            }
        }
    };
    let app = axum::Router::new().fallback(probe);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the health endpoint stopped");
    }
}

pub(super) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
