//! The Gristmill worker: the NATS node around the engine. It pulls shards from the work queue,
//! feeds their lines to one [`gristmill_engine::Engine`] running on its own thread, publishes
//! each line's result as soon as it finishes, reports progress, and acks the shard (see
//! [`node`]). The engine itself knows nothing of NATS or async runtimes.

pub mod node;
