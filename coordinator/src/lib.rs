//! The coordinator: the cluster service around the batch core ([`gristmill_batch`]) — the OpenAI
//! Files and Batches HTTP API ([`api`]) over JetStream ([`server`]), the leader lease, the
//! workers' progress reports, tenants and Kubernetes scaling.

pub mod api;
pub mod http;
pub mod kube_scale;
pub mod lease;
pub mod progress;
pub mod server;
mod service;
pub mod tasks;
pub mod telemetry;
pub mod tenants;

pub use service::{run, Peer, RunError};

// The batch core's modules, at the paths the coordinator has always used.
pub use gristmill_batch::{autoscale, batch, dashboard, finalize, intake, ledger, shard, validate};
pub use gristmill_batch::{InvalidLine, LineValidator};
