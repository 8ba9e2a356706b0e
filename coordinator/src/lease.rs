//! Leader election among coordinators: a lease held in a NATS KV bucket.
//!
//! Several coordinators may run against one NATS (a Deployment with two replicas, or a rolling
//! update); exactly one of them — the leader — acts: it dispatches, collects, finalizes,
//! autoscales and answers the API. The others stand by: they forward API requests to the leader
//! (its URL is in the lease) and try to take the lease every `ttl / 4`.
//!
//! The lease is the key [`LEASE_KEY`] of the bucket [`LEADER_BUCKET`], whose `max_age` is the
//! lease's time to live: a value (a [`Holder`], JSON) not rewritten within `ttl` expires on the
//! server. The leader
//! rewrites it every `ttl / 3` with compare-and-set on its revision, so it can never overwrite a
//! lease another coordinator took after an expiry. A standby takes the lease with `create`, which
//! succeeds only once the key is gone (expired, or deleted by a leader shutting down cleanly).
//!
//! Fencing: the leader counts its lease as valid until `sent + 0.9 · ttl`, where `sent` is the
//! monotonic time at which it sent its last successful renewal. The server stores that renewal
//! after `sent`, so it expires no earlier than `sent + ttl`: by the time a standby can take the
//! lease, the old leader's own clock already says it lost it. The old leader checks
//! [`Lease::fence`] before each durable write and does not write when the lease ran out (a
//! process paused for longer than the lease, a network partition), and [`Lease::keep`] returns
//! when a renewal fails past the deadline or finds the lease taken. The binary then exits;
//! Kubernetes restarts it as a standby. The library never ends the process itself.
//!
//! A coordinator restarted under the same identity (the pod name, unchanged across container
//! restarts) takes its own unexpired lease over at once instead of waiting for it to expire.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use async_nats::jetstream::{self, kv, stream};
use futures_util::StreamExt;
use gristmill_protocol::cluster::{LEADER_BUCKET, LEASE_KEY};
use serde::{Deserialize, Serialize};

/// The value of the lease: who leads, and where its API answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub identity: String,
    /// Base URL of the leader's HTTP API, e.g. `http://10.0.3.7:8000`.
    pub url: String,
}

impl Holder {
    fn parse(value: &[u8]) -> Self {
        serde_json::from_slice(value).unwrap_or_else(|_| Holder {
            identity: String::from_utf8_lossy(value).into_owned(),
            url: String::new(),
        })
    }
}

/// Until when a lease renewed by a write sent at `sent` may be acted on: `sent + 0.9 · ttl`. The
/// server stores the write after `sent`, so its copy expires no earlier than `sent + ttl`; the
/// tenth in between covers clock-rate differences and the time between a check and a write.
fn valid_until(sent: Instant, ttl: Duration) -> Instant {
    sent + ttl.mul_f64(0.9)
}

/// How long a standby waits before its next try to take the lease: until a little after the
/// holder's lease expires on the server (`expires_ns`, wall clock, from the entry's timestamp
/// plus the TTL; 100 ms for the server's expiry timer), but never longer than `ttl / 4`, the
/// polling interval, and not at all when it has already expired.
fn wait_for_expiry(expires_ns: i128, now_ns: i128, ttl: Duration) -> Duration {
    let left = Duration::from_nanos((expires_ns - now_ns).clamp(0, i64::MAX as i128) as u64);
    (left + Duration::from_millis(100)).min(ttl / 4)
}

/// This coordinator's lease ran out: it must not write, another coordinator may lead by now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the leader lease of coordinator {identity} ran out; only the new leader may write")]
pub struct LeaseLost {
    pub identity: String,
}

/// A coordinator's view of the leader lease.
#[derive(Debug)]
pub struct Lease {
    kv: kv::Store,
    me: Holder,
    /// `me` as stored in the lease key.
    value: bytes::Bytes,
    ttl: Duration,
    /// Reference point of the monotonic deadlines below.
    epoch: Instant,
    /// Nanoseconds after `epoch` until which this process may act as leader (0: it may not).
    valid_until: AtomicU64,
    /// Revision of our last write of the lease key.
    revision: AtomicU64,
    /// Who held the lease when we last looked, if another coordinator did.
    holder: Mutex<Option<Holder>>,
    /// When the holder's last renewal expires on the server (its wall-clock timestamp plus the
    /// TTL): when to try next. Only a hint; taking the lease stays a compare-and-set.
    expires_at_ns: Mutex<Option<i128>>,
}

impl Lease {
    /// Opens (or creates) the lease bucket for a coordinator named `identity` whose API answers
    /// at `url`. Every coordinator of a cluster must use the same `ttl`: it is the bucket's
    /// `max_age`.
    pub async fn open(
        client: &async_nats::Client,
        identity: String,
        url: String,
        ttl: Duration,
        replicas: usize,
    ) -> Result<Self> {
        anyhow::ensure!(
            ttl >= Duration::from_secs(1),
            "the lease TTL must be at least 1 s, got {ttl:?}"
        );
        anyhow::ensure!(!identity.is_empty(), "the coordinator identity is empty");
        let kv = jetstream::new(client.clone())
            .create_or_update_key_value(kv::Config {
                bucket: LEADER_BUCKET.into(),
                description: "Leader lease of the Gristmill coordinators".into(),
                history: 1,
                max_age: ttl,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .context("creating the leader lease bucket")?;
        let me = Holder { identity, url };
        Ok(Self {
            kv,
            value: serde_json::to_vec(&me)?.into(),
            me,
            ttl,
            epoch: Instant::now(),
            valid_until: AtomicU64::new(0),
            revision: AtomicU64::new(0),
            holder: Mutex::new(None),
            expires_at_ns: Mutex::new(None),
        })
    }

    pub fn identity(&self) -> &str {
        &self.me.identity
    }

    /// Who held the lease when this coordinator last looked, if another one did.
    pub fn holder(&self) -> Option<Holder> {
        self.holder
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_holder(&self, h: Option<Holder>) {
        *self.holder.lock().unwrap_or_else(|p| p.into_inner()) = h;
    }

    fn holder_name(&self) -> String {
        self.holder().map_or_else(|| "?".into(), |h| h.identity)
    }

    fn nanos(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    fn grant(&self, revision: u64, sent: Instant) {
        self.revision.store(revision, Ordering::SeqCst);
        let until = valid_until(sent, self.ttl);
        self.valid_until.store(self.nanos(until), Ordering::SeqCst);
        self.set_holder(None);
    }

    fn revoke(&self) {
        self.valid_until.store(0, Ordering::SeqCst);
    }

    /// Whether this process holds the lease now.
    pub fn is_valid(&self) -> bool {
        self.nanos(Instant::now()) < self.valid_until.load(Ordering::SeqCst)
    }

    /// Refuses a durable write when this coordinator's lease ran out, so that a coordinator
    /// that lost the lease (paused, partitioned) never writes beside the new leader. Called
    /// before durable writes; the write's task fails with [`LeaseLost`], and [`Lease::keep`]
    /// (whose next renewal cannot succeed) returns, which ends the process in the binary.
    pub fn fence(&self) -> Result<(), LeaseLost> {
        if self.is_valid() {
            return Ok(());
        }
        tracing::error!(
            identity = %self.me.identity,
            "the leader lease ran out before this write; not writing: only the new leader acts"
        );
        Err(LeaseLost {
            identity: self.me.identity.clone(),
        })
    }

    /// Waits until this coordinator holds the lease: tries every `ttl / 4`, and at once when the
    /// lease key changes (a leader that shuts down deletes it).
    pub async fn acquire(&self) {
        let mut announced = false;
        let mut watch = self.kv.watch(LEASE_KEY).await.ok();
        loop {
            match self.try_acquire().await {
                Ok(true) => return,
                Ok(false) => {
                    if !announced {
                        tracing::info!(
                            identity = %self.me.identity,
                            leader = %self.holder_name(),
                            "standing by: another coordinator holds the leader lease"
                        );
                        announced = true;
                    }
                }
                Err(e) => {
                    // Nobody to forward to until the lease can be read again.
                    self.set_holder(None);
                    tracing::warn!(error = format!("{e:#}"), "cannot read the leader lease");
                }
            }
            let pause = tokio::time::sleep(self.next_try());
            match watch.as_mut() {
                Some(w) => {
                    tokio::select! {
                        _ = pause => {}
                        change = w.next() => {
                            if !matches!(change, Some(Ok(_))) {
                                // The watch ended (NATS reconnecting): poll until it is back.
                                watch = None;
                            }
                        }
                    }
                }
                None => {
                    pause.await;
                    watch = self.kv.watch(LEASE_KEY).await.ok();
                }
            }
        }
    }

    /// How long to wait before the next attempt: `ttl / 4`, or less when the holder's lease
    /// expires sooner (a dead leader is replaced right after its lease runs out).
    fn next_try(&self) -> Duration {
        let poll = self.ttl / 4;
        let Some(expires) = *self.expires_at_ns.lock().unwrap_or_else(|p| p.into_inner()) else {
            return poll;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        wait_for_expiry(expires, now, self.ttl)
    }

    /// One attempt to take the lease.
    async fn try_acquire(&self) -> Result<bool> {
        let sent = Instant::now();
        match self.kv.create(LEASE_KEY, self.value.clone()).await {
            Ok(rev) => {
                self.grant(rev, sent);
                return Ok(true);
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(anyhow!(e).context("creating the lease key")),
        }
        let Some(entry) = self.kv.entry(LEASE_KEY).await? else {
            self.set_holder(None);
            return Ok(false);
        };
        if entry.operation != kv::Operation::Put {
            self.set_holder(None);
            return Ok(false);
        }
        let holder = Holder::parse(&entry.value);
        if holder.identity != self.me.identity {
            *self.expires_at_ns.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(entry.created.unix_timestamp_nanos() + self.ttl.as_nanos() as i128);
            self.set_holder(Some(holder));
            return Ok(false);
        }
        // Our own lease from before a restart: take it over.
        let sent = Instant::now();
        match self
            .kv
            .update(LEASE_KEY, self.value.clone(), entry.revision)
            .await
        {
            Ok(rev) => {
                self.grant(rev, sent);
                Ok(true)
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(e) => Err(anyhow!(e).context("renewing the lease key")),
        }
    }

    /// One renewal. `Ok(false)`: another coordinator holds the lease now.
    async fn renew(&self) -> Result<bool> {
        let sent = Instant::now();
        let rev = self.revision.load(Ordering::SeqCst);
        match self.kv.update(LEASE_KEY, self.value.clone(), rev).await {
            Ok(new) => {
                tracing::debug!(revision = new, "renewed the leader lease");
                self.grant(new, sent);
                Ok(true)
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                // Either another coordinator took it, or our previous renewal was stored but
                // its answer lost: the key's value says which.
                match self.kv.entry(LEASE_KEY).await? {
                    Some(entry)
                        if entry.operation == kv::Operation::Put && entry.value == self.value =>
                    {
                        let sent = Instant::now();
                        let new = self
                            .kv
                            .update(LEASE_KEY, self.value.clone(), entry.revision)
                            .await
                            .context("renewing the lease key")?;
                        self.grant(new, sent);
                        Ok(true)
                    }
                    Some(entry) if entry.operation == kv::Operation::Put => {
                        self.set_holder(Some(Holder::parse(&entry.value)));
                        Ok(false)
                    }
                    _ => Ok(false),
                }
            }
            Err(e) => Err(anyhow!(e).context("renewing the lease key")),
        }
    }

    /// Renews the lease every `ttl / 3` while this coordinator leads; returns why it stopped
    /// leading (another coordinator took the lease, or no renewal got through in time).
    pub async fn keep(&self) -> anyhow::Error {
        loop {
            tokio::time::sleep(self.ttl / 3).await;
            let last_error = match tokio::time::timeout(self.ttl / 3, self.renew()).await {
                Ok(Ok(true)) => continue,
                Ok(Ok(false)) => {
                    self.revoke();
                    return anyhow!("coordinator {} took the leader lease", self.holder_name());
                }
                Ok(Err(e)) => format!("{e:#}"),
                Err(_) => format!("no answer within {:?}", self.ttl / 3),
            };
            tracing::warn!(error = %last_error, "cannot renew the leader lease");
            if !self.is_valid() {
                self.revoke();
                return anyhow!(
                    "the leader lease ran out: no renewal got through within {:?} ({last_error})",
                    self.ttl.mul_f64(0.9)
                );
            }
        }
    }

    /// Gives the lease up (clean shutdown), so that a standby takes over without waiting for
    /// it to expire.
    pub async fn release(&self) {
        if !self.is_valid() {
            return;
        }
        self.revoke();
        let rev = self.revision.load(Ordering::SeqCst);
        match self.kv.delete_expect_revision(LEASE_KEY, Some(rev)).await {
            Ok(()) => tracing::info!(identity = %self.me.identity, "released the leader lease"),
            Err(e) => tracing::warn!(error = %e, "could not release the leader lease; it expires"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_acted_on_for_nine_tenths_of_its_ttl_from_when_its_write_was_sent() {
        let sent = Instant::now();
        for ttl_s in [1.0, 15.0, 60.0] {
            let ttl = Duration::from_secs_f64(ttl_s);
            let until = valid_until(sent, ttl);
            assert_eq!(until - sent, ttl.mul_f64(0.9));
            // The server's copy (stored after `sent`) outlives the leader's own view.
            assert!(until < sent + ttl);
        }
    }

    #[test]
    fn a_standby_tries_again_just_after_the_holders_lease_expires_never_later_than_a_poll() {
        let ttl = Duration::from_secs(15);
        let s = 1_000_000_000i128;
        let table = [
            // (expires in, wait) in seconds
            (2 * s, Duration::from_millis(2_100)),
            (0, Duration::from_millis(100)),
            (-5 * s, Duration::from_millis(100)),
            (30 * s, ttl / 4),
            (i128::MAX / 2, ttl / 4),
        ];
        let now = 1_700_000_000 * s;
        for (expires_in, want) in table {
            assert_eq!(
                wait_for_expiry(now + expires_in, now, ttl),
                want,
                "expires in {expires_in} ns"
            );
        }
    }
}
