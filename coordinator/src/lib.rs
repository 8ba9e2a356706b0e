//! The coordinator: batch intake and validation (used by `gristmill run` today), the batch
//! lifecycle and the shard planner — the pure cores of the cluster path. The OpenAI Files and
//! Batches HTTP API and the JetStream publishing around them are still to come (issue 4).

pub mod batch;
pub mod shard;
pub mod validate;

pub use validate::{InvalidLine, LineValidator};
