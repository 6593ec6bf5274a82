//! Rotary position embedding: inverse frequencies with the scalings found in configs
//! (linear, llama3, YaRN), cos/sin tables computed for the positions of each step.

use candle_core::{Device, Tensor};

use super::config::{ModelConfig, RopeScaling};
use crate::error::Result;

/// Rotary tables for one model: inverse frequencies plus the cos/sin multiplier.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
    /// YaRN scales cos and sin; 1 otherwise.
    scale: f64,
    interleaved: bool,
}

impl Rope {
    /// Frequencies for `cfg` (`rope_theta`, `head_dim`, `rope_scaling`).
    pub fn new(cfg: &ModelConfig) -> Self {
        let d = cfg.head_dim;
        let base = cfg.rope_theta;
        let plain: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / d as f64))
            .collect();
        let (inv_freq, scale) = match &cfg.rope_scaling {
            RopeScaling::None => (plain, 1.0),
            RopeScaling::Linear { factor } => (plain.iter().map(|f| f / factor).collect(), 1.0),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => {
                let low_wavelen = original_max_position / low_freq_factor;
                let high_wavelen = original_max_position / high_freq_factor;
                let f = plain
                    .iter()
                    .map(|&inv| {
                        let wavelen = 2.0 * std::f64::consts::PI / inv;
                        if wavelen < high_wavelen {
                            inv
                        } else if wavelen > low_wavelen {
                            inv / factor
                        } else {
                            let smooth = (original_max_position / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * inv / factor + smooth * inv
                        }
                    })
                    .collect();
                (f, 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position,
                beta_fast,
                beta_slow,
                attention_factor,
            } => {
                let dim = d as f64;
                let correction = |rot: f64| {
                    dim * (original_max_position / (rot * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * base.ln())
                };
                let low = correction(*beta_fast).floor().max(0.0);
                let mut high = correction(*beta_slow).ceil().min(dim - 1.0);
                if low == high {
                    high += 0.001;
                }
                let f = plain
                    .iter()
                    .enumerate()
                    .map(|(i, &inv)| {
                        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        (inv / factor) * (1.0 - extrapolation) + inv * extrapolation
                    })
                    .collect();
                (f, *attention_factor)
            }
        };
        Self {
            inv_freq,
            scale,
            interleaved: cfg.rope_interleaved,
        }
    }

    /// `(cos, sin)`, each `[len, head_dim / 2]` f32, for positions `start..start + len`.
    ///
    /// # Errors
    /// Tensor construction errors.
    pub fn tables(&self, start: usize, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let (cos, sin) = self.rows(start, len);
        Ok((
            Tensor::from_vec(cos, (len, half), device)?,
            Tensor::from_vec(sin, (len, half), device)?,
        ))
    }

    /// [`Self::tables`] on the host: `len * head_dim / 2` values each, row by row.
    pub fn rows(&self, start: usize, len: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in start..start + len {
            for &f in &self.inv_freq {
                let a = p as f64 * f;
                cos.push((a.cos() * self.scale) as f32);
                sin.push((a.sin() * self.scale) as f32);
            }
        }
        (cos, sin)
    }

    /// Whether pairs are adjacent elements `(2i, 2i + 1)` rather than halves `(i, i + d/2)`.
    pub fn interleaved(&self) -> bool {
        self.interleaved
    }

    /// Rotates `x` (`[batch, heads, len, head_dim]`) with tables from [`Self::tables`].
    ///
    /// # Errors
    /// Shape mismatches.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let cos = cos.to_dtype(x.dtype())?;
        let sin = sin.to_dtype(x.dtype())?;
        Ok(if self.interleaved {
            candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?
        } else {
            candle_nn::rotary_emb::rope(&x, &cos, &sin)?
        })
    }
}
