//! Answers on disk, keyed by everything that decides them, so that a re-run on unchanged input
//! sends no request: the key is a SHA-256 of the prompt format's version, the model's identity
//! (its name and a fingerprint of its weights, or what names a coordinator's model) and the
//! whole request body — the file's bytes, the instruction, the context files, the sampling
//! parameters, the seed, the constraint. Gristmill's outputs do not depend on what a request is
//! batched with, so a cached answer is the answer the request would get again.
//!
//! Layout: `DIR/ab/abcdef….json`, one small JSON file per answer, written to a temporary name
//! and renamed, so that concurrent runs and crashes leave whole entries or none.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One cached answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub text: String,
    pub finish_reason: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

/// The cache key of a request body sent to a model.
pub fn key(model_identity: &str, body: &Value) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(format!("gristmill-workflows/{}\0", crate::PROMPT_FORMAT_VERSION).as_bytes());
    ctx.update(model_identity.as_bytes());
    ctx.update(b"\0");
    ctx.update(body.to_string().as_bytes());
    hex(ctx.finish().as_ref())
}

pub use gristmill_protocol::cluster::hex;

impl Cache {
    pub fn new(dir: impl Into<PathBuf>) -> Cache {
        Cache { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &str) -> PathBuf {
        let shard = key.get(..2).unwrap_or("00");
        self.dir.join(shard).join(format!("{key}.json"))
    }

    /// The cached answer, if any (an unreadable or corrupt entry counts as none).
    pub fn get(&self, key: &str) -> Option<Entry> {
        let text = std::fs::read_to_string(self.path(key)).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub fn put(&self, key: &str, entry: &Entry) -> std::io::Result<()> {
        let path = self.path(key);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(
            &tmp,
            serde_json::to_vec(entry).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, &path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn entries_round_trip_and_keys_see_every_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::new(dir.path());
        let body = json!({"messages": [{"role": "user", "content": "x"}], "seed": 1});
        let k = key("model a", &body);
        assert_eq!(k.len(), 64);
        assert_ne!(k, key("model b", &body));
        assert_ne!(
            k,
            key(
                "model a",
                &json!({"messages": [{"role": "user", "content": "x"}], "seed": 2})
            )
        );
        assert!(cache.get(&k).is_none());
        let e = Entry {
            text: "```\nx\n```".into(),
            finish_reason: "stop".into(),
            prompt_tokens: 10,
            completion_tokens: 4,
        };
        cache.put(&k, &e).expect("put");
        assert_eq!(cache.get(&k), Some(e));
        std::fs::write(
            dir.path().join(&k[..2]).join(format!("{k}.json")),
            "{garbage",
        )
        .expect("w");
        assert!(cache.get(&k).is_none(), "a corrupt entry is a miss");
    }
}
