//! The autoscaling policy: how many workers the queue needs, as a pure function.
//!
//! Inputs are what the coordinator knows: the tokens still to process per batch (prompt plus
//! `max_tokens` of unfinished lines) with each batch's deadline (`expires_at`), the measured
//! tokens per second of one worker, how long a new worker takes to start, and the replicas now.
//! The answer is the largest of
//!
//! - the **deadline need**: batches taken earliest deadline first, the replicas that finish every
//!   prefix of them before its deadline, counting the start-up time of new workers;
//! - the **drain need**: the replicas that empty the whole queue within `target_drain_s`;
//! - one worker while anything is pending;
//!
//! clamped to `[min, max]`. Scaling up is immediate. Scaling down waits: the answer is the largest
//! recommendation of the last `scale_down_stabilization_s` (as Kubernetes' HPA does), and an idle
//! queue keeps its workers for `scale_to_zero_after_s` before going to `min` (which may be 0).
//!
//! Guarantees (property-tested below): never above `max`; never below the deadline need (or
//! `max` when that is lower); a steady queue gets a steady answer (no flapping).

use std::collections::VecDeque;

/// Limits and timings of the policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Empty the queue within this many seconds even without deadlines.
    pub target_drain_s: f64,
    /// Keep idle workers this long before scaling to `min_replicas`.
    pub scale_to_zero_after_s: f64,
    /// Scale down only to the largest recommendation of this window.
    pub scale_down_stabilization_s: f64,
    /// Seconds from a scale-up to a new worker taking work.
    pub startup_s: f64,
    /// Tokens per second of one worker before any has been measured.
    pub default_tokens_per_s: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            min_replicas: 0,
            max_replicas: 16,
            target_drain_s: 3600.0,
            scale_to_zero_after_s: 600.0,
            scale_down_stabilization_s: 300.0,
            startup_s: 180.0,
            default_tokens_per_s: 1000.0,
        }
    }
}

/// One unfinished batch: tokens left and its deadline (seconds, same clock as `now_s`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PendingBatch {
    pub tokens: f64,
    pub deadline_s: f64,
}

/// What the coordinator sees now.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub now_s: f64,
    pub batches: Vec<PendingBatch>,
    pub current_replicas: u32,
    /// Measured tokens per second of one worker, when known.
    pub tokens_per_s_per_worker: Option<f64>,
}

/// Why the policy answered what it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Deadlines,
    Drain,
    Pending,
    IdleHold,
    Idle,
    Stabilizing,
}

impl Reason {
    /// A short name (`deadlines`) and what it means, for people (the dashboard, logs).
    pub fn describe(self) -> (&'static str, &'static str) {
        match self {
            Reason::Deadlines => ("deadlines", "the workers needed to finish every batch before its completion window closes, earliest deadline first"),
            Reason::Drain => ("drain", "the workers needed to empty the queue within the target drain time"),
            Reason::Pending => ("pending", "one worker at least while anything is pending"),
            Reason::IdleHold => ("idle_hold", "the queue is empty; workers are kept until the idle time runs out"),
            Reason::Idle => ("idle", "the queue has been empty long enough: down to the minimum"),
            Reason::Stabilizing => ("stabilizing", "scaling down waits for the stabilization window (the largest recent recommendation)"),
        }
    }
}

/// The policy's answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub replicas: u32,
    pub reason: Reason,
    /// Replicas the deadlines alone need (capped at `max`).
    pub deadline_need: u32,
}

/// What the policy remembers between calls.
#[derive(Debug, Clone, Default)]
pub struct Memory {
    /// `(time, recommendation)` of the stabilization window.
    recent: VecDeque<(f64, u32)>,
    /// Last time anything was pending.
    last_busy_s: Option<f64>,
}

/// Replicas that finish every earliest-deadline-first prefix of `batches` in time.
pub fn deadline_need(
    p: &Policy,
    now_s: f64,
    rate: f64,
    current: u32,
    batches: &[PendingBatch],
) -> u32 {
    let mut sorted: Vec<PendingBatch> =
        batches.iter().copied().filter(|b| b.tokens > 0.0).collect();
    sorted.sort_by(|a, b| a.deadline_s.total_cmp(&b.deadline_s));
    let mut need = 0u32;
    let mut cumulative = 0.0;
    for b in sorted {
        cumulative += b.tokens;
        let left = b.deadline_s - now_s;
        // Workers running now work the whole time; new ones only after starting.
        let replicas = if left <= 0.0 {
            p.max_replicas
        } else if cumulative <= current as f64 * rate * left {
            // The current workers suffice: a smaller number may too.
            (cumulative / (rate * left)).ceil() as u32
        } else {
            let extra_time = (left - p.startup_s).max(0.0);
            if extra_time <= 0.0 {
                p.max_replicas
            } else {
                // current·rate·left + extra·rate·extra_time ≥ cumulative
                let missing = cumulative - current as f64 * rate * left;
                current + (missing / (rate * extra_time)).ceil() as u32
            }
        };
        need = need.max(replicas);
    }
    need.min(p.max_replicas)
}

/// The policy. `memory` carries the stabilization window and the idle clock between calls.
pub fn decide(p: &Policy, obs: &Observation, memory: &mut Memory) -> Decision {
    let rate = obs
        .tokens_per_s_per_worker
        .filter(|r| *r > 0.0)
        .unwrap_or(p.default_tokens_per_s)
        .max(1e-9);
    let pending: f64 = obs.batches.iter().map(|b| b.tokens.max(0.0)).sum();
    let deadlines = deadline_need(p, obs.now_s, rate, obs.current_replicas, &obs.batches);
    let (raw, reason) = if pending > 0.0 {
        memory.last_busy_s = Some(obs.now_s);
        let drain = (pending / (rate * p.target_drain_s.max(1.0))).ceil() as u32;
        let mut best = (1, Reason::Pending);
        if drain > best.0 {
            best = (drain, Reason::Drain);
        }
        if deadlines >= best.0 && deadlines > 1 {
            best = (deadlines, Reason::Deadlines);
        }
        best
    } else {
        let idle_for = memory.last_busy_s.map_or(f64::INFINITY, |t| obs.now_s - t);
        if idle_for >= p.scale_to_zero_after_s {
            (p.min_replicas, Reason::Idle)
        } else {
            (obs.current_replicas, Reason::IdleHold)
        }
    };
    let raw = raw.clamp(p.min_replicas, p.max_replicas.max(p.min_replicas));
    // Stabilization: remember recommendations; scale down only to the window's largest.
    memory.recent.push_back((obs.now_s, raw));
    while memory
        .recent
        .front()
        .is_some_and(|&(t, _)| obs.now_s - t > p.scale_down_stabilization_s)
    {
        memory.recent.pop_front();
    }
    let window_max = memory.recent.iter().map(|&(_, r)| r).max().unwrap_or(raw);
    // An idle queue's release has had its own wait (`scale_to_zero_after_s`).
    let (replicas, reason) =
        if raw < obs.current_replicas && reason != Reason::Idle && window_max > raw {
            (window_max.min(obs.current_replicas), Reason::Stabilizing)
        } else {
            (raw, reason)
        };
    Decision {
        replicas,
        reason,
        deadline_need: deadlines,
    }
}

/// Measures the tokens per second one worker retires, from results as they arrive.
///
/// The unit is the queue's: each finished line retires its share of its batch's weight (prompt
/// plus `max_tokens`), whatever it really generated, so that pending tokens divided by this rate
/// is a time. Only spans in which shards waited undelivered count (every worker was busy: an
/// idle worker says nothing about its speed). Over the last `window_s` of such a span, each
/// worker counts from the start of the span if it reported before it, else from its first
/// report (whose own weight, earned before, is left out); the estimate is the retired weight
/// over the summed worker time. The last estimate stays when the queue has no backlog.
#[derive(Debug, Clone)]
pub struct RateMeter {
    window_s: f64,
    min_span_s: f64,
    /// `(time, worker, weight)` of the results of the last two windows.
    events: VecDeque<(f64, u32, f64)>,
    names: Vec<String>,
    backlogged_since: Option<f64>,
    estimate: Option<f64>,
}

impl RateMeter {
    /// A meter over the last `window_s` seconds that needs `min_span_s` of backlog to measure.
    pub fn new(window_s: f64, min_span_s: f64) -> Self {
        Self {
            window_s,
            min_span_s,
            events: VecDeque::new(),
            names: Vec::new(),
            backlogged_since: None,
            estimate: None,
        }
    }

    /// Results of `weight` queue tokens reported by `worker` at `t` (their publish time).
    pub fn record(&mut self, t: f64, worker: &str, weight: f64, now: f64) {
        if t < now - 2.0 * self.window_s || weight <= 0.0 {
            // Replayed history: says nothing about today's speed.
            return;
        }
        let w = match self.names.iter().position(|n| n == worker) {
            Some(i) => i,
            None => {
                self.names.push(worker.to_string());
                self.names.len() - 1
            }
        } as u32;
        self.events.push_back((t, w, weight));
    }

    /// Workers that reported within the last window.
    pub fn active_workers(&self, now: f64) -> usize {
        let mut seen: Vec<u32> = self
            .events
            .iter()
            .filter(|e| e.0 >= now - self.window_s)
            .map(|e| e.1)
            .collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len()
    }

    /// The last estimate, without updating it.
    pub fn estimate(&self) -> Option<f64> {
        self.estimate
    }

    /// The current estimate, updated from the results so far when `backlogged` (shards wait
    /// undelivered now).
    pub fn sample(&mut self, now: f64, backlogged: bool) -> Option<f64> {
        while self
            .events
            .front()
            .is_some_and(|e| e.0 < now - 2.0 * self.window_s)
        {
            self.events.pop_front();
        }
        if !backlogged {
            self.backlogged_since = None;
            return self.estimate;
        }
        let since = *self.backlogged_since.get_or_insert(now);
        let start = since.max(now - self.window_s);
        if now - start < self.min_span_s {
            return self.estimate;
        }
        // Per worker: (reported before `start`, first report in the span, weight after it).
        let mut per: Vec<(bool, Option<f64>, f64)> = vec![(false, None, 0.0); self.names.len()];
        for &(t, w, weight) in &self.events {
            let p = &mut per[w as usize];
            if t < start {
                p.0 = true;
            } else if t <= now {
                if p.0 || p.1.is_some() {
                    p.2 += weight;
                }
                p.1.get_or_insert(t);
            }
        }
        let (mut weight, mut time) = (0.0, 0.0);
        for (before, first, w) in per {
            match (before, first) {
                (true, _) => time += now - start,
                (false, Some(t)) => time += now - t,
                (false, None) => continue,
            }
            weight += w;
        }
        if time >= self.min_span_s && weight > 0.0 {
            self.estimate = Some(weight / time);
        }
        self.estimate
    }
}

/// KEDA's NATS JetStream scaler for comparison: `ceil(pending messages / lagThreshold)`,
/// clamped, 0 when nothing is pending. It sees message counts, not tokens or deadlines.
pub fn keda_lag_rule(pending_messages: u64, lag_threshold: u64, min: u32, max: u32) -> u32 {
    if pending_messages == 0 {
        return min;
    }
    (pending_messages.div_ceil(lag_threshold.max(1)) as u32).clamp(min.max(1), max.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            min_replicas: 0,
            max_replicas: 20,
            target_drain_s: 3600.0,
            scale_to_zero_after_s: 600.0,
            scale_down_stabilization_s: 300.0,
            startup_s: 120.0,
            default_tokens_per_s: 1000.0,
        }
    }

    fn obs(now: f64, batches: &[(f64, f64)], current: u32) -> Observation {
        Observation {
            now_s: now,
            batches: batches
                .iter()
                .map(|&(tokens, deadline_s)| PendingBatch { tokens, deadline_s })
                .collect(),
            current_replicas: current,
            tokens_per_s_per_worker: Some(1000.0),
        }
    }

    #[test]
    fn table() {
        let p = policy();
        // (batches (tokens, deadline), current, want replicas, want reason)
        type Case = (Vec<(f64, f64)>, u32, u32, Reason);
        let cases: Vec<Case> = vec![
            // Nothing pending, never busy: min.
            (vec![], 0, 0, Reason::Idle),
            // A little work, far deadline: one worker.
            (vec![(1000.0, 86_400.0)], 0, 1, Reason::Pending),
            // 36M tokens within the hour at 1000 tok/s/worker: the drain rule wants 10.
            (vec![(36e6, 86_400.0)], 0, 10, Reason::Drain),
            // 6 h deadline on 54M tokens from zero workers needs 3 (54e6 / (1000 · 21480)); the
            // one-hour drain target asks for more.
            (vec![(54e6, 21_600.0)], 0, 15, Reason::Drain),
            // A tight deadline dominates the drain: 10M in 1000 s with 2 running, new workers
            // working 880 s of it: 2 + ceil(8e6 / 880e3) = 12.
            (vec![(10e6, 1000.0)], 2, 12, Reason::Deadlines),
            // Earliest deadline first: the short job must finish first, the long one counts on top.
            (vec![(1e6, 600.0), (20e6, 7200.0)], 1, 6, Reason::Drain),
            // An impossible deadline (already passed): max.
            (vec![(1e6, -10.0)], 3, 20, Reason::Deadlines),
            // More than max would need: capped.
            (vec![(1e9, 3600.0)], 0, 20, Reason::Drain),
        ];
        for (batches, current, want, reason) in cases {
            let d = decide(&p, &obs(0.0, &batches, current), &mut Memory::default());
            assert_eq!(
                (d.replicas, d.reason),
                (want, reason),
                "{batches:?} from {current}"
            );
        }
    }

    #[test]
    fn idle_workers_are_kept_for_a_while_then_released() {
        let p = policy();
        let mut m = Memory::default();
        assert_eq!(
            decide(&p, &obs(0.0, &[(1e6, 86_400.0)], 1), &mut m).replicas,
            1
        );
        let hold = decide(&p, &obs(100.0, &[], 1), &mut m);
        assert_eq!((hold.replicas, hold.reason), (1, Reason::IdleHold));
        let idle = decide(&p, &obs(700.0, &[], 1), &mut m);
        assert_eq!((idle.replicas, idle.reason), (0, Reason::Idle));
    }

    #[test]
    fn scale_down_waits_for_the_stabilization_window() {
        let p = policy();
        let mut m = Memory::default();
        assert_eq!(
            decide(&p, &obs(0.0, &[(36e6, 1e9)], 0), &mut m).replicas,
            10
        );
        // The queue shrinks: the answer stays at 10 for the window, then follows.
        let d = decide(&p, &obs(60.0, &[(3.6e6, 1e9)], 10), &mut m);
        assert_eq!((d.replicas, d.reason), (10, Reason::Stabilizing));
        let d = decide(&p, &obs(400.0, &[(3.6e6, 1e9)], 10), &mut m);
        assert_eq!(d.replicas, 1);
    }

    /// A small deterministic generator for the property tests.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    #[test]
    fn never_above_max_never_below_the_deadline_need() {
        let mut r = Rng(7);
        for _ in 0..5000 {
            let p = Policy {
                min_replicas: (r.next() * 3.0) as u32,
                max_replicas: 1 + (r.next() * 40.0) as u32,
                startup_s: r.next() * 600.0,
                ..policy()
            };
            let now = r.next() * 1e5;
            let batches: Vec<(f64, f64)> = (0..(r.next() * 6.0) as usize)
                .map(|_| (r.next() * 5e7, now - 100.0 + r.next() * 50_000.0))
                .collect();
            let current = (r.next() * 50.0) as u32;
            let o = obs(now, &batches, current);
            let mut m = Memory::default();
            // Some history in the window.
            for k in 0..(r.next() * 5.0) as usize {
                decide(
                    &p,
                    &obs(now - 50.0 * (k + 1) as f64, &batches, current),
                    &mut m,
                );
            }
            let d = decide(&p, &o, &mut m);
            let cap = p.max_replicas.max(p.min_replicas);
            assert!(d.replicas <= cap, "{d:?} above max {cap}");
            let need = deadline_need(&p, now, 1000.0, current, &o.batches).min(cap);
            assert!(d.replicas >= need, "{d:?} below the deadline need {need}");
        }
    }

    #[test]
    fn a_steady_queue_gets_a_steady_answer() {
        let mut r = Rng(11);
        for _ in 0..500 {
            let p = policy();
            let tokens = r.next() * 1e8;
            let mut current = 0;
            let mut m = Memory::default();
            let mut answers = Vec::new();
            // The same pending work (the queue refills as fast as it drains), far deadline.
            for step in 0..60 {
                let d = decide(
                    &p,
                    &obs(step as f64 * 30.0, &[(tokens, 1e9)], current),
                    &mut m,
                );
                answers.push(d.replicas);
                current = d.replicas;
            }
            let changes = answers.windows(2).filter(|w| w[0] != w[1]).count();
            assert!(changes <= 1, "flapping on a steady queue: {answers:?}");
        }
    }

    #[test]
    fn the_rate_meter_measures_busy_workers_only() {
        let mut m = RateMeter::new(60.0, 10.0);
        assert_eq!(m.sample(0.0, true), None);
        // Two workers, 500 and 1500 tokens/s, a report every second from t = 1.
        for t in 1..=30 {
            m.record(t as f64, "a", 500.0, t as f64);
            m.record(t as f64, "b", 1500.0, t as f64);
        }
        // Backlogged since t = 0: both count from their first report (weight after it).
        let e = m.sample(30.0, true).expect("measured");
        assert!((e - 1000.0).abs() < 1e-9, "{e}");
        assert_eq!(m.active_workers(30.0), 2);
        // A third worker joins at t = 40 at 1000 tokens/s; the others go on.
        for t in 31..=60 {
            m.record(t as f64, "a", 500.0, t as f64);
            m.record(t as f64, "b", 1500.0, t as f64);
            if t >= 40 {
                m.record(t as f64, "c", 1000.0, t as f64);
            }
        }
        let e = m.sample(60.0, true).expect("measured");
        // Worker time: a and b from their first reports at t = 1 (59 s each, 59 reports after
        // the first), c from t = 40 (20 s, 20 reports after its first).
        let want = (59.0 * 2000.0 + 20.0 * 1000.0) / (59.0 * 2.0 + 20.0);
        assert!((e - want).abs() < 1e-9, "{e} vs {want}");
        // No backlog: workers may idle; the estimate stays, the span restarts.
        assert_eq!(m.sample(70.0, false), Some(e));
        for t in 71..=75 {
            m.record(t as f64, "a", 5.0, t as f64);
        }
        assert_eq!(m.sample(75.0, true), Some(e), "a 0 s span measures nothing");
        // Replayed results from long ago are ignored.
        let mut fresh = RateMeter::new(60.0, 10.0);
        fresh.record(0.0, "a", 1e9, 1000.0);
        assert_eq!(fresh.active_workers(1000.0), 0);
        assert_eq!(fresh.sample(1000.0, true), None);
    }

    #[test]
    fn keda_counts_messages_only() {
        assert_eq!(keda_lag_rule(0, 10, 0, 8), 0);
        assert_eq!(keda_lag_rule(1, 10, 0, 8), 1);
        assert_eq!(keda_lag_rule(95, 10, 0, 8), 8);
        assert_eq!(keda_lag_rule(35, 10, 0, 8), 4);
    }
}
