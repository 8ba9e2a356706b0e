//! How a worker's `serve` ends when it does not drain to the end.

/// Why a worker stopped other than by finishing its drain after a stop signal.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The coordinator created the shard stream but not the results stream.
    #[error("the results stream is missing: {0}")]
    NoResultsStream(#[source] async_nats::jetstream::context::GetStreamError),
    #[error("cannot start the engine thread: {0}")]
    EngineThread(#[source] std::io::Error),
    #[error("cannot listen for health probes on {addr}: {source}")]
    HealthListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The engine thread panicked: every shard of this worker would wait forever, so the
    /// process should end and be restarted.
    #[error("the engine thread panicked")]
    EnginePanicked,
    /// A second SIGTERM or SIGINT: stop at once, whatever is in flight (it is redelivered).
    #[error("second stop signal: stopped without draining")]
    Interrupted,
}

impl WorkerError {
    /// A short stable name, for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            WorkerError::NoResultsStream(_) => "no_results_stream",
            WorkerError::EngineThread(_) => "engine_thread",
            WorkerError::HealthListen { .. } => "health_listen",
            WorkerError::EnginePanicked => "engine_panicked",
            WorkerError::Interrupted => "interrupted",
        }
    }

    /// The process exit status that reports it: 70 (`EX_SOFTWARE`) for a panicked engine, 130
    /// (killed by SIGINT, by convention) for a second stop signal, 2 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            WorkerError::EnginePanicked => 70,
            WorkerError::Interrupted => 130,
            _ => 2,
        }
    }
}
