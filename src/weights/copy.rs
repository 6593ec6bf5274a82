//! Bulk copy of one shard out of a row-major byte buffer.

use std::ops::Range;

/// Byte ranges of `src` that hold a shard, in order: one range per contiguous run.
///
/// `dims` are the tensor's dimensions in storage units of `unit_bytes` each (elements, or
/// quant blocks along the last dimension); the shard is `offset..offset + len` of `dim`.
/// A shard of dimension 0 is one run; a shard of dimension `d` is one run per index of the
/// dimensions before `d`.
pub fn shard_runs(
    dims: &[usize],
    unit_bytes: usize,
    dim: usize,
    offset: usize,
    len: usize,
) -> impl Iterator<Item = Range<usize>> {
    let outer: usize = dims[..dim].iter().product();
    let inner: usize = dims[dim + 1..].iter().product::<usize>() * unit_bytes;
    let stride = dims[dim] * inner;
    let run = len * inner;
    let start = offset * inner;
    (0..outer).map(move |o| o * stride + start..o * stride + start + run)
}

/// Copies a shard out of `src` (see [`shard_runs`]) straight into a typed buffer: one copy
/// per contiguous run, no intermediate byte buffer. `dims` are in elements of `T`.
pub fn copy_shard_typed<T: Copy>(
    src: &[u8],
    dims: &[usize],
    dim: usize,
    offset: usize,
    len: usize,
) -> Vec<T> {
    let unit = std::mem::size_of::<T>();
    let n: usize = dims.iter().product::<usize>() / dims[dim].max(1) * len;
    let mut out: Vec<T> = Vec::with_capacity(n);
    crate::mem::advise_huge(out.as_mut_ptr().cast(), n * unit);
    let dst = out.spare_capacity_mut().as_mut_ptr().cast::<u8>();
    let mut at = 0;
    for r in shard_runs(dims, unit, dim, offset, len) {
        let run = &src[r];
        assert!(
            at + run.len() <= n * unit,
            "shard runs exceed the shard size"
        );
        // SAFETY: `dst` has room for `n * unit` bytes (checked above), the source is a
        // distinct mapping, and every `T` used here is a plain number type for which any
        // bit pattern is a valid value.
        unsafe { std::ptr::copy_nonoverlapping(run.as_ptr(), dst.add(at), run.len()) };
        at += run.len();
    }
    assert_eq!(at, n * unit, "shard runs do not fill the shard");
    // SAFETY: all `n` elements were initialised by the copies above.
    unsafe { out.set_len(n) };
    out
}

/// Copies a shard's bytes out of `src` (see [`shard_runs`]) into one new buffer.
pub fn copy_shard(
    src: &[u8],
    dims: &[usize],
    unit_bytes: usize,
    dim: usize,
    offset: usize,
    len: usize,
) -> Vec<u8> {
    let mut out = Vec::new();
    let runs: Vec<_> = shard_runs(dims, unit_bytes, dim, offset, len).collect();
    out.reserve_exact(runs.iter().map(|r| r.len()).sum());
    for r in runs {
        out.extend_from_slice(&src[r]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn copy_matches_elementwise_slice(
            dims in proptest::collection::vec(1usize..7, 1..4), pick in 0usize..3, a in 0usize..7, b in 0usize..7
        ) {
            let dim = pick % dims.len();
            let (lo, hi) = (a.min(b) % dims[dim], (a.max(b) % dims[dim]) + 1);
            let (offset, len) = (lo, hi.max(lo + 1) - lo);
            prop_assume!(offset + len <= dims[dim]);
            let n: usize = dims.iter().product();
            let src: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let got = copy_shard(&src, &dims, 1, dim, offset, len);
            // Reference: visit every element and keep those inside the slice.
            let mut expected = Vec::new();
            for (i, &v) in src.iter().enumerate() {
                let mut rem = i;
                let mut idx = vec![0; dims.len()];
                for d in (0..dims.len()).rev() {
                    idx[d] = rem % dims[d];
                    rem /= dims[d];
                }
                if idx[dim] >= offset && idx[dim] < offset + len {
                    expected.push(v);
                }
            }
            prop_assert_eq!(got, expected);
        }
    }
}
