//! Text generation and perplexity on a [`Cluster`]: prefill the prompt in one step, then one
//! step per token; sampling, stop conditions and streaming happen here, on the coordinator's
//! side.

use std::time::{Duration, Instant};

use candle_core::DType;

use super::coordinator::Cluster;
use super::messages::StepRequest;
use crate::error::{Error, Result};
use crate::model::{SamplingParams, SeqStep, StepOutput};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Most new tokens.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Tokens that end generation (not emitted).
    pub eos: Vec<u32>,
    /// Longest sequence the model takes (prompt plus new tokens).
    pub context: usize,
}

/// Timings of one generation.
#[derive(Debug, Clone, Default)]
pub struct GenerateStats {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub new_tokens: usize,
    /// Time of the prefill step (prompt in, first logits out).
    pub prefill: Duration,
    /// Time of the decode steps after the first token.
    pub decode: Duration,
    /// Generation stopped on an end-of-sequence token.
    pub hit_eos: bool,
}

impl GenerateStats {
    /// Prompt tokens per second.
    pub fn prefill_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }

    /// Generated tokens per second after the first (each is one decode step).
    pub fn decode_tps(&self) -> f64 {
        self.new_tokens.saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// Generates from `prompt`, calling `on_token` with each new token as it is chosen. Returns
/// the new tokens and timings.
///
/// # Errors
/// An empty prompt, a prompt at or beyond the context length, or any rank failure.
pub async fn generate(
    cluster: &Cluster,
    prompt: &[u32],
    params: &GenerateParams,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, GenerateStats)> {
    if prompt.is_empty() {
        return Err(Error::Config {
            field: "prompt".into(),
            reason: "the prompt has no tokens".into(),
        });
    }
    if prompt.len() >= params.context {
        return Err(Error::Config {
            field: "prompt".into(),
            reason: format!(
                "{} tokens do not fit the model's context of {} (at least one new token is needed)",
                prompt.len(),
                params.context
            ),
        });
    }
    let max_new = params.max_tokens.min(params.context - prompt.len());
    let seq_id = rand::random::<u64>();
    let mut out = Vec::new();
    let mut stats = GenerateStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    let mut next_input = prompt.to_vec();
    let mut pos = 0;
    let t_start = Instant::now();
    let mut t_decode = None;
    while out.len() < max_new {
        let outputs = cluster
            .step_outputs(StepRequest {
                seqs: vec![SeqStep {
                    seq_id,
                    tokens: next_input.clone(),
                    start_pos: pos,
                    all_logits: false,
                    sample: Some(params.sampling.clone()),
                }],
                release: vec![],
            })
            .await?;
        pos += next_input.len();
        // Drawn on the rank that holds the logits (the same sampler and history as here
        // would give the same token; see crate::model::sampling).
        let tok = match outputs.first() {
            Some(StepOutput::Token(t)) => *t,
            _ => {
                return Err(Error::Rank {
                    rank: 0,
                    reason: "the step returned no token".into(),
                })
            }
        };
        if t_decode.is_none() {
            stats.prefill = t_start.elapsed();
            t_decode = Some(Instant::now());
        }
        if params.eos.contains(&tok) {
            stats.hit_eos = true;
            break;
        }
        out.push(tok);
        on_token(tok)?;
        next_input = vec![tok];
    }
    stats.decode = t_decode.map_or(Duration::ZERO, |t| t.elapsed());
    stats.new_tokens = out.len();
    // Free the KV caches on every rank.
    let _ = cluster
        .step(StepRequest {
            seqs: vec![],
            release: vec![seq_id],
        })
        .await;
    Ok((out, stats))
}

/// Perplexity of `tokens` as one sequence: exp of the mean negative log-likelihood of tokens
/// 2..n given their prefix. Returns `(perplexity, tokens scored)`.
///
/// # Errors
/// Fewer than two tokens, more than the context, or any rank failure.
pub async fn perplexity(cluster: &Cluster, tokens: &[u32], context: usize) -> Result<(f64, usize)> {
    if tokens.len() < 2 {
        return Err(Error::Config {
            field: "text".into(),
            reason: format!(
                "perplexity needs at least 2 tokens, the text has {}",
                tokens.len()
            ),
        });
    }
    if tokens.len() > context {
        return Err(Error::Config {
            field: "text".into(),
            reason: format!(
                "{} tokens exceed the model's context of {context}",
                tokens.len()
            ),
        });
    }
    let seq_id = rand::random::<u64>();
    let logits = cluster
        .step(StepRequest {
            seqs: vec![SeqStep {
                seq_id,
                tokens: tokens.to_vec(),
                start_pos: 0,
                all_logits: true,
                sample: None,
            }],
            release: vec![],
        })
        .await?;
    let _ = cluster
        .step(StepRequest {
            seqs: vec![],
            release: vec![seq_id],
        })
        .await;
    let l = logits.first().ok_or_else(|| Error::Rank {
        rank: 0,
        reason: "step returned no logits".into(),
    })?;
    let rows: Vec<Vec<f32>> = l.to_dtype(DType::F32)?.to_vec2()?;
    Ok((perplexity_of(&rows, tokens), tokens.len() - 1))
}

/// `exp(mean over i >= 1 of -log softmax(rows[i - 1])[tokens[i]])`, in f64.
pub fn perplexity_of(rows: &[Vec<f32>], tokens: &[u32]) -> f64 {
    let mut nll = 0.0;
    for i in 1..tokens.len() {
        let r = &rows[i - 1];
        let max = r.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let lse = max + r.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        nll += lse - r[tokens[i] as usize] as f64;
    }
    (nll / (tokens.len() - 1) as f64).exp()
}
