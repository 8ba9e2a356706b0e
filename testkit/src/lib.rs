//! What the tests of several crates share (a dev-dependency only): where the default model and
//! the reference fixtures are.

use std::path::{Path, PathBuf};

/// The default model (or `$GRISTMILL_MODEL`); a test that needs it fails with how to get it.
pub fn default_model() -> PathBuf {
    let p = gristmill_protocol::model_path_from_env();
    assert!(
        p.exists(),
        "the default model is missing at {}: run `make model` (scripts/fetch-model.sh) first",
        p.display()
    );
    p
}

/// `tests/fixtures/` of the repository: tiny models and the reference outputs of HF
/// transformers (made by `scripts/make_fixtures.py`, committed).
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// One file or folder of [`fixtures`].
pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}
