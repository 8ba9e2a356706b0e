//! The shard planner: which lines of a batch travel together to one worker.
//!
//! Lines are ordered by their prompt token ids, so prompts that share a prefix — the same
//! template before different specs — sit next to each other, and the shared part is computed
//! once by the worker's prefix cache. The ordered lines are then cut into shards of at most
//! `max_tokens` tokens (prompt plus `max_tokens` of each line), `max_lines` lines and `max_bytes`
//! bytes (one NATS message each). Shards are returned heaviest first, so the longest work starts
//! first and the batch's tail is short.
//!
//! Invariant: every input line is in exactly one shard.

/// One line as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanLine {
    /// Position of the line in the caller's list.
    pub index: usize,
    /// Prompt token ids (after the chat template).
    pub prompt: Vec<u32>,
    /// Tokens the line may generate.
    pub max_new_tokens: u64,
    /// Serialised size of the line in a shard message.
    pub bytes: usize,
}

impl PlanLine {
    fn tokens(&self) -> u64 {
        self.prompt.len() as u64 + self.max_new_tokens
    }
}

/// Shard size limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardLimits {
    pub max_tokens: u64,
    pub max_lines: usize,
    pub max_bytes: usize,
}

impl Default for ShardLimits {
    fn default() -> Self {
        // 64k tokens keeps a shard to minutes on one GPU worker; 900 kB stays under NATS's default
        // 1 MB payload limit with room for headers.
        Self {
            max_tokens: 65_536,
            max_lines: 512,
            max_bytes: 900_000,
        }
    }
}

/// A planned shard: indices of its lines (in prefix order) and its token weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    pub lines: Vec<usize>,
    pub tokens: u64,
    pub bytes: usize,
}

/// Plans the shards of a batch. A single line over a limit gets a shard of its own.
pub fn plan_shards(mut lines: Vec<PlanLine>, limits: ShardLimits) -> Vec<ShardPlan> {
    lines.sort_by(|a, b| a.prompt.cmp(&b.prompt).then(a.index.cmp(&b.index)));
    let mut shards: Vec<ShardPlan> = Vec::new();
    let mut current = ShardPlan {
        lines: Vec::new(),
        tokens: 0,
        bytes: 0,
    };
    for line in lines {
        let fits = current.lines.is_empty()
            || (current.tokens + line.tokens() <= limits.max_tokens
                && current.lines.len() < limits.max_lines
                && current.bytes + line.bytes <= limits.max_bytes);
        if !fits {
            shards.push(std::mem::replace(
                &mut current,
                ShardPlan {
                    lines: Vec::new(),
                    tokens: 0,
                    bytes: 0,
                },
            ));
        }
        current.tokens += line.tokens();
        current.bytes += line.bytes;
        current.lines.push(line.index);
    }
    if !current.lines.is_empty() {
        shards.push(current);
    }
    // Heaviest first; ties keep prefix order (the sort is stable).
    shards.sort_by_key(|s| std::cmp::Reverse(s.tokens));
    shards
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(index: usize, prompt: &[u32], max_new: u64) -> PlanLine {
        PlanLine {
            index,
            prompt: prompt.to_vec(),
            max_new_tokens: max_new,
            bytes: 100,
        }
    }

    fn limits(max_tokens: u64) -> ShardLimits {
        ShardLimits {
            max_tokens,
            max_lines: 100,
            max_bytes: 1_000_000,
        }
    }

    #[test]
    fn shared_prefixes_travel_together() {
        // Two templates, interleaved in the file.
        let a = [1, 2, 3, 4];
        let b = [9, 9, 9, 9];
        let lines = vec![
            line(0, &[&a[..], &[10]].concat(), 4),
            line(1, &[&b[..], &[10]].concat(), 4),
            line(2, &[&a[..], &[11]].concat(), 4),
            line(3, &[&b[..], &[11]].concat(), 4),
        ];
        let shards = plan_shards(lines, limits(18));
        let mut groups: Vec<Vec<usize>> = shards.into_iter().map(|s| s.lines).collect();
        groups.sort();
        assert_eq!(groups, vec![vec![0, 2], vec![1, 3]]);
    }

    #[test]
    fn limits_are_respected_and_every_line_is_planned_once() {
        let lines: Vec<PlanLine> = (0..50)
            .map(|i| line(i, &[(i % 7) as u32, i as u32], 10 + i as u64))
            .collect();
        for (max_tokens, max_lines, max_bytes) in
            [(60, 100, 1_000_000), (1000, 3, 1_000_000), (1000, 100, 450)]
        {
            let shards = plan_shards(
                lines.clone(),
                ShardLimits {
                    max_tokens,
                    max_lines,
                    max_bytes,
                },
            );
            let mut all: Vec<usize> = shards.iter().flat_map(|s| s.lines.clone()).collect();
            all.sort_unstable();
            assert_eq!(all, (0..50).collect::<Vec<_>>());
            for s in &shards {
                assert!(s.tokens <= max_tokens || s.lines.len() == 1, "{s:?}");
                assert!(s.lines.len() <= max_lines);
                assert!(s.bytes <= max_bytes);
            }
            assert!(
                shards.windows(2).all(|w| w[0].tokens >= w[1].tokens),
                "heaviest first"
            );
        }
    }

    #[test]
    fn an_oversized_line_gets_its_own_shard() {
        let shards = plan_shards(
            vec![line(0, &[1; 10], 1000), line(1, &[2], 1), line(2, &[3], 1)],
            limits(100),
        );
        assert_eq!(
            shards[0],
            ShardPlan {
                lines: vec![0],
                tokens: 1010,
                bytes: 100
            }
        );
        assert_eq!(shards[1].lines, vec![1, 2]);
    }

    #[test]
    fn no_lines_no_shards() {
        assert!(plan_shards(Vec::new(), ShardLimits::default()).is_empty());
    }
}
