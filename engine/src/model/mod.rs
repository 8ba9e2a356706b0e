//! Model architectures.

pub mod llama;
