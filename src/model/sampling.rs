//! Choosing the next token from logits: greedy, or temperature with top-k / top-p, and a
//! repetition penalty, reproducible from a seed. Tokens are drawn where the logits are: on the
//! rank that answers a step (`SeqSamplers`), so a step's reply is a token id per sequence
//! instead of a vocabulary of logits (0.5 MB a sequence for a 128k vocabulary, which rank
//! servers would otherwise send over the wire at every step).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::SeqStep;
use crate::error::Result;

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

    /// The parameters it draws with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
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

/// Pieces a row of `v` logits is cut into for [`argmax_rows`]: the largest divisor of `v` up to
/// 256 that leaves pieces of at least 64 logits (1: the row stays whole).
fn argmax_pieces(v: usize) -> usize {
    (1..=256.min(v / 64))
        .rev()
        .find(|c| v % c == 0)
        .unwrap_or(1)
}

/// The argmax of each row of `[b, v]` logits (`[b]` u32), the first maximum on ties, on the
/// logits' device. Candle's argmax gives a whole row to one block of threads (86 us for 8 rows
/// of 128256 logits on an H200, under ncu). On a GPU the row is cut into [`argmax_pieces`] pieces
/// whose argmaxes and maxima run side by side, and the first piece holding the row's maximum
/// gives the token: five short launches (1-2% of a batch-8 step; level at batch 1, where one
/// row was one block's work anyway; BENCHMARKS.md, eighth round).
///
/// # Errors
/// Kernel errors; on a GPU, `logits` not of rank 2.
pub(crate) fn argmax_rows(logits: &Tensor) -> Result<Tensor> {
    let pieces = argmax_pieces(logits.dim(D::Minus1)?);
    if pieces == 1 || !logits.device().is_cuda() {
        // A CPU's argmax is one pass over the row; the pieces would read it twice.
        return Ok(logits.argmax(D::Minus1)?);
    }
    argmax_in_pieces(logits, pieces)
}

/// [`argmax_rows`] with each row cut into `pieces` pieces (a divisor of the row's length).
fn argmax_in_pieces(logits: &Tensor, pieces: usize) -> Result<Tensor> {
    let (b, v) = logits.dims2()?;
    let len = v / pieces;
    let cut = logits.reshape((b, pieces, len))?;
    let within = cut.argmax(D::Minus1)?;
    let piece = cut.max(D::Minus1)?.argmax_keepdim(D::Minus1)?;
    let at = within.gather(&piece, 1)?;
    Ok(piece.affine(len as f64, 0.0)?.add(&at)?.squeeze(1)?)
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

impl SamplingParams {
    /// Greedy without a repetition penalty: the token is the logits' argmax, which the device
    /// holding them can find without sending them anywhere.
    pub fn is_plain_greedy(&self) -> bool {
        self.temperature <= 0.0 && self.repetition_penalty == 1.0
    }
}

/// What a step gives back for one sequence.
#[derive(Debug, Clone)]
pub enum StepOutput {
    /// `[n, vocab]` f32 logits on the host (`n` = 1, or every new token when `all_logits`).
    Logits(Tensor),
    /// The next token, drawn on the rank (the sequence asked with [`SeqStep::sample`]).
    Token(u32),
}

/// A sequence's sampling state on the rank that draws its tokens.
#[derive(Debug, Default)]
struct SeqSampling {
    sampler: Option<Sampler>,
    /// Every token the sequence was fed (the repetition penalty's history).
    history: Vec<u32>,
}

/// The samplers of the sequences a rank draws tokens for: each sequence's own sampler
/// (seeded at its first sampled step, anew when its parameters change) and the tokens it was
/// fed since its first step, so a sequence draws the same tokens as a [`Sampler`] given its
/// logits and history elsewhere would.
#[derive(Debug, Default)]
pub(crate) struct SeqSamplers {
    seqs: HashMap<u64, SeqSampling>,
}

impl SeqSamplers {
    /// Forgets a sequence.
    pub(crate) fn release(&mut self, seq_id: u64) {
        self.seqs.remove(&seq_id);
    }

    /// One step's outputs: `logits[i]` (`[n, vocab]` f32 on the rank's device, its work done)
    /// of `seqs[i]`. Plain greedy sequences take the argmax on the device, all in one launch
    /// and one copy of the token ids; other sampled ones copy their last row to the host;
    /// the rest copy their logits.
    ///
    /// # Errors
    /// Kernel or copy errors.
    pub(crate) fn outputs(
        &mut self,
        seqs: &[SeqStep],
        logits: &[Tensor],
    ) -> Result<Vec<StepOutput>> {
        for s in seqs {
            let e = self.seqs.entry(s.seq_id).or_default();
            if s.start_pos == 0 {
                e.history.clear();
            }
            e.history.extend_from_slice(&s.tokens);
        }
        let last = |l: &Tensor| -> Result<Tensor> { Ok(l.narrow(0, l.dim(0)? - 1, 1)?) };
        let greedy: Vec<usize> = (0..seqs.len())
            .filter(|&i| seqs[i].sample.as_ref().is_some_and(|p| p.is_plain_greedy()))
            .collect();
        let mut tokens = HashMap::new();
        if !greedy.is_empty() {
            let rows = greedy
                .iter()
                .map(|&i| last(&logits[i]))
                .collect::<Result<Vec<_>>>()?;
            let logits = Tensor::cat(&rows, 0)?;
            let vocab = logits.dim(D::Minus1)?;
            let ids = argmax_rows(&logits.reshape(((), vocab))?)?
                .to_dtype(DType::U32)?
                .to_vec1::<u32>()?;
            tokens.extend(greedy.iter().copied().zip(ids));
        }
        let mut out = Vec::with_capacity(seqs.len());
        for (i, (s, l)) in seqs.iter().zip(logits).enumerate() {
            out.push(match (&s.sample, tokens.get(&i)) {
                (_, Some(&t)) => StepOutput::Token(t),
                (None, None) => StepOutput::Logits(l.to_device(&Device::Cpu)?),
                (Some(p), None) => {
                    let row = last(l)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
                    let e = self.seqs.entry(s.seq_id).or_default();
                    let fresh = e.sampler.as_ref().is_none_or(|x| x.params() != p);
                    if fresh || s.start_pos == 0 {
                        e.sampler = None;
                    }
                    let sampler = e.sampler.get_or_insert_with(|| Sampler::new(p.clone()));
                    StepOutput::Token(sampler.sample(&row, &e.history))
                }
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_in_pieces_matches_a_scan_of_each_row() {
        let seed: u64 = rand::rng().random();
        let mut rng = StdRng::seed_from_u64(seed);
        // Vocabularies cut into many pieces, a few, and none; ties across pieces.
        for v in [128_256usize, 49_152, 32_001, 1_000, 100, 7] {
            let b = 3;
            let mut x: Vec<f32> = (0..b * v).map(|_| rng.random_range(-4.0..4.0)).collect();
            // Row 1: its maximum twice, far apart (the first one wins).
            let (i, j) = (v / 3, v - 1);
            x[v + i] = 9.0;
            x[v + j] = 9.0;
            let t = Tensor::from_vec(x.clone(), (b, v), &Device::Cpu).unwrap();
            let got = argmax_in_pieces(&t, argmax_pieces(v))
                .unwrap()
                .to_vec1::<u32>()
                .unwrap();
            assert_eq!(got, argmax_rows(&t).unwrap().to_vec1::<u32>().unwrap());
            for (r, &g) in got.iter().enumerate() {
                let row: Vec<f64> = x[r * v..(r + 1) * v].iter().map(|&y| y as f64).collect();
                assert_eq!(g, argmax_f64(&row), "vocabulary {v}, row {r}, seed {seed}");
            }
            assert_eq!(got[1], i as u32, "vocabulary {v}: tie, seed {seed}");
        }
        assert_eq!(argmax_pieces(128_256), 256);
        assert_eq!(argmax_pieces(32_001), 3);
        assert_eq!(argmax_pieces(100), 1);
    }

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

    /// A sequence's tokens drawn on the rank equal those of a [`Sampler`] given the same
    /// logits and history, step after step: greedy (argmax on the device's tensors), with a
    /// temperature, top-k/top-p and a repetition penalty; a sequence that asks for nothing gets
    /// its logits; a new first step reseeds.
    #[test]
    fn rank_samplers_match_a_sampler_given_the_logits() {
        let dev = Device::Cpu;
        let vocab = 50;
        let drawn = SamplingParams {
            temperature: 0.9,
            top_k: 20,
            top_p: 0.95,
            repetition_penalty: 1.3,
            seed: rand::random(),
        };
        let greedy = SamplingParams::default();
        let mut rank = SeqSamplers::default();
        let mut reference = Sampler::new(drawn.clone());
        let mut history = Vec::new();
        let mut rng = StdRng::seed_from_u64(rand::random());
        let mut next = vec![3u32, 9, 27];
        let mut pos = 0;
        for step in 0..40 {
            let rows = next.len();
            let logits = |rng: &mut StdRng| {
                let v: Vec<f32> = (0..rows * vocab)
                    .map(|_| rng.random::<f32>() * 4.0)
                    .collect();
                (Tensor::from_vec(v.clone(), (rows, vocab), &dev).unwrap(), v)
            };
            let (la, va) = logits(&mut rng);
            let (lb, vb) = logits(&mut rng);
            let (lc, _) = logits(&mut rng);
            let seq = |id: u64, sample: Option<SamplingParams>| SeqStep {
                seq_id: id,
                tokens: next.clone(),
                start_pos: pos,
                all_logits: false,
                sample,
            };
            let seqs = [
                seq(1, Some(drawn.clone())),
                seq(2, Some(greedy.clone())),
                seq(3, None),
            ];
            let out = rank.outputs(&seqs, &[la, lb, lc.clone()]).unwrap();
            history.extend_from_slice(&next);
            let last = |v: &[f32]| v[(rows - 1) * vocab..].to_vec();
            let want = reference.sample(&last(&va), &history);
            let want_greedy = argmax_f64(&last(&vb).iter().map(|&x| x as f64).collect::<Vec<_>>());
            match out.as_slice() {
                [StepOutput::Token(a), StepOutput::Token(b), StepOutput::Logits(l)] => {
                    assert_eq!(*a, want, "step {step}: drawn token");
                    assert_eq!(*b, want_greedy, "step {step}: greedy token");
                    let got: Vec<f32> = l.flatten_all().unwrap().to_vec1().unwrap();
                    assert_eq!(got, lc.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                }
                other => panic!("step {step}: outputs {other:?}"),
            }
            pos += next.len();
            next = vec![want];
            if step == 25 {
                // The sequence starts afresh: a new history and a reseeded sampler.
                rank.release(2);
                pos = 0;
                next = vec![11, 12];
                reference = Sampler::new(drawn.clone());
                history.clear();
            }
        }
    }
}
