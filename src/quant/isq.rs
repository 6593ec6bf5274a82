//! In-situ quantization types and the block-alignment fallback.
//!
//! A rank's shard of a row-parallel layer may have an input width that a quant type's block
//! does not divide (e.g. 9 heads of 64 split 6 + 3 gives 384 and 192 columns: fine for 32-wide
//! blocks, not for 256-wide k-quants). Such a shard takes the nearest type whose block fits,
//! and a warning names the layer, its shape and both types.

use std::str::FromStr;

use candle_core::quantized::GgmlDType;

use crate::error::Error;

/// A type a dense layer can be quantized to after loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsqType {
    /// A GGML block type.
    Ggml(GgmlDType),
    /// F8E4M3 with one f32 scale per 32x32 block ([`super::fp8::ISQ_BLOCK`]).
    Fp8,
}

/// Every GGML block type, in the order users see them listed.
pub const GGML_TYPES: [GgmlDType; 12] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q8_1,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::Q8K,
];

impl IsqType {
    /// Elements per quantization block.
    pub fn block_size(self) -> usize {
        match self {
            IsqType::Ggml(g) => g.block_size(),
            IsqType::Fp8 => super::fp8::ISQ_BLOCK[1],
        }
    }

    /// The nearest type with a smaller block, used when a shard does not align.
    pub fn fallback(self) -> Option<IsqType> {
        use GgmlDType::*;
        let IsqType::Ggml(g) = self else {
            return None;
        };
        let next = match g {
            Q2K | Q3K => Q4_0,
            Q4K => Q4_1,
            Q5K => Q5_1,
            Q6K | Q8K => Q8_0,
            _ => return None,
        };
        Some(IsqType::Ggml(next))
    }

    /// Lower-case name as accepted by [`FromStr`] (`q4k`, `q8_0`).
    pub fn name(self) -> String {
        match self {
            IsqType::Ggml(g) => format!("{g:?}").to_lowercase(),
            IsqType::Fp8 => "fp8".into(),
        }
    }

    /// Every type, in the order users see them listed.
    pub fn all() -> impl Iterator<Item = IsqType> {
        GGML_TYPES
            .iter()
            .map(|&g| IsqType::Ggml(g))
            .chain([IsqType::Fp8])
    }
}

impl std::fmt::Display for IsqType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl FromStr for IsqType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let want = s.to_ascii_lowercase().replace('-', "_");
        IsqType::all()
            .find(|t| t.name() == want || t.name().replace('_', "") == want)
            .ok_or_else(|| Error::Config {
                field: "isq".into(),
                reason: format!(
                    "unknown type `{s}`; expected one of {}",
                    IsqType::all()
                        .map(IsqType::name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }
}

/// The type a shard with `in_dim` input columns actually gets when `wanted` is asked for:
/// `wanted` if its block divides `in_dim`, else the first fallback that does (with a
/// warning), else `None` (the layer stays unquantized, with a warning). FP8 takes any shape
/// (its last blocks may be partial).
pub fn choose(wanted: IsqType, in_dim: usize, layer: &str, out_dim: usize) -> Option<IsqType> {
    if wanted == IsqType::Fp8 {
        return Some(wanted);
    }
    let mut ty = wanted;
    loop {
        if in_dim % ty.block_size() == 0 {
            if ty != wanted {
                tracing::warn!(
                    layer,
                    shape = ?[out_dim, in_dim],
                    "ISQ {wanted} needs {}-aligned rows; this shard uses {ty} instead",
                    wanted.block_size()
                );
            }
            return Some(ty);
        }
        match ty.fallback() {
            Some(next) => ty = next,
            None => {
                tracing::warn!(
                    layer,
                    shape = ?[out_dim, in_dim],
                    "ISQ {wanted}: no block type divides {in_dim} columns; layer stays unquantized"
                );
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_falls_back() {
        let q4k: IsqType = "Q4K".parse().unwrap();
        assert_eq!(q4k, IsqType::Ggml(GgmlDType::Q4K));
        assert_eq!(
            "q8_0".parse::<IsqType>().unwrap(),
            IsqType::Ggml(GgmlDType::Q8_0)
        );
        assert!("q9"
            .parse::<IsqType>()
            .unwrap_err()
            .to_string()
            .contains("q4k"));
        assert_eq!(choose(q4k, 512, "l", 1), Some(q4k));
        assert_eq!(
            choose(q4k, 192, "l", 1),
            Some(IsqType::Ggml(GgmlDType::Q4_1))
        );
        assert_eq!(choose(q4k, 200, "l", 1), None);
    }
}
