//! GPTQ and AWQ 4-bit weights: unpacking their two layouts into dense values.
//!
//! Both store, per linear with weight `[out, in]`, `qweight` (int32 words of eight 4-bit codes),
//! `qzeros` (int32 words of eight 4-bit zero points, `[in / group, out / 8]`) and `scales`
//! (`[in / group, out]`); the value of `(o, i)` is `scale[g, o] * (q[i, o] - zero[g, o])` with
//! `g` the group of input `i`.
//!
//! - GPTQ: `qweight` is `[in / 8, out]`, packed along the input (input `i` in bits
//!   `4 * (i % 8)` of word `i / 8`); zeros packed along the output in the same order; `g_idx`
//!   `[in]` gives each input's group (act-order checkpoints permute them). The original
//!   format (`checkpoint_format` "gptq") stores each zero minus one; "gptq_v2" does not.
//! - AWQ (GEMM): `qweight` is `[in, out / 8]`, packed along the output in the interleaved order
//!   0, 2, 4, 6, 1, 3, 5, 7 (output `8w + ORDER[k]` in bits `4k`); zeros likewise; groups are
//!   consecutive inputs; zeros stored as they are.
//!
//! Loading dequantizes to the compute dtype (see `layers::prequantized`): correct for every
//! split, at the memory of a dense layer.

/// How a checkpoint packs its 4-bit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int4Packing {
    /// GPTQ; `zero_offset` is 1 for the original format (zeros stored minus one), 0 for v2.
    Gptq {
        /// Added to every stored zero point.
        zero_offset: i32,
    },
    /// AWQ GEMM layout.
    Awq,
}

/// Nibble of output column `j % 8` within an AWQ word.
const AWQ_NIBBLE: [u32; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

impl Int4Packing {
    /// Name as in `quant_method`.
    pub fn name(self) -> &'static str {
        match self {
            Int4Packing::Gptq { .. } => "gptq",
            Int4Packing::Awq => "awq",
        }
    }

    /// Bit shift of output column `o` within a word packed along the output.
    pub fn out_shift(self, o: usize) -> u32 {
        match self {
            Int4Packing::Gptq { .. } => 4 * (o % 8) as u32,
            Int4Packing::Awq => 4 * AWQ_NIBBLE[o % 8],
        }
    }

    /// Offset added to a stored zero point.
    pub fn zero_offset(self) -> i32 {
        match self {
            Int4Packing::Gptq { zero_offset } => zero_offset,
            Int4Packing::Awq => 0,
        }
    }
}

/// A window of packed codes: `words` row-major `[rows, cols]`, holding the codes for outputs
/// `out0..out0 + out_len` and inputs `in0..in0 + in_len`.
#[derive(Debug, Clone)]
pub struct QWindow<'a> {
    /// The int32 words.
    pub words: &'a [i32],
    /// Columns of `words`.
    pub cols: usize,
    /// First packed row in the window (GPTQ: input word; AWQ: input).
    pub row0: usize,
    /// First packed column in the window (GPTQ: output; AWQ: output word).
    pub col0: usize,
}

/// Everything but the codes: per-group zero points and scales for all outputs, and the group
/// of every input.
#[derive(Debug, Clone)]
pub struct Int4Groups<'a> {
    /// `qzeros` words `[groups, out / 8]`.
    pub qzeros: &'a [i32],
    /// `scales` `[groups, out]` (f32).
    pub scales: &'a [f32],
    /// Group of each input `[in]`.
    pub g_idx: &'a [usize],
    /// Full output width.
    pub out: usize,
}

/// Dense values `[out_len, in_len]` (row-major, nn.Linear orientation) of outputs
/// `outs` and inputs `ins`.
pub fn dequantize(
    packing: Int4Packing,
    q: &QWindow<'_>,
    g: &Int4Groups<'_>,
    outs: std::ops::Range<usize>,
    ins: std::ops::Range<usize>,
) -> Vec<f32> {
    let in_len = ins.len();
    let mut w = vec![0f32; outs.len() * in_len];
    let zoff = packing.zero_offset();
    let zcols = g.out / 8;
    for (oi, o) in outs.clone().enumerate() {
        let zshift = packing.out_shift(o);
        for (ii, i) in ins.clone().enumerate() {
            let code = match packing {
                Int4Packing::Gptq { .. } => {
                    let word = q.words[(i / 8 - q.row0) * q.cols + (o - q.col0)];
                    (word as u32 >> (4 * (i % 8))) & 0xf
                }
                Int4Packing::Awq => {
                    let word = q.words[(i - q.row0) * q.cols + (o / 8 - q.col0)];
                    (word as u32 >> packing.out_shift(o)) & 0xf
                }
            };
            let grp = g.g_idx[i];
            let zero = ((g.qzeros[grp * zcols + o / 8] as u32 >> zshift) & 0xf) as i32 + zoff;
            w[oi * in_len + ii] = g.scales[grp * g.out + o] * (code as i32 - zero) as f32;
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packs by the formulas, independently of the unpacking above.
    #[test]
    fn awq_and_gptq_unpack_what_was_packed() {
        let (out, inp, group) = (16usize, 16usize, 8usize);
        let code = |i: usize, o: usize| ((i * 7 + o * 3) % 16) as u32;
        let zero = |g: usize, o: usize| ((g * 5 + o) % 15 + 1) as u32;
        let scale = |g: usize, o: usize| 0.5 + (g * out + o) as f32 / 64.0;
        let groups = inp / group;
        let scales: Vec<f32> = (0..groups * out).map(|k| scale(k / out, k % out)).collect();
        let g_idx: Vec<usize> = (0..inp).map(|i| i / group).collect();
        let want: Vec<f32> = (0..out * inp)
            .map(|k| {
                let (o, i) = (k / inp, k % inp);
                scale(i / group, o) * (code(i, o) as f32 - zero(i / group, o) as f32)
            })
            .collect();
        // GPTQ v1: qweight [in/8, out] along the input, zeros minus one along the output.
        let mut qw = vec![0u32; inp / 8 * out];
        for i in 0..inp {
            for o in 0..out {
                qw[(i / 8) * out + o] |= code(i, o) << (4 * (i % 8));
            }
        }
        let mut qz = vec![0u32; groups * out / 8];
        for g in 0..groups {
            for o in 0..out {
                qz[g * out / 8 + o / 8] |= (zero(g, o) - 1) << (4 * (o % 8));
            }
        }
        let qw: Vec<i32> = qw.into_iter().map(|x| x as i32).collect();
        let qz: Vec<i32> = qz.into_iter().map(|x| x as i32).collect();
        let gr = Int4Groups {
            qzeros: &qz,
            scales: &scales,
            g_idx: &g_idx,
            out,
        };
        let win = QWindow {
            words: &qw,
            cols: out,
            row0: 0,
            col0: 0,
        };
        let got = dequantize(
            Int4Packing::Gptq { zero_offset: 1 },
            &win,
            &gr,
            0..out,
            0..inp,
        );
        assert_eq!(got, want);
        // A window of inputs 8..16 (GPTQ words 1..2).
        let win = QWindow {
            words: &qw[out..],
            cols: out,
            row0: 1,
            col0: 0,
        };
        let got = dequantize(Int4Packing::Gptq { zero_offset: 1 }, &win, &gr, 3..5, 8..16);
        let want_part: Vec<f32> = (3..5)
            .flat_map(|o| (8..16).map(move |i| (o, i)))
            .map(|(o, i)| want[o * inp + i])
            .collect();
        assert_eq!(got, want_part);

        // AWQ: qweight [in, out/8], order 0 2 4 6 1 3 5 7 along the output.
        const ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
        let mut qw = vec![0u32; inp * out / 8];
        for i in 0..inp {
            for w in 0..out / 8 {
                for (k, &j) in ORDER.iter().enumerate() {
                    qw[i * out / 8 + w] |= code(i, 8 * w + j) << (4 * k);
                }
            }
        }
        let mut qz = vec![0u32; groups * out / 8];
        for g in 0..groups {
            for w in 0..out / 8 {
                for (k, &j) in ORDER.iter().enumerate() {
                    qz[g * out / 8 + w] |= zero(g, 8 * w + j) << (4 * k);
                }
            }
        }
        let qw: Vec<i32> = qw.into_iter().map(|x| x as i32).collect();
        let qz: Vec<i32> = qz.into_iter().map(|x| x as i32).collect();
        let gr = Int4Groups { qzeros: &qz, ..gr };
        let win = QWindow {
            words: &qw,
            cols: out / 8,
            row0: 0,
            col0: 0,
        };
        assert_eq!(
            dequantize(Int4Packing::Awq, &win, &gr, 0..out, 0..inp),
            want
        );
    }
}
