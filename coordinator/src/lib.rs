//! The coordinator: batch intake and validation. Later it grows the OpenAI Files and Batches
//! API, sharding and JetStream publishing; today `gristmill run` uses its validation directly.

pub mod validate;

pub use validate::{InvalidLine, LineValidator};
