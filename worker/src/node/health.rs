//! The health probe and the stop signals.

use super::*;

/// A minimal HTTP health endpoint for the kubelet's probes: any request gets 200 while the
/// worker is connected to NATS and not stopping, 503 otherwise.
pub(super) async fn health(
    listener: tokio::net::TcpListener,
    client: async_nats::Client,
    stopping: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let ok = client.connection_state() == async_nats::connection::State::Connected
            && !stopping.load(Ordering::SeqCst);
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(2), sock.read(&mut buf)).await;
            let (status, body) = if ok {
                ("200 OK", "ok")
            } else {
                (
                    "503 Service Unavailable",
                    "not connected to NATS, or stopping",
                )
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(reply.as_bytes()).await;
        });
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
