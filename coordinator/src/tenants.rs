//! API keys and the tenants they belong to.
//!
//! Invariants of [`ApiKeys`]:
//! - a key is known only by its SHA-256 digest; the file may hold the key itself or
//!   `sha256:<hex>` of it, so operators need not keep plain keys on disk;
//! - looking a key up takes the same time whichever key matches, or none, and whatever the
//!   given key's length: the given key is hashed, then compared with every entry without an
//!   early exit;
//! - each key maps to one tenant; a tenant may have several keys (rotation);
//! - a key marked `read-only` reads its tenant's files and batches (and the dashboard) but
//!   cannot create, cancel or delete anything: only `GET` requests pass with it.
//!
//! Everything a tenant creates (files, batches, and the output and error files of its
//! batches) carries its name; another tenant gets 404 for it, as OpenAI answers for objects of
//! another organisation. Records without an owner (made before tenants existed, or with no key
//! at all) belong to [`DEFAULT_TENANT`].

use std::path::Path;

/// The tenant of the single `--api-key`, of an open coordinator, and of records without owner.
pub const DEFAULT_TENANT: &str = "default";

type Digest = [u8; 32];

fn sha256(data: &[u8]) -> Digest {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, data).as_ref());
    out
}

/// The keys a coordinator accepts.
#[derive(Clone)]
pub struct ApiKeys {
    /// (digest of the key, tenant, read-only).
    entries: Vec<(Digest, String, bool)>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut tenants: Vec<&str> = self.entries.iter().map(|(_, t, _)| t.as_str()).collect();
        tenants.dedup();
        f.debug_struct("ApiKeys")
            .field("keys", &self.entries.len())
            .field("tenants", &tenants)
            .finish()
    }
}

/// A problem in a keys file, with its line.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read the API keys file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("API keys file, line {line}: {problem}")]
    Line { line: usize, problem: String },
    #[error("the API keys file has no keys")]
    Empty,
}

fn valid_tenant(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 64
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl ApiKeys {
    /// One key, of the default tenant (`--api-key`).
    pub fn single(key: &str) -> Self {
        Self {
            entries: vec![(sha256(key.as_bytes()), DEFAULT_TENANT.to_string(), false)],
        }
    }

    /// Parses a keys file: one `TENANT KEY` or `TENANT KEY read-only` per line, `KEY` either
    /// the key or `sha256:` and its 64 hex digits; blank lines and lines starting with `#` are
    /// skipped.
    pub fn parse(text: &str) -> Result<Self, KeysError> {
        let mut entries: Vec<(Digest, String, bool)> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let bad = |problem: String| KeysError::Line { line, problem };
            let mut parts = l.split_whitespace();
            let (Some(tenant), Some(key), mode, None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(bad(
                    "expected `TENANT KEY` or `TENANT KEY read-only` (two or three fields)".into(),
                ));
            };
            let read_only = match mode {
                None => false,
                Some("read-only") => true,
                Some(other) => {
                    return Err(bad(format!(
                        "the third field may only be `read-only`, got {other:?}"
                    )))
                }
            };
            if !valid_tenant(tenant) {
                return Err(bad(format!(
                    "tenant {tenant:?} must be 1 to 64 letters, digits, '-', '_' or '.'"
                )));
            }
            let digest = match key.strip_prefix("sha256:") {
                Some(hex) => parse_hex(hex).ok_or_else(|| {
                    bad("a hashed key is `sha256:` and 64 hexadecimal digits".into())
                })?,
                None if key.len() < 16 => {
                    return Err(bad(
                        "the key is shorter than 16 characters; use a long random key".into(),
                    ))
                }
                None => sha256(key.as_bytes()),
            };
            if let Some((_, other, _)) = entries.iter().find(|(d, _, _)| *d == digest) {
                return Err(bad(format!("this key is already tenant {other:?}'s")));
            }
            entries.push((digest, tenant.to_string(), read_only));
        }
        if entries.is_empty() {
            return Err(KeysError::Empty);
        }
        Ok(Self { entries })
    }

    /// Reads and parses a keys file.
    pub fn load(path: &Path) -> Result<Self, KeysError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// The tenant a presented key belongs to (constant time, see the module's invariants).
    pub fn tenant(&self, presented: &[u8]) -> Option<&str> {
        self.access(presented).map(|(t, _)| t)
    }

    /// The tenant a presented key belongs to and whether the key is read-only (constant time).
    pub fn access(&self, presented: &[u8]) -> Option<(&str, bool)> {
        use subtle::{ConditionallySelectable, ConstantTimeEq};
        let d = sha256(presented);
        // Every entry is compared, and the match (if any) selected, without a branch on secrets.
        let mut found = u64::MAX;
        for (i, (digest, _, _)) in self.entries.iter().enumerate() {
            found.conditional_assign(&(i as u64), digest.ct_eq(&d));
        }
        usize::try_from(found)
            .ok()
            .and_then(|i| self.entries.get(i))
            .map(|(_, t, read_only)| (t.as_str(), *read_only))
    }
}

fn parse_hex(hex: &str) -> Option<Digest> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Whether a record owned by `owner` (none: made before tenants) belongs to `tenant`.
pub fn owns(owner: Option<&str>, tenant: &str) -> bool {
    owner.unwrap_or(DEFAULT_TENANT) == tenant
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_tenants_plain_or_hashed() {
        let bob_hash = gristmill_protocol::cluster::hex(&sha256(b"bob-key-0123456789"));
        let keys = ApiKeys::parse(&format!(
            "# tenants\n\nalice alice-key-0123456789\nbob sha256:{bob_hash}\nalice alice-rotated-key-99\n"
        ))
        .expect("valid");
        assert_eq!(keys.tenant(b"alice-key-0123456789"), Some("alice"));
        assert_eq!(keys.tenant(b"alice-rotated-key-99"), Some("alice"));
        assert_eq!(keys.tenant(b"bob-key-0123456789"), Some("bob"));
        assert_eq!(
            keys.tenant(b"bob-key-012345678"),
            None,
            "a prefix is not the key"
        );
        assert_eq!(keys.tenant(b""), None);
        assert_eq!(
            keys.tenant(bob_hash.as_bytes()),
            None,
            "the hash is not the key"
        );
        assert!(!format!("{keys:?}").contains("key-0123"));
        let single = ApiKeys::single("k");
        assert_eq!(single.tenant(b"k"), Some(DEFAULT_TENANT));
        assert_eq!(single.access(b"k"), Some((DEFAULT_TENANT, false)));
        let keys =
            ApiKeys::parse("ops ops-key-0123456789abc\nops ops-viewer-0123456789 read-only\n")
                .expect("valid");
        assert_eq!(keys.access(b"ops-key-0123456789abc"), Some(("ops", false)));
        assert_eq!(keys.access(b"ops-viewer-0123456789"), Some(("ops", true)));
        assert_eq!(single.tenant(b"k "), None);
    }

    #[test]
    fn a_bad_keys_file_names_its_line() {
        for (text, needle) in [
            ("alice", "line 1: expected `TENANT KEY`"),
            (
                "alice k1234567890123456 extra",
                "line 1: the third field may only be `read-only`",
            ),
            ("alice k1234567890123456 read-only x", "line 1: expected"),
            (
                "\nal ice k1234567890123456",
                "line 2: the third field may only be `read-only`",
            ),
            ("a/b k1234567890123456", "line 1: tenant \"a/b\""),
            ("alice short", "line 1: the key is shorter than 16"),
            ("alice sha256:abc", "line 1: a hashed key"),
            (
                "alice k1234567890123456\nbob k1234567890123456",
                "line 2: this key is already tenant \"alice\"'s",
            ),
            ("# nothing\n", "no keys"),
        ] {
            let e = ApiKeys::parse(text).expect_err(text).to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn records_without_an_owner_are_the_default_tenants() {
        assert!(owns(None, DEFAULT_TENANT));
        assert!(!owns(None, "alice"));
        assert!(owns(Some("alice"), "alice"));
        assert!(!owns(Some("alice"), "bob"));
    }
}
