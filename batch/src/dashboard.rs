//! What the operator's dashboard shows, computed from what the coordinator counts: a batch's
//! counts over time ([`Series`]), its rates and time left ([`Rates`]), what each worker did
//! lately ([`Workers`]), the state of each shard ([`shard_views`]) and the failed lines grouped
//! by error code ([`ErrorTally`]).
//!
//! All of it is advisory and lives in the leader's memory: nothing here is stored or counted in
//! a batch's results. A new leader starts with empty series (its counts come back at once from
//! the results stream, so the first point it draws holds them all).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde::Serialize;

/// One sample of a batch's counts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    /// Seconds since the Unix epoch.
    pub t: f64,
    pub completed: u64,
    pub failed: u64,
    /// Completion tokens of the completed lines.
    pub tokens: u64,
}

impl Point {
    /// Lines finished, completed or failed.
    pub fn done(&self) -> u64 {
        self.completed + self.failed
    }
}

/// A batch's counts over time, in bounded memory: samples closer than the spacing to the last
/// one are skipped, and when `cap` points are held every other one is dropped (the first and
/// the last kept) and the spacing doubles. A day-long batch keeps its whole shape in the
/// memory of a minute-long one, at a coarser grain.
#[derive(Debug, Clone)]
pub struct Series {
    points: Vec<Point>,
    spacing_s: f64,
    cap: usize,
}

impl Series {
    /// Points at least `spacing_s` apart, at most `cap` of them (`cap` ≥ 4).
    pub fn new(spacing_s: f64, cap: usize) -> Self {
        Self {
            points: Vec::new(),
            spacing_s,
            cap: cap.max(4),
        }
    }

    /// Adds a sample; `false` when it was skipped (too soon after the last one).
    pub fn push(&mut self, p: Point) -> bool {
        if let Some(last) = self.points.last() {
            if p.t - last.t < self.spacing_s {
                return false;
            }
        }
        self.points.push(p);
        if self.points.len() >= self.cap {
            self.halve();
        }
        true
    }

    /// Drops every other point (the first and the last kept); the spacing doubles.
    fn halve(&mut self) {
        let last = self.points.len().saturating_sub(1);
        let mut i = 0;
        self.points.retain(|_| {
            let keep = i % 2 == 0 || i == last;
            i += 1;
            keep
        });
        self.spacing_s *= 2.0;
    }

    /// Coarsens the series to at most `n` points (≥ 4): what an ended batch keeps.
    pub fn shrink_to(&mut self, n: usize) {
        while self.points.len() > n.max(4) {
            self.halve();
        }
    }

    pub fn points(&self) -> &[Point] {
        &self.points
    }

    /// Current spacing between points, in seconds.
    pub fn spacing_s(&self) -> f64 {
        self.spacing_s
    }
}

/// A batch's speed and time left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Rates {
    /// Over the last `window_s` (or what the series holds of it); `None` before two samples.
    pub lines_per_s_now: Option<f64>,
    pub tokens_per_s_now: Option<f64>,
    /// Since the batch started running, up to its end (or now).
    pub tokens_per_s_avg: Option<f64>,
    /// Seconds until every line is done at the current line rate (`None`: no rate, or done).
    pub eta_s: Option<f64>,
}

/// The rates of a batch of `total` lines whose counts are `now`, whose past is `series`,
/// which started running at `started_s` and ended at `ended_s` (if it did).
pub fn rates(
    series: &Series,
    now: Point,
    total: u64,
    started_s: Option<f64>,
    ended_s: Option<f64>,
    window_s: f64,
) -> Rates {
    let mut r = Rates::default();
    let end = ended_s.unwrap_or(now.t);
    if let Some(start) = started_s {
        let span = end - start;
        if span >= 1.0 {
            r.tokens_per_s_avg = Some(now.tokens as f64 / span);
        }
    }
    if ended_s.is_some() {
        return r;
    }
    // The latest sample at least a window old, else the oldest one at least a second old.
    let points = series.points();
    let base = points
        .iter()
        .rev()
        .find(|p| now.t - p.t >= window_s)
        .or_else(|| points.first().filter(|p| now.t - p.t >= 1.0));
    if let Some(b) = base {
        let dt = now.t - b.t;
        let lines = now.done().saturating_sub(b.done()) as f64 / dt;
        r.lines_per_s_now = Some(lines);
        r.tokens_per_s_now = Some(now.tokens.saturating_sub(b.tokens) as f64 / dt);
        let left = total.saturating_sub(now.done());
        if left > 0 && lines > 0.0 {
            r.eta_s = Some(left as f64 / lines);
        }
    }
    r
}

/// One worker as the dashboard shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerView {
    pub name: String,
    /// Seconds since it last published a result or a progress report.
    pub last_seen_s_ago: f64,
    /// Lines and completion tokens it finished per second over the window.
    pub lines_per_s: f64,
    pub tokens_per_s: f64,
    /// Shards it reports running now.
    pub shards_in_flight: u64,
}

#[derive(Debug, Clone, Default)]
struct Seen {
    last_s: f64,
    first_s: f64,
    /// `(time, lines, tokens)` of its result messages in the window.
    events: VecDeque<(f64, u64, u64)>,
}

/// The workers heard from lately and what each finished per second.
#[derive(Debug, Clone)]
pub struct Workers {
    window_s: f64,
    forget_after_s: f64,
    seen: HashMap<String, Seen>,
}

impl Workers {
    /// Rates over `window_s`; a worker not heard from for `forget_after_s` is dropped.
    pub fn new(window_s: f64, forget_after_s: f64) -> Self {
        Self {
            window_s,
            forget_after_s,
            seen: HashMap::new(),
        }
    }

    fn entry(&mut self, worker: &str, t: f64) -> &mut Seen {
        let s = self.seen.entry(worker.to_string()).or_insert_with(|| Seen {
            last_s: t,
            first_s: t,
            events: VecDeque::new(),
        });
        s.last_s = s.last_s.max(t);
        s
    }

    /// `worker` said something (a progress report) at `t`.
    pub fn heard(&mut self, worker: &str, t: f64) {
        self.entry(worker, t);
    }

    /// `worker` published `lines` results with `tokens` completion tokens at `t` (their publish
    /// time). Results replayed from long ago (a new leader reading the stream) say nothing
    /// about the workers of today and are left out.
    pub fn results(&mut self, worker: &str, t: f64, lines: u64, tokens: u64, now: f64) {
        if t < now - self.forget_after_s {
            return;
        }
        let window = self.window_s;
        let s = self.entry(worker, t);
        s.events.push_back((t, lines, tokens));
        while s.events.front().is_some_and(|e| e.0 < now - window) {
            s.events.pop_front();
        }
    }

    /// The workers heard from within `forget_after_s` of `now`, by name, with the shards each
    /// runs now (`in_flight`, from progress reports).
    pub fn view(&mut self, now: f64, in_flight: &HashMap<String, u64>) -> Vec<WorkerView> {
        let (window, forget) = (self.window_s, self.forget_after_s);
        self.seen.retain(|_, s| now - s.last_s <= forget);
        let mut out: Vec<WorkerView> = self
            .seen
            .iter_mut()
            .map(|(name, s)| {
                while s.events.front().is_some_and(|e| e.0 < now - window) {
                    s.events.pop_front();
                }
                // A worker seen for less than the window is measured over its own time.
                let span = window.min(now - s.first_s).max(1.0);
                let (lines, tokens) = s.events.iter().fold((0, 0), |(l, k), e| (l + e.1, k + e.2));
                WorkerView {
                    name: name.clone(),
                    last_seen_s_ago: (now - s.last_s).max(0.0),
                    lines_per_s: lines as f64 / span,
                    tokens_per_s: tokens as f64 / span,
                    shards_in_flight: in_flight.get(name).copied().unwrap_or(0),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// Where a shard is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardStatus {
    /// A worker reports running it now.
    Running,
    /// It failed on every delivery; its unfinished lines became error lines.
    Dead,
    /// Waiting in the work queue (or held by a worker that has not reported yet).
    Pending,
    /// Every line has its result.
    Done,
}

/// One worker running a shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    pub worker: String,
    /// Which delivery it runs (1: the first).
    pub delivery: u32,
    pub running_tokens: u64,
}

/// One shard as the dashboard shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShardView {
    pub shard: u32,
    pub status: ShardStatus,
    pub lines: u64,
    pub reported: u64,
    /// The most deliveries seen (more than 1: redelivered).
    pub deliveries: u32,
    pub holders: Vec<Holder>,
}

/// A batch's shards `0..count`: lines and reports per shard (`counts`, from the ledger), who
/// runs which now (`running`: shard, holder), the most deliveries seen of each and the dead
/// ones. Sorted by status (running, dead, pending, done), redelivered ones first within a
/// status, then by number.
pub fn shard_views(
    count: u32,
    counts: &BTreeMap<u32, (u64, u64)>,
    running: &[(u32, Holder)],
    deliveries: &HashMap<u32, u32>,
    dead: &BTreeSet<u32>,
) -> Vec<ShardView> {
    let mut out: Vec<ShardView> = (0..count)
        .map(|shard| {
            let (lines, reported) = counts.get(&shard).copied().unwrap_or((0, 0));
            let holders: Vec<Holder> = running
                .iter()
                .filter(|(s, _)| *s == shard)
                .map(|(_, h)| h.clone())
                .collect();
            let most = holders.iter().map(|h| h.delivery).max().unwrap_or(0);
            let status = if dead.contains(&shard) {
                ShardStatus::Dead
            } else if lines > 0 && reported >= lines {
                ShardStatus::Done
            } else if !holders.is_empty() {
                ShardStatus::Running
            } else {
                ShardStatus::Pending
            };
            ShardView {
                shard,
                status,
                lines,
                reported,
                deliveries: deliveries.get(&shard).copied().unwrap_or(0).max(most),
                holders,
            }
        })
        .collect();
    out.sort_by_key(|s| (s.status, s.deliveries <= 1, s.shard));
    out
}

/// Failed lines of one error code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorCount {
    pub code: String,
    pub count: u64,
    /// The first message seen with this code.
    pub example: String,
}

/// Failed lines grouped by error code (bounded: the first 64 codes are kept apart, the rest
/// counted under `other`).
#[derive(Debug, Clone, Default)]
pub struct ErrorTally {
    codes: BTreeMap<String, (u64, String)>,
}

/// Distinct codes kept apart.
const MAX_CODES: usize = 64;
/// Longest example message kept, in bytes.
const MAX_EXAMPLE: usize = 300;

impl ErrorTally {
    pub fn add(&mut self, code: &str, message: &str) {
        let code = if self.codes.contains_key(code) || self.codes.len() < MAX_CODES {
            code
        } else {
            "other"
        };
        let e = self.codes.entry(code.to_string()).or_insert_with(|| {
            let mut end = message.len().min(MAX_EXAMPLE);
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            (0, message[..end].to_string())
        });
        e.0 += 1;
    }

    /// The codes, most frequent first.
    pub fn counts(&self) -> Vec<ErrorCount> {
        let mut out: Vec<ErrorCount> = self
            .codes
            .iter()
            .map(|(code, (count, example))| ErrorCount {
                code: code.clone(),
                count: *count,
                example: example.clone(),
            })
            .collect();
        out.sort_by(|a, b| b.count.cmp(&a.count).then(a.code.cmp(&b.code)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(t: f64, done: u64, tokens: u64) -> Point {
        Point {
            t,
            completed: done,
            failed: 0,
            tokens,
        }
    }

    #[test]
    fn a_series_stays_bounded_keeps_its_ends_and_coarsens_evenly() {
        let mut s = Series::new(1.0, 16);
        assert!(s.push(pt(0.0, 0, 0)));
        assert!(!s.push(pt(0.5, 1, 1)), "too soon after the last point");
        for i in 1..=1000 {
            s.push(pt(i as f64, i, 10 * i));
        }
        let p = s.points();
        assert!(p.len() < 16, "{} points", p.len());
        assert_eq!(p[0].t, 0.0, "the first point stays");
        assert!(p.last().is_some_and(|l| l.t >= 1000.0 - s.spacing_s()));
        assert!(p.windows(2).all(|w| w[1].t > w[0].t), "in time order");
        // Gaps between kept points are the spacing of when they were taken: never more than
        // the current spacing.
        let widest = p.windows(2).map(|w| w[1].t - w[0].t).fold(0.0, f64::max);
        assert!(widest <= s.spacing_s(), "{widest} > {}", s.spacing_s());
        let last = p.last().copied();
        s.shrink_to(5);
        assert!(s.points().len() <= 5);
        assert_eq!((s.points()[0].t, s.points().last().copied()), (0.0, last));
    }

    #[test]
    fn rates_use_the_last_window_and_time_left_follows_the_line_rate() {
        let mut s = Series::new(1.0, 512);
        for i in 0..=20 {
            // 10 lines/s for 10 s, then 20 lines/s.
            let done = if i <= 10 { 10 * i } else { 100 + 20 * (i - 10) };
            s.push(pt(1000.0 + i as f64, done, done * 3));
        }
        let now = pt(1020.0, 300, 900);
        let r = rates(&s, now, 1000, Some(1000.0), None, 10.0);
        assert_eq!(r.lines_per_s_now, Some(20.0));
        assert_eq!(r.tokens_per_s_now, Some(60.0));
        assert_eq!(r.tokens_per_s_avg, Some(45.0));
        assert_eq!(r.eta_s, Some(35.0), "700 lines left at 20/s");
        // Young: the oldest sample a second old serves.
        let mut young = Series::new(1.0, 512);
        young.push(pt(0.0, 0, 0));
        let r = rates(&young, pt(2.0, 4, 8), 10, Some(0.0), None, 10.0);
        assert_eq!((r.lines_per_s_now, r.eta_s), (Some(2.0), Some(3.0)));
        // Nothing moving: no time left to quote. Ended: only the average.
        let r = rates(&young, pt(2.0, 0, 0), 10, Some(0.0), None, 10.0);
        assert_eq!((r.lines_per_s_now, r.eta_s), (Some(0.0), None));
        let r = rates(&s, now, 300, Some(1000.0), Some(1010.0), 10.0);
        assert_eq!(r.tokens_per_s_avg, Some(90.0));
        assert_eq!((r.lines_per_s_now, r.eta_s), (None, None));
    }

    #[test]
    fn workers_are_measured_over_the_window_and_forgotten_when_silent() {
        let mut w = Workers::new(10.0, 60.0);
        let now = 100.0;
        for i in 0..10 {
            w.results("a", 90.0 + i as f64, 5, 50, now);
        }
        w.results("b", 99.0, 1, 10, now);
        w.heard("c", 99.5);
        w.results("old", 10.0, 100, 1000, now);
        let in_flight = HashMap::from([("a".to_string(), 2)]);
        let v = w.view(now, &in_flight);
        let names: Vec<&str> = v.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"], "replayed history is not a worker");
        assert_eq!((v[0].lines_per_s, v[0].tokens_per_s), (5.0, 50.0));
        assert_eq!(v[0].shards_in_flight, 2);
        // b was first heard a second ago: measured over that second.
        assert_eq!(v[1].tokens_per_s, 10.0);
        assert_eq!((v[2].tokens_per_s, v[2].last_seen_s_ago), (0.0, 0.5));
        // Silent for the window: rates fall to 0; past forget_after_s: gone.
        let v = w.view(now + 30.0, &HashMap::new());
        assert!(v.iter().all(|x| x.tokens_per_s == 0.0), "{v:?}");
        assert!(w.view(now + 61.0, &HashMap::new()).is_empty());
    }

    #[test]
    fn shards_show_who_runs_them_redeliveries_and_the_dead() {
        let counts = BTreeMap::from([
            (0, (4, 4)),
            (1, (4, 1)),
            (2, (4, 0)),
            (3, (4, 2)),
            (5, (4, 4)),
        ]);
        let holder = |w: &str, d| Holder {
            worker: w.into(),
            delivery: d,
            running_tokens: 7,
        };
        let running = [(1, holder("w2", 2))];
        let deliveries = HashMap::from([(0, 1), (1, 2), (3, 3), (5, 2), (4, 2)]);
        let dead = BTreeSet::from([3]);
        let v = shard_views(6, &counts, &running, &deliveries, &dead);
        let order: Vec<(u32, ShardStatus, u32)> = v
            .iter()
            .map(|s| (s.shard, s.status, s.deliveries))
            .collect();
        use ShardStatus::*;
        assert_eq!(
            order,
            [
                (1, Running, 2),
                (3, Dead, 3),
                (4, Pending, 2),
                (2, Pending, 0),
                (5, Done, 2),
                (0, Done, 1)
            ]
        );
        assert_eq!(v[0].holders, [holder("w2", 2)]);
    }

    #[test]
    fn errors_are_grouped_by_code_most_frequent_first_and_bounded() {
        let mut t = ErrorTally::default();
        t.add("shard_failed", "line 3: failed after 3 attempts");
        t.add("invalid_request", "line 9: bad");
        t.add("shard_failed", "line 4: failed after 3 attempts");
        let c = t.counts();
        assert_eq!((c[0].code.as_str(), c[0].count), ("shard_failed", 2));
        assert_eq!(c[0].example, "line 3: failed after 3 attempts");
        for i in 0..100 {
            t.add(&format!("code{i}"), &"é".repeat(400));
        }
        let c = t.counts();
        assert_eq!(c.len(), MAX_CODES + 1, "64 codes and `other`");
        assert!(c.iter().all(|e| e.example.len() <= MAX_EXAMPLE));
        assert_eq!(
            c.iter().find(|e| e.code == "other").map(|e| e.count),
            Some(38)
        );
    }
}
