//! Compute primitives with one signature per op.
//!
//! [`cpu`] holds the reference implementations every other backend is tested against. Each
//! kernel computes an output element with a reduction order that depends only on the shapes of
//! the operands it reads for that element — never on how many rows are in the batch — so a
//! request's result does not depend on what it was batched with.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod quant;
pub mod shapes;

pub use quant::GgmlType;
