//! Which slice of a tensor a rank owns, and how a dimension is split over ranks.
//!
//! [`Shard`] names one rank's slice of one dimension. [`plan_split`] splits a dimension of
//! whole units (elements, heads, KV groups) over any number of ranks so that every boundary
//! is aligned to a quantization block and sizes differ by at most one alignment step: uneven
//! splits are normal, not an error. [`plan_heads`] applies this to attention heads, splitting
//! whole KV groups when there are at least as many KV heads as ranks and replicating KV heads
//! otherwise.

use std::ops::Range;

use candle_core::Tensor;

use crate::error::{Error, Result};

/// One rank's slice of one dimension of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shard {
    /// Even split: rank `rank` of `world_size` equal parts of `dim`. The size must divide.
    Simple {
        /// Dimension being split.
        dim: usize,
        /// This rank.
        rank: usize,
        /// Number of parts.
        world_size: usize,
    },
    /// Explicit slice `offset..offset + len` of `dim` (uneven splits, replicated KV heads).
    Offset {
        /// Dimension being split.
        dim: usize,
        /// First index.
        offset: usize,
        /// Number of indices.
        len: usize,
    },
}

impl Default for Shard {
    /// The whole tensor (one part of one).
    fn default() -> Self {
        Shard::Simple {
            dim: 0,
            rank: 0,
            world_size: 1,
        }
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shard::Simple {
                dim,
                rank,
                world_size,
            } => write!(f, "Simple(dim {dim}, rank {rank} of {world_size})"),
            Shard::Offset { dim, offset, len } => {
                write!(f, "Offset(dim {dim}, {offset}..{})", offset + len)
            }
        }
    }
}

impl Shard {
    /// The whole tensor.
    pub fn full() -> Self {
        Self::default()
    }

    /// A slice given as a range of `dim`.
    pub fn range(dim: usize, range: Range<usize>) -> Self {
        Shard::Offset {
            dim,
            offset: range.start,
            len: range.end - range.start,
        }
    }

    /// The dimension this shard splits.
    pub fn dim(&self) -> usize {
        match self {
            Shard::Simple { dim, .. } | Shard::Offset { dim, .. } => *dim,
        }
    }

    /// Resolves the shard against a dimension of `size` elements: `(offset, len)`.
    ///
    /// # Errors
    /// [`Error::BadShard`] when a `Simple` split does not divide `size`, the rank is out of
    /// range, or an `Offset` slice runs past the end.
    pub fn resolve(&self, size: usize) -> Result<(usize, usize)> {
        let bad = |reason: String| Error::BadShard {
            shard: self.to_string(),
            dim: self.dim(),
            size,
            reason,
        };
        match *self {
            Shard::Simple {
                rank, world_size, ..
            } => {
                if world_size == 0 || rank >= world_size {
                    return Err(bad(format!("rank {rank} is not in 0..{world_size}")));
                }
                if size % world_size != 0 {
                    return Err(bad(format!(
                        "{size} is not divisible by world size {world_size}; use plan_split for uneven splits"
                    )));
                }
                let len = size / world_size;
                Ok((rank * len, len))
            }
            Shard::Offset { offset, len, .. } => {
                if offset.checked_add(len).is_none_or(|end| end > size) {
                    return Err(bad(format!(
                        "slice {offset}..{} is out of range",
                        offset + len
                    )));
                }
                Ok((offset, len))
            }
        }
    }

    /// True when the shard covers the whole dimension of `size`.
    pub fn is_full(&self, size: usize) -> bool {
        matches!(self.resolve(size), Ok((0, len)) if len == size)
    }

    /// The same shard moved to another dimension (e.g. a weight's shard applied to its bias).
    pub fn with_dim(&self, new_dim: usize) -> Self {
        match *self {
            Shard::Simple {
                rank, world_size, ..
            } => Shard::Simple {
                dim: new_dim,
                rank,
                world_size,
            },
            Shard::Offset { offset, len, .. } => Shard::Offset {
                dim: new_dim,
                offset,
                len,
            },
        }
    }

    /// Shape of the sharded tensor, given the full shape.
    ///
    /// # Errors
    /// As [`Shard::resolve`], plus a dimension index beyond the tensor's rank.
    pub fn sharded_shape(&self, full: &[usize]) -> Result<Vec<usize>> {
        let d = self.dim();
        let size = *full.get(d).ok_or_else(|| Error::BadShard {
            shard: self.to_string(),
            dim: d,
            size: 0,
            reason: format!("tensor of shape {full:?} has no dimension {d}"),
        })?;
        let (_, len) = self.resolve(size)?;
        let mut out = full.to_vec();
        out[d] = len;
        Ok(out)
    }

    /// Narrows `t` to this shard (a view; no copy).
    ///
    /// # Errors
    /// As [`Shard::sharded_shape`].
    pub fn apply_to(&self, t: &Tensor) -> Result<Tensor> {
        self.sharded_shape(t.dims())?;
        let (offset, len) = self.resolve(t.dim(self.dim())?)?;
        Ok(t.narrow(self.dim(), offset, len)?)
    }
}

/// What to split: a dimension made of whole `units`, each `unit_elems` elements wide.
#[derive(Debug, Clone)]
pub struct SplitSpec<'a> {
    /// Name used in errors (e.g. `intermediate_size`).
    pub name: &'a str,
    /// Number of indivisible units (elements, heads, KV groups).
    pub units: usize,
    /// Elements per unit (1 for plain elements, `head_dim` for heads, ...).
    pub unit_elems: usize,
    /// Every boundary between ranks must fall on a multiple of this many elements (a quant
    /// block size; 1 for none). The end of the dimension is always a valid boundary.
    pub align: usize,
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Splits a dimension over `world_size` ranks: one contiguous range of units per rank.
///
/// Boundaries between ranks fall on multiples of `align` elements; sizes differ by at most
/// one alignment step (the smallest number of units that is a multiple of `align` elements).
/// Earlier ranks take the larger parts; a last part shorter than a step goes to the last rank.
///
/// # Errors
/// [`Error::NoPlan`] naming the dimension, its size, the world size and the alignment when a
/// rank would be left with nothing.
pub fn plan_split(spec: &SplitSpec<'_>, world_size: usize) -> Result<Vec<Range<usize>>> {
    let no_plan = |reason: String| Error::NoPlan {
        dim: spec.name.to_string(),
        size: spec.units * spec.unit_elems,
        world_size,
        align: spec.align,
        reason,
    };
    if world_size == 0 {
        return Err(no_plan("world size must be at least 1".into()));
    }
    if spec.units == 0 || spec.unit_elems == 0 || spec.align == 0 {
        return Err(no_plan(
            "units, unit size and alignment must be positive".into(),
        ));
    }
    // Smallest whole number of units whose element count is a multiple of `align`.
    let step = spec.align / gcd(spec.unit_elems, spec.align);
    let full_steps = spec.units / step;
    let rest = spec.units % step;
    let base = full_steps / world_size;
    let extra = full_steps % world_size;
    let mut ranges = Vec::with_capacity(world_size);
    let mut start = 0;
    for r in 0..world_size {
        let mut len = (base + usize::from(r < extra)) * step;
        if r + 1 == world_size {
            len += rest;
        }
        if len == 0 {
            return Err(no_plan(format!(
                "only {} aligned step(s) of {step} unit(s) ({} elements each) for {world_size} ranks",
                full_steps + usize::from(rest > 0),
                step * spec.unit_elems
            )));
        }
        ranges.push(start..start + len);
        start += len;
    }
    Ok(ranges)
}

/// One rank's attention heads: its query heads, the KV heads they read, and which local KV
/// head each local query head uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadShard {
    /// Global query heads owned by this rank.
    pub q_heads: Range<usize>,
    /// Global KV heads this rank holds (shared with other ranks when replicated).
    pub kv_heads: Range<usize>,
    /// For each local query head, the index of its KV head among the local KV heads.
    pub kv_of_q: Vec<usize>,
    /// True when some KV head is held by more than one rank.
    pub kv_replicated: bool,
}

impl HeadShard {
    /// Query heads per KV head when uniform on this rank (`None` for a mixed layout, which
    /// happens when replicated KV heads split a group unevenly).
    pub fn uniform_group(&self) -> Option<usize> {
        let n_kv = self.kv_heads.len();
        let n_q = self.q_heads.len();
        if n_kv == 0 || n_q % n_kv != 0 {
            return None;
        }
        let g = n_q / n_kv;
        self.kv_of_q
            .iter()
            .enumerate()
            .all(|(i, &k)| k == i / g)
            .then_some(g)
    }

    /// Shard of a query-projection weight (`[n_heads * head_dim, hidden]`) on `dim`.
    pub fn q_shard(&self, head_dim: usize, dim: usize) -> Shard {
        Shard::range(
            dim,
            self.q_heads.start * head_dim..self.q_heads.end * head_dim,
        )
    }

    /// Shard of a key/value-projection weight (`[n_kv_heads * head_dim, hidden]`) on `dim`.
    pub fn kv_shard(&self, head_dim: usize, dim: usize) -> Shard {
        Shard::range(
            dim,
            self.kv_heads.start * head_dim..self.kv_heads.end * head_dim,
        )
    }
}

/// Splits attention heads over ranks.
///
/// With at least as many KV heads as ranks, whole KV groups are split (9 heads / 3 KV heads
/// over 2 ranks is 6 + 3 heads) and no KV head is duplicated. With more ranks than KV heads,
/// query heads are split and each rank holds the KV heads its query heads read, so KV heads
/// are replicated. `align` is the alignment (in elements) the output projection's input
/// dimension needs, i.e. the quant block size of a row-parallel `o_proj`.
///
/// # Errors
/// [`Error::NoPlan`] when the heads cannot be split (more ranks than heads, a block size the
/// head groups cannot meet), and [`Error::Config`] when `n_heads` is not a multiple of
/// `n_kv_heads`.
pub fn plan_heads(
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    world_size: usize,
    align: usize,
) -> Result<Vec<HeadShard>> {
    if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
        return Err(Error::Config {
            field: "num_key_value_heads".into(),
            reason: format!("{n_kv_heads} does not divide num_attention_heads {n_heads}"),
        });
    }
    let group = n_heads / n_kv_heads;
    let q_ranges: Vec<Range<usize>> = if world_size <= n_kv_heads {
        plan_split(
            &SplitSpec {
                name: "kv groups",
                units: n_kv_heads,
                unit_elems: group * head_dim,
                align,
            },
            world_size,
        )?
        .into_iter()
        .map(|g| g.start * group..g.end * group)
        .collect()
    } else {
        plan_split(
            &SplitSpec {
                name: "attention heads",
                units: n_heads,
                unit_elems: head_dim,
                align,
            },
            world_size,
        )?
    };
    let replicated = world_size > n_kv_heads;
    Ok(q_ranges
        .into_iter()
        .map(|q| {
            let kv = q.start / group..(q.end - 1) / group + 1;
            let kv_of_q = q.clone().map(|h| h / group - kv.start).collect();
            HeadShard {
                q_heads: q,
                kv_heads: kv,
                kv_of_q,
                kv_replicated: replicated,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nine_heads_two_ranks_whole_groups() {
        let p = plan_heads(9, 3, 64, 2, 1).unwrap();
        assert_eq!(p[0].q_heads, 0..6);
        assert_eq!(p[1].q_heads, 6..9);
        assert_eq!(p[0].kv_heads, 0..2);
        assert_eq!(p[1].kv_heads, 2..3);
        assert!(!p[0].kv_replicated);
        assert_eq!(p[0].uniform_group(), Some(3));
    }

    #[test]
    fn nine_heads_four_ranks_replicates_kv() {
        let p = plan_heads(9, 3, 64, 4, 32).unwrap();
        let q: Vec<_> = p.iter().map(|h| h.q_heads.clone()).collect();
        assert_eq!(q, vec![0..3, 3..5, 5..7, 7..9]);
        assert_eq!(p[2].kv_heads, 1..3);
        assert_eq!(p[2].kv_of_q, vec![0, 1]);
        assert!(p[2].kv_replicated);
        assert_eq!(p[2].uniform_group(), Some(1));
    }

    #[test]
    fn simple_not_divisible_is_error() {
        let s = Shard::Simple {
            dim: 0,
            rank: 0,
            world_size: 3,
        };
        let e = s.resolve(10).unwrap_err();
        assert!(matches!(e, Error::BadShard { size: 10, .. }), "{e}");
        assert!(e.to_string().contains("not divisible by world size 3"));
    }

    #[test]
    fn offset_out_of_range_is_error() {
        let s = Shard::Offset {
            dim: 1,
            offset: 8,
            len: 4,
        };
        assert!(s.resolve(10).is_err());
        let t = Tensor::zeros((2, 10), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(s.apply_to(&t).is_err());
        assert!(Shard::Offset {
            dim: 2,
            offset: 0,
            len: 1
        }
        .apply_to(&t)
        .is_err());
    }

    #[test]
    fn impossible_plan_names_everything() {
        let e = plan_split(
            &SplitSpec {
                name: "intermediate_size",
                units: 200,
                unit_elems: 1,
                align: 256,
            },
            3,
        )
        .unwrap_err();
        let msg = e.to_string();
        for needle in ["intermediate_size", "200", "3 ranks", "alignment 256"] {
            assert!(msg.contains(needle), "{msg} lacks {needle}");
        }
        assert!(plan_heads(9, 3, 64, 10, 1).is_err());
    }

    proptest! {
        #[test]
        fn plans_are_contiguous_aligned_balanced(
            units in 1usize..5000, unit_elems in 1usize..130, align_pow in 0u32..9, world in 1usize..9
        ) {
            let align = 1usize << align_pow;
            let spec = SplitSpec { name: "d", units, unit_elems, align };
            let step = align / gcd(unit_elems, align);
            match plan_split(&spec, world) {
                Ok(ranges) => {
                    prop_assert_eq!(ranges.len(), world);
                    prop_assert_eq!(ranges[0].start, 0);
                    prop_assert_eq!(ranges[world - 1].end, units);
                    for w in ranges.windows(2) {
                        prop_assert_eq!(w[0].end, w[1].start);
                    }
                    for r in &ranges {
                        prop_assert!(!r.is_empty());
                        prop_assert_eq!((r.start * unit_elems) % align, 0);
                    }
                    let max = ranges.iter().map(|r| r.len()).max().unwrap();
                    let min = ranges.iter().map(|r| r.len()).min().unwrap();
                    prop_assert!(max - min <= step, "{:?} step {}", ranges, step);
                }
                Err(_) => prop_assert!(units.div_ceil(step) < world),
            }
        }

        #[test]
        fn head_plans_cover_every_head_once(n_kv in 1usize..9, group in 1usize..6, world in 1usize..9) {
            let n_heads = n_kv * group;
            match plan_heads(n_heads, n_kv, 16, world, 1) {
                Ok(plan) => {
                    let mut next = 0;
                    for h in &plan {
                        prop_assert_eq!(h.q_heads.start, next);
                        next = h.q_heads.end;
                        for (i, &k) in h.kv_of_q.iter().enumerate() {
                            prop_assert_eq!(h.kv_heads.start + k, (h.q_heads.start + i) / group);
                        }
                        if world <= n_kv {
                            prop_assert_eq!(h.q_heads.len() % group, 0);
                        }
                    }
                    prop_assert_eq!(next, n_heads);
                }
                Err(_) => prop_assert!(world > n_heads),
            }
        }
    }
}
