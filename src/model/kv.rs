//! Per-sequence KV caches. On the CPU a layer's cache grows with the sequence. On a GPU it
//! has a fixed capacity, grown by reallocation in steps of [`GROW`] positions, so its buffers
//! keep their addresses from one decode step to the next and a step can be replayed as a
//! CUDA graph (positions past the sequence are masked out of attention).

use candle_core::{DType, Device, Tensor};
use candle_nn::kv_cache::KvCache;

use crate::error::Result;

/// Positions a fixed cache grows by.
pub(crate) const GROW: usize = 256;

/// How a step writes its keys and values into fixed-capacity caches.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KvWrite<'a> {
    /// From this position on (known on the host).
    At(usize),
    /// At the position held in a device index tensor `[1, kv heads, 1, head_dim]` (a step
    /// replayed as a CUDA graph, whose positions change between replays).
    Indexed(&'a Tensor),
}

/// One layer's keys and values for one sequence.
#[derive(Debug, Clone)]
pub(crate) enum LayerCache {
    /// Grows with the sequence.
    Growing(KvCache),
    /// `[1, kv heads, capacity, head_dim]` each.
    Fixed {
        /// Keys.
        k: Tensor,
        /// Values.
        v: Tensor,
    },
}

impl LayerCache {
    /// A growing cache for one forward of `t` tokens.
    pub(crate) fn growing(t: usize) -> Self {
        LayerCache::Growing(KvCache::new(2, t.max(1)))
    }

    /// Stores `k`, `v` (`[1, kv heads, t, head_dim]`) and returns the keys and values
    /// attention reads: the sequence so far, or for [`KvWrite::Indexed`] the whole capacity.
    pub(crate) fn append(
        &mut self,
        k: &Tensor,
        v: &Tensor,
        write: KvWrite<'_>,
    ) -> Result<(Tensor, Tensor)> {
        match self {
            LayerCache::Growing(c) => Ok(c.append(k, v)?),
            LayerCache::Fixed { k: kc, v: vc } => {
                let (k, v) = (k.contiguous()?, v.contiguous()?);
                match write {
                    KvWrite::At(pos) => {
                        kc.slice_set(&k, 2, pos)?;
                        vc.slice_set(&v, 2, pos)?;
                    }
                    KvWrite::Indexed(idx) => {
                        kc.scatter_set(idx, &k, 2)?;
                        vc.scatter_set(idx, &v, 2)?;
                    }
                }
                Ok(Self::read_views(kc, vc, write, k.dim(2)?)?)
            }
        }
    }

    /// The keys and values of a fixed cache (`None` for a growing one), for kernels that
    /// write a step into them directly; [`Self::fixed_views`] then gives what attention reads.
    pub(crate) fn fixed_parts(&self) -> Option<(&Tensor, &Tensor)> {
        match self {
            LayerCache::Fixed { k, v } => Some((k, v)),
            LayerCache::Growing(_) => None,
        }
    }

    /// What attention reads from a fixed cache after `t` positions were written by `write`:
    /// up to the end of the write, or for [`KvWrite::Indexed`] the whole capacity.
    pub(crate) fn fixed_views(&self, write: KvWrite<'_>, t: usize) -> Result<(Tensor, Tensor)> {
        match self {
            LayerCache::Fixed { k, v } => Self::read_views(k, v, write, t),
            LayerCache::Growing(_) => Err(crate::error::Error::Unsupported {
                what: "fixed views".into(),
                by: "a growing KV cache".into(),
            }),
        }
    }

    fn read_views(
        kc: &Tensor,
        vc: &Tensor,
        write: KvWrite<'_>,
        t: usize,
    ) -> Result<(Tensor, Tensor)> {
        Ok(match write {
            KvWrite::At(pos) => (kc.narrow(2, 0, pos + t)?, vc.narrow(2, 0, pos + t)?),
            KvWrite::Indexed(_) => (kc.clone(), vc.clone()),
        })
    }
}

/// Shape of one layer's fixed cache: local KV heads, head width, dtype.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvShape {
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
}

/// One sequence's caches, every layer, on one rank.
#[derive(Debug)]
pub(crate) struct SeqCache {
    pub layers: Vec<LayerCache>,
    /// Positions stored.
    pub len: usize,
    /// Positions the fixed caches hold (0 for growing caches).
    pub capacity: usize,
    /// Fixed-capacity caches (allocated by [`Self::reserve`]) rather than growing ones.
    fixed: bool,
    /// The decode step of this sequence: its input buffers, and on CUDA its graph.
    pub graph: Option<super::graph::DecodeGraph>,
}

impl SeqCache {
    /// Empty caches for `n_layers` layers: fixed (allocated by [`Self::reserve`]) on a GPU
    /// (where a step's keys and values are written straight into them, and decode steps may be
    /// captured), growing otherwise.
    /// `SHARDWISE_FIXED_KV=1` makes them fixed anywhere, so the CPU tests cover the path the
    /// graphs take (run eagerly there).
    pub(crate) fn new(n_layers: usize, device: &Device) -> Self {
        let fixed = !device.is_cpu() || std::env::var("SHARDWISE_FIXED_KV").is_ok_and(|v| v == "1");
        let layers = if !fixed {
            (0..n_layers).map(|_| LayerCache::growing(GROW)).collect()
        } else {
            Vec::new()
        };
        Self {
            layers,
            len: 0,
            capacity: 0,
            fixed,
            graph: None,
        }
    }

    /// Forgets the stored positions (a sequence starting afresh).
    pub(crate) fn reset(&mut self) {
        self.len = 0;
        for l in &mut self.layers {
            if let LayerCache::Growing(c) = l {
                c.reset();
            }
        }
    }

    /// Makes room for `extra` more positions in fixed caches: reallocates with the next
    /// multiple of [`GROW`] and copies what is stored (a captured graph, which points at the
    /// old buffers, is dropped). Growing caches need nothing.
    pub(crate) fn reserve(
        &mut self,
        n_layers: usize,
        extra: usize,
        shape: KvShape,
        device: &Device,
    ) -> Result<()> {
        let need = self.len + extra;
        if !self.fixed || need <= self.capacity {
            return Ok(());
        }
        let cap = need.div_ceil(GROW) * GROW;
        let dims = (1, shape.kv_heads, cap, shape.head_dim);
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let (k, v) = (
                Tensor::zeros(dims, shape.dtype, device)?,
                Tensor::zeros(dims, shape.dtype, device)?,
            );
            if let Some(LayerCache::Fixed { k: ok, v: ov }) = self.layers.get(i) {
                if self.len > 0 {
                    k.slice_set(&ok.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    v.slice_set(&ov.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
            }
            layers.push(LayerCache::Fixed { k, v });
        }
        self.layers = layers;
        self.capacity = cap;
        self.graph = None;
        Ok(())
    }
}
