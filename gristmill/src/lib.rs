//! The `gristmill` command's cluster processes as a library: the coordinator's and the
//! worker's flags and start-up, so that tests start coordinators in-process exactly as the
//! binary does.

pub mod cluster;
pub mod engine_args;
pub mod hub;
pub mod nats;
pub mod telemetry;
