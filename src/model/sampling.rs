//! Choosing the next token from logits: greedy, or temperature with top-k / top-p, and a
//! repetition penalty, reproducible from a seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How tokens are drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy (argmax); otherwise logits are divided by it before the softmax.
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `p` (1 = all).
    pub top_p: f64,
    /// Divides positive (multiplies negative) logits of tokens already seen; 1 = off.
    pub repetition_penalty: f64,
    /// Seed of the random draws.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 299_792_458,
        }
    }
}

/// A token sampler with its own random stream.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    /// The next token for `logits` (one row, vocabulary long), given the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let mut l: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
        if p.repetition_penalty != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for t in seen {
                if let Some(x) = l.get_mut(t as usize) {
                    *x = if *x > 0.0 {
                        *x / p.repetition_penalty
                    } else {
                        *x * p.repetition_penalty
                    };
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax_f64(&l);
        }
        let mut idx: Vec<usize> = (0..l.len()).collect();
        idx.sort_unstable_by(|&a, &b| l[b].total_cmp(&l[a]));
        if p.top_k > 0 {
            idx.truncate(p.top_k);
        }
        let max = idx.first().map_or(0.0, |&i| l[i]);
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| ((l[i] - max) / p.temperature).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&x| {
                    acc += x;
                    acc >= p.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            idx.truncate(keep);
            probs.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= total);
        }
        let r: f64 = self.rng.random();
        let mut acc = 0.0;
        for (k, &pr) in probs.iter().enumerate() {
            acc += pr;
            if r < acc {
                return idx[k] as u32;
            }
        }
        idx.last().map_or(0, |&i| i as u32)
    }
}

fn argmax_f64(l: &[f64]) -> u32 {
    let mut best = 0;
    for (i, x) in l.iter().enumerate() {
        if *x > l[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_top_k_and_penalty() {
        let logits = [0.5f32, 3.0, 2.9, -1.0];
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&logits, &[]), 1);
        // A penalty of 2 halves token 1's logit: token 2 wins.
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits, &[1]), 2);
        // top_k = 1 at any temperature is greedy.
        let mut s = Sampler::new(SamplingParams {
            temperature: 5.0,
            top_k: 1,
            ..Default::default()
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&logits, &[]), 1);
        }
    }

    #[test]
    fn temperature_draws_follow_the_softmax_and_repeat_with_the_seed() {
        let logits = [0.0f32, (2.0f32).ln(), f32::NEG_INFINITY];
        let params = SamplingParams {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let draw = |n| {
            let mut s = Sampler::new(params.clone());
            (0..n).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        let a = draw(3000);
        assert_eq!(a, draw(3000));
        let ones = a.iter().filter(|&&t| t == 1).count() as f64 / 3000.0;
        assert!((ones - 2.0 / 3.0).abs() < 0.05, "{ones}");
        assert!(!a.contains(&2));
        // top_p = 0.5 keeps only the most likely token (p = 2/3).
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.5,
            ..params
        });
        assert!((0..100).all(|_| s.sample(&logits, &[]) == 1));
    }
}
