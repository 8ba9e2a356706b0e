//! Per-request sampling: greedy, temperature, top-k, top-p.
//!
//! The random draw for step `n` of a request is a pure function of `(seed, n)` (a counter-based
//! generator), so a request's sampled tokens never depend on what it was batched with or on how
//! many draws other requests made.

use gristmill_kernels::cpu::argmax;
use gristmill_protocol::GenerationParams;

/// SplitMix64's finaliser: a strong 64-bit mix.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform draw in `[0, 1)` for `(seed, step)`.
pub fn uniform(seed: u64, step: u64) -> f64 {
    let bits =
        mix(mix(seed ^ 0x9e37_79b9_7f4a_7c15)
            .wrapping_add(step.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// The log-probability of a generated token under the model's raw distribution (the logits
/// before temperature, top-k and top-p), and the most likely alternatives at that step.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    /// `(token, logprob)`, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Log-softmax of one row of logits at `token`, with the `top` most likely tokens (ties by id).
pub fn token_logprob(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln();
    let lp = |i: u32| (logits[i as usize] as f64 - lse) as f32;
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let n = top.min(ids.len());
    if n > 0 && n < ids.len() {
        ids.select_nth_unstable_by(n - 1, by_logit);
    }
    ids.truncate(n);
    ids.sort_unstable_by(by_logit);
    TokenLogprob {
        token,
        logprob: lp(token),
        top: ids.into_iter().map(|i| (i, lp(i))).collect(),
    }
}

/// Sampling settings of one request, with its seed fixed.
#[derive(Debug, Clone)]
pub struct Sampler {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    frequency_penalty: f32,
    presence_penalty: f32,
    seed: u64,
    /// How often each generated token occurred (for the penalties), and the tokens counted:
    /// updated with each step's new tokens, not rebuilt.
    counts: std::collections::HashMap<u32, u32>,
    counted: Vec<u32>,
}

impl Sampler {
    /// The sampler of choice `choice` (of `n`) of a request; `fallback_seed` is used when the
    /// request has no seed of its own. Choice 0 uses the seed itself, so `n = 1` and the first
    /// of `n` choices agree; the others derive independent streams from it.
    pub fn new(p: &GenerationParams, fallback_seed: u64, choice: usize) -> Self {
        let base = p.seed.unwrap_or(fallback_seed);
        let seed = if choice == 0 {
            base
        } else {
            mix(base ^ mix(choice as u64))
        };
        Self {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            frequency_penalty: p.frequency_penalty,
            presence_penalty: p.presence_penalty,
            seed,
            counts: std::collections::HashMap::new(),
            counted: Vec::new(),
        }
    }

    /// The logits less OpenAI's frequency and presence penalties for the tokens generated so far.
    fn penalise(&mut self, logits: &[f32], generated: &[u32]) -> Vec<f32> {
        if !generated.starts_with(&self.counted) {
            // Not a continuation of what was counted: count afresh.
            self.counts.clear();
            self.counted.clear();
        }
        for &t in &generated[self.counted.len()..] {
            *self.counts.entry(t).or_default() += 1;
        }
        self.counted
            .extend_from_slice(&generated[self.counted.len()..]);
        let mut out = logits.to_vec();
        for (&t, &c) in &self.counts {
            if let Some(v) = out.get_mut(t as usize) {
                *v -= c as f32 * self.frequency_penalty + self.presence_penalty;
            }
        }
        out
    }

    /// Picks the token for generation step `step` from one row of logits, given the tokens the
    /// sequence generated so far (for penalties).
    pub fn sample(&mut self, logits: &[f32], step: u64, generated: &[u32]) -> u32 {
        let penalised;
        let logits = if self.frequency_penalty != 0.0 || self.presence_penalty != 0.0 {
            penalised = self.penalise(logits, generated);
            &penalised[..]
        } else {
            logits
        };
        if self.temperature <= 0.0 || self.top_k == 1 {
            return argmax(logits) as u32;
        }
        // Candidates in a total order (logit descending, id ascending) so ties are stable.
        let mut idx: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| !logits[i as usize].is_nan())
            .collect();
        let by_logit = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        if self.top_k > 0 && self.top_k < idx.len() {
            idx.select_nth_unstable_by(self.top_k - 1, by_logit);
            idx.truncate(self.top_k);
        }
        let Some(max) = idx
            .iter()
            .map(|&i| logits[i as usize])
            .max_by(f32::total_cmp)
        else {
            return 0;
        };
        let (max, t) = (max as f64, self.temperature as f64);
        let prob = |i: u32| ((logits[i as usize] as f64 - max) / t).exp();
        // The normaliser over every candidate, summed in id order.
        let mut all = idx.clone();
        all.sort_unstable();
        let total: f64 = all.iter().map(|&i| prob(i)).sum();
        // Only the head of the order is sorted: the most likely `head` candidates, doubled
        // until their mass reaches top_p (a full sort only when it never does).
        if self.top_p >= 1.0 {
            // Every candidate is kept: draw walking them in id order, no sort needed.
            let target = uniform(self.seed, step) * total;
            let mut acc = 0.0;
            for &i in &all {
                acc += prob(i);
                if target < acc {
                    return i;
                }
            }
            return all[all.len() - 1];
        }
        let mut head = 64;
        let mut probs: Vec<f64>;
        loop {
            if head < idx.len() {
                idx.select_nth_unstable_by(head - 1, by_logit);
                idx[..head].sort_unstable_by(by_logit);
            } else {
                head = idx.len();
                idx.sort_unstable_by(by_logit);
            }
            probs = idx[..head].iter().map(|&i| prob(i)).collect();
            // Keep the smallest prefix whose mass reaches top_p (always at least one token).
            let mut mass = 0.0;
            let keep = probs.iter().position(|p| {
                mass += p / total;
                mass >= self.top_p as f64
            });
            if let Some(n) = keep {
                probs.truncate(n + 1);
                break;
            }
            if head == idx.len() {
                break;
            }
            head *= 2;
        }
        let total: f64 = probs.iter().sum();
        let target = uniform(self.seed, step) * total;
        let mut acc = 0.0;
        for (n, p) in probs.iter().enumerate() {
            acc += p;
            if target < acc {
                return idx[n];
            }
        }
        idx[probs.len() - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32) -> GenerationParams {
        GenerationParams {
            temperature,
            top_k,
            top_p,
            seed: Some(42),
            ..Default::default()
        }
    }

    #[test]
    fn top_p_beyond_the_first_64_candidates_sorts_more_of_them() {
        // 1000 nearly equal logits: top_p 0.5 needs about 500 of them.
        let logits: Vec<f32> = (0..1000).map(|i| 1.0 - i as f32 * 1e-4).collect();
        let mut s = Sampler::new(&params(1.0, 0, 0.5), 0, 0);
        let drawn: Vec<u32> = (0..400).map(|step| s.sample(&logits, step, &[])).collect();
        assert!(drawn.iter().all(|&t| t < 520), "outside the top-p set");
        assert!(drawn.iter().any(|&t| t > 200), "only the head was kept");
    }

    #[test]
    fn penalties_counted_step_by_step_equal_penalties_counted_afresh() {
        let f = GenerationParams {
            frequency_penalty: 0.7,
            presence_penalty: 0.3,
            ..params(1.0, 0, 0.9)
        };
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7) % 11) as f32 * 0.3).collect();
        let mut generated = Vec::new();
        let mut stepwise = Sampler::new(&f, 0, 0);
        for step in 0..30 {
            let t = stepwise.sample(&logits, step, &generated);
            let fresh = Sampler::new(&f, 0, 0).sample(&logits, step, &generated);
            assert_eq!(t, fresh, "step {step}");
            generated.push(t);
        }
    }

    #[test]
    fn greedy_takes_the_lowest_index_of_the_max() {
        let mut s = Sampler::new(&params(0.0, 0, 1.0), 0, 0);
        assert_eq!(s.sample(&[0.1, 2.0, 2.0, -1.0], 0, &[]), 1);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [5.0, 4.9, 0.0, -1.0, 4.8];
        let mut k2 = Sampler::new(&params(1.0, 2, 1.0), 0, 0);
        let mut p = Sampler::new(&params(1.0, 0, 0.3), 0, 0);
        for step in 0..200 {
            assert!([0, 1].contains(&k2.sample(&logits, step, &[])));
            assert_eq!(
                p.sample(&logits, step, &[]),
                0,
                "top_p 0.3 keeps only the top token"
            );
        }
    }

    #[test]
    fn draws_follow_the_distribution_and_depend_only_on_seed_and_step() {
        let logits = [1.0f32.ln(), 3.0f32.ln()]; // probabilities 1/4, 3/4
        let mut s = Sampler::new(&params(1.0, 0, 1.0), 0, 0);
        let ones = (0..4000)
            .filter(|&i| s.sample(&logits, i, &[]) == 1)
            .count();
        assert!(
            (2800..3200).contains(&ones),
            "{ones} of 4000 draws picked p = 0.75"
        );
        let mut again = Sampler::new(&params(1.0, 0, 1.0), 999, 0);
        assert!((0..100).all(|i| s.sample(&logits, i, &[]) == again.sample(&logits, i, &[])));
    }

    #[test]
    fn logprobs_are_a_log_softmax_with_ranked_alternatives() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let t = token_logprob(&logits, 2, 3);
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        assert!((t.logprob as f64 - (2.0 - z.ln())).abs() < 1e-6);
        assert_eq!(t.top.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        assert!(token_logprob(&logits, 0, 0).top.is_empty());
    }

    #[test]
    fn penalties_lower_repeated_tokens() {
        let logits = [1.0, 0.9, 0.2];
        let mut plain = Sampler::new(&params(0.0, 0, 1.0), 0, 0);
        assert_eq!(plain.sample(&logits, 1, &[0]), 0);
        let mut p = params(0.0, 0, 1.0);
        p.presence_penalty = 0.5;
        assert_eq!(Sampler::new(&p, 0, 0).sample(&logits, 1, &[0]), 1);
        let mut f = params(0.0, 0, 1.0);
        f.frequency_penalty = 0.4;
        let mut s = Sampler::new(&f, 0, 0);
        assert_eq!(
            s.sample(&logits, 1, &[1]),
            0,
            "one use of token 1 costs 0.4"
        );
        assert_eq!(s.sample(&logits, 1, &[0]), 1);
        assert_eq!(
            s.sample(&logits, 3, &[0, 0, 1, 1, 1]),
            2,
            "0 pays 0.8, 1 pays 1.2"
        );
    }

    #[test]
    fn uniform_is_in_range() {
        for i in 0..1000 {
            let u = uniform(7, i);
            assert!((0.0..1.0).contains(&u));
        }
    }
}
