//! The pure core of Gristmill's two workflows over the batch engine:
//!
//! - `gristmill migrate` rewrites the files of a git repository that match some globs, one
//!   request per file, verifies each answer with a command and retries the failures;
//! - `gristmill scaffold` renders a template once per spec row into one request whose answer is
//!   a file tree.
//!
//! What here is pure: matching paths against globs ([`glob`]), filling `{placeholder}` templates
//! ([`template`]), the answer formats and their parsers ([`answer`]), path confinement for
//! written trees ([`paths`]), the on-disk cache of answers keyed by everything that decides them
//! ([`cache`]), spec files ([`specs`]) and the JSON and HTML report ([`report`]). Running the
//! model, git and the verifier is the `gristmill` binary's business.

pub mod answer;
pub mod cache;
pub mod glob;
pub mod language;
pub mod paths;
pub mod report;
pub mod specs;
pub mod template;

/// The version of the prompts and answer formats. It is part of every cache key: changing how a
/// prompt is worded or an answer is read must bump it, so that old answers are not reused.
pub const PROMPT_FORMAT_VERSION: u32 = 1;
