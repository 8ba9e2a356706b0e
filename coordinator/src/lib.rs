//! The coordinator: batch intake and validation (also used by `gristmill run`), the batch
//! lifecycle, the shard planner, and the cluster service around them — the OpenAI Files and
//! Batches HTTP API ([`api`]) over JetStream ([`server`]).

pub mod api;
pub mod autoscale;
pub mod batch;
pub mod http;
pub mod intake;
pub mod kube_scale;
pub mod lease;
pub mod ledger;
pub mod progress;
pub mod server;
pub mod shard;
pub mod tasks;
pub mod tenants;
pub mod validate;

pub use validate::{InvalidLine, LineValidator};
