//! Gristmill's batch core: everything about a batch that needs neither an async runtime nor
//! NATS, so that `gristmill run` and the coordinator share it and it is tested in
//! milliseconds.
//!
//! - [`validate`]: one OpenAI batch line → a [`gristmill_protocol::Request`] or an error line;
//! - [`intake`]: a whole file, streamed: file-level checks, then windows of lines planned into
//!   shards ([`shard`]);
//! - [`batch`]: a batch's record and lifecycle (OpenAI's statuses and their transitions), with
//!   its [`ledger`] of lines and results, and [`finalize`]: results → output and error lines;
//! - [`autoscale`]: the worker-count policy (pending tokens, deadlines, measured speed);
//! - [`dashboard`]: what the operator's dashboard shows (progress over time, rates, time left,
//!   workers, shards, errors by code), computed from what the coordinator counts.

pub mod autoscale;
pub mod batch;
pub mod dashboard;
pub mod finalize;
pub mod intake;
pub mod ledger;
pub mod shard;
pub mod validate;

pub use validate::{InvalidLine, LineValidator};
