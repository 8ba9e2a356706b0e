//! Errors of the engine crate. Variants carry fields, not pre-formatted strings; every message
//! names the file and, where there is one, the tensor.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path} is not a usable model file: {reason}")]
    Format { path: PathBuf, reason: String },

    #[error("{path}: tensor {tensor:?} has type {ty}, which Gristmill cannot read (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS)")]
    UnsupportedTensorType {
        path: PathBuf,
        tensor: String,
        ty: String,
    },

    #[error("{path}: tensor {tensor:?} needs bytes {start}..{end} but the file is only {file_len} bytes long (truncated download?)")]
    TruncatedTensor {
        path: PathBuf,
        tensor: String,
        start: u64,
        end: u64,
        file_len: u64,
    },

    #[error("{path}: tensor {tensor:?} is missing")]
    MissingTensor { path: PathBuf, tensor: String },

    #[error("{path}: tensor {tensor:?} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },

    #[error("tokenizer from {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },

    #[error("chat template: {0}")]
    Template(String),

    #[error("no model at {path}: {hint}")]
    ModelNotFound { path: PathBuf, hint: String },

    #[error("tensor parallelism: {0}")]
    TensorParallel(String),

    /// No usable compute device (driver, GPU, or library missing), or a device failed.
    #[error("device: {0}")]
    Device(String),

    #[error("{path}: the weights need {} MB of memory once loaded, but only {} MB is available; \
             use a smaller or more quantised model, or free memory", needed >> 20, available >> 20)]
    NotEnoughMemory {
        path: PathBuf,
        needed: u64,
        available: u64,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Config {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// A stable label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Io { .. } => "io",
            Self::Format { .. } => "format",
            Self::UnsupportedTensorType { .. } => "unsupported_tensor_type",
            Self::TruncatedTensor { .. } => "truncated_tensor",
            Self::MissingTensor { .. } => "missing_tensor",
            Self::ShapeMismatch { .. } => "shape_mismatch",
            Self::Config { .. } => "config",
            Self::Tokenizer { .. } => "tokenizer",
            Self::Template(_) => "template",
            Self::ModelNotFound { .. } => "model_not_found",
            Self::TensorParallel(_) => "tensor_parallel",
            Self::Device(_) => "device",
            Self::NotEnoughMemory { .. } => "not_enough_memory",
        }
    }
}
