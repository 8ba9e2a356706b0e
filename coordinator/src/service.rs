//! One coordinator process as a function: [`run`] serves the API on a bound listener, waits for
//! the leader lease, acts while it holds it, and returns when told to stop or when it stops
//! leading. The binary and the in-process cluster tests call it alike.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::api::{self, Gate};
use crate::lease::Lease;
use crate::server::{Coordinator, Settings};

/// Who this coordinator is among its peers.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Its name in the leader lease: differs between coordinators, stays across restarts.
    pub identity: String,
    /// The base URL at which other coordinators reach its API (to forward to it while it leads).
    pub advertise_url: String,
    /// How long the lease lives without renewal; the same on every coordinator of a cluster.
    pub lease_ttl: Duration,
}

/// Why a coordinator stopped other than by being told to.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The leader lease bucket could not be opened (NATS unreachable, no permission, bad TTL).
    #[error("cannot open the leader lease: {0:#}")]
    Lease(#[source] anyhow::Error),
    /// Holding the lease, the coordinator could not set up its streams and buckets.
    #[error("cannot start leading: {0:#}")]
    Start(#[source] anyhow::Error),
    /// Another coordinator took the lease, or it ran out: this one must stop acting.
    #[error("stopped leading; exiting so that only one coordinator acts: {0:#}")]
    LostLead(#[source] anyhow::Error),
    /// The HTTP server's task ended abnormally (it panicked).
    #[error("the HTTP server stopped: {0}")]
    Http(#[from] tokio::task::JoinError),
}

impl RunError {
    /// A short stable name, for metrics and exit reports.
    pub fn label(&self) -> &'static str {
        match self {
            RunError::Lease(_) => "lease_open",
            RunError::Start(_) => "start",
            RunError::LostLead(_) => "lost_lead",
            RunError::Http(_) => "http",
        }
    }
}

/// Serves the API on `listener` at once (a standby forwards to the leader), takes the leader
/// lease when it can and acts under it. Returns `Ok` once `shutdown` resolves (after handing the
/// lease over), or the reason it stopped leading.
pub async fn run(
    listener: TcpListener,
    client: async_nats::Client,
    settings: Settings,
    peer: Peer,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let lease = Arc::new(
        Lease::open(
            &client,
            peer.identity.clone(),
            peer.advertise_url,
            peer.lease_ttl,
            settings.replicas,
        )
        .await
        .map_err(RunError::Lease)?,
    );
    let gate = Gate::new(&settings, lease.clone());
    let server = tokio::spawn(crate::http::serve(
        listener,
        api::router(gate.clone()),
        settings.http,
        shutdown,
    ));
    let lead = async {
        lease.acquire().await;
        tracing::info!(identity = %peer.identity, "holding the leader lease: this coordinator acts");
        let c = Coordinator::start(client, settings, lease.clone())
            .await
            .map_err(RunError::Start)?;
        gate.open(c);
        Err(RunError::LostLead(lease.keep().await))
    };
    tokio::select! {
        r = server => {
            // Told to stop: hand the lease over at once.
            lease.release().await;
            r.map_err(RunError::from)
        }
        r = lead => r,
    }
}
