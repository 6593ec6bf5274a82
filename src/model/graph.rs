//! A sequence's decode step as a CUDA graph (the capture needs cargo feature `cuda`; without
//! it, or on the CPU, the same step runs eagerly from the same input buffers).
//!
//! A decode step launches about thirty kernels per layer; one at a time, the host's launch
//! cost exceeds the GPU's work. So the step of one token is recorded once and replayed: its
//! inputs (token, rotary rows, mask, cache position) live in device buffers written before
//! each replay, the KV caches have a fixed capacity ([`super::kv`]) and attention reads all
//! of it under a mask, and collectives are captured with the rest (NCCL and the peer-memory
//! all-reduce both keep their state on the device). The first step of a capacity runs
//! eagerly (loading kernels, library workspaces and the shape/stride parameters of strided
//! kernels, none of which a capture may upload), the second is captured and launched, later
//! ones replay. A step that cannot be captured runs eagerly from then on, with a warning.

use candle_core::{DType, Device, Tensor};

use super::kv::KvShape;
#[cfg(feature = "cuda")]
use crate::cuda::driver_err;
use crate::error::Result;

/// Device buffers a captured step reads its inputs from.
#[derive(Debug)]
pub(crate) struct GraphInputs {
    /// Token id, `[1]` u32.
    pub ids: Tensor,
    /// Rotary rows of the position, `[1, head_dim / 2]` each, in the model's dtype.
    pub cos: Tensor,
    /// See `cos`.
    pub sin: Tensor,
    /// Additive mask over the capacity, `[1, capacity]`: 0 where attention may look.
    pub mask: Tensor,
    /// The position, repeated to the shape of one token's keys `[1, kv heads, 1, head_dim]`
    /// (the scatter index of the cache write).
    pub idx: Tensor,
}

/// A captured graph, owned by one sequence's cache.
#[cfg(feature = "cuda")]
struct OwnedGraph(cudarc::driver::CudaGraph);

// SAFETY: CUDA graphs may be used from any thread as long as calls on one graph are
// serialised; `DecodeGraph` only touches it through `&mut self` (the rank's model is
// behind its worker's mutex), so no two threads use it at once.
#[cfg(feature = "cuda")]
unsafe impl Send for OwnedGraph {}
// SAFETY: as above; a shared reference gives no access to the graph.
#[cfg(feature = "cuda")]
unsafe impl Sync for OwnedGraph {}

/// Device buffers a captured step of several sequences (one token each) reads its inputs
/// from.
#[derive(Debug)]
pub(crate) struct BatchInputs {
    /// Token ids, `[b]` u32.
    pub ids: Tensor,
    /// Rotary rows of each sequence's position, `[b, head_dim / 2]` each, in the model's dtype.
    pub cos: Tensor,
    /// See `cos`.
    pub sin: Tensor,
    /// Every layer's descriptor tables (caches, positions, rotary rows of each sequence;
    /// [`crate::layers::fused::layer_table`]), `[layers, b * BATCH_WORDS]` i64.
    pub tables: Tensor,
}

/// One sequence's (or one batch's) captured decode step, reading inputs `I`.
pub(crate) struct DecodeGraph<I = GraphInputs> {
    inputs: I,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    device: Device,
    /// The device's stream (CUDA devices only).
    #[cfg(feature = "cuda")]
    stream: Option<std::sync::Arc<cudarc::driver::CudaStream>>,
    eager_runs: usize,
    /// The replayable step and the logits tensor it writes.
    #[cfg(feature = "cuda")]
    captured: Option<(OwnedGraph, Tensor)>,
    /// Capture failed once, or the device cannot capture: run eagerly.
    eager_only: bool,
}

impl<I> std::fmt::Debug for DecodeGraph<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DecodeGraph(eager runs: {}, eager only: {})",
            self.eager_runs, self.eager_only
        )
    }
}

/// Whether decode steps on CUDA are captured: yes unless `SHARDWISE_CUDA_GRAPH=0` (read at
/// each step). With graphs off, GPU ranks run their steps eagerly, on the same fixed-capacity
/// caches written at host-known positions.
///
/// On by default since the seventh GPU round: an intermittent hang once seen with graphs on
/// (suspected: NCCL calls recorded by a capture that then failed on one rank) did not recur in
/// the GPU suite run whole with graphs on in four calls, and a captured step on one host now
/// holds no NCCL call (the lm_head's all-gather takes the peer kernel too). Should a peer
/// never arrive, the step's deadline still turns it into an error naming the rank.
pub(crate) fn enabled() -> bool {
    std::env::var("SHARDWISE_CUDA_GRAPH").map_or(true, |v| v != "0")
}

impl DecodeGraph<GraphInputs> {
    /// Input buffers for caches of `capacity` positions of `shape`, rotary rows of `half`.
    pub(crate) fn new(
        capacity: usize,
        shape: KvShape,
        half: usize,
        device: &Device,
    ) -> Result<Self> {
        let inputs = GraphInputs {
            ids: Tensor::zeros(1, DType::U32, device)?,
            cos: Tensor::zeros((1, half), shape.dtype, device)?,
            sin: Tensor::zeros((1, half), shape.dtype, device)?,
            mask: Tensor::zeros((1, capacity), shape.dtype, device)?,
            idx: Tensor::zeros((1, shape.kv_heads, 1, shape.head_dim), DType::U32, device)?,
        };
        Ok(Self::with_inputs(inputs, device))
    }

    /// Writes one step's inputs: `token` at `pos`, its rotary rows (`half` values each) and
    /// the mask (`capacity` values, 0 or -inf). On a GPU each goes straight from the host into
    /// its buffer (one asynchronous copy each, no kernels or allocations), so the GPU waits
    /// as little as possible between steps.
    pub(crate) fn set_inputs(
        &self,
        token: u32,
        pos: usize,
        cos: &[f32],
        sin: &[f32],
        mask: Vec<f32>,
    ) -> Result<()> {
        let i = &self.inputs;
        let idx = vec![pos as u32; i.idx.elem_count()];
        #[cfg(feature = "cuda")]
        if i.ids.device().is_cuda() {
            crate::cuda::upload_exact(&i.ids, &[token])?;
            crate::cuda::upload_f32(&i.cos, cos)?;
            crate::cuda::upload_f32(&i.sin, sin)?;
            crate::cuda::upload_f32(&i.mask, &mask)?;
            crate::cuda::upload_exact(&i.idx, &idx)?;
            return Ok(());
        }
        let dev = i.ids.device();
        let put = |dst: &Tensor, src: Tensor| -> Result<()> {
            Ok(dst.slice_set(&src.to_dtype(dst.dtype())?.reshape(dst.shape())?, 0, 0)?)
        };
        put(&i.ids, Tensor::new(&[token], dev)?)?;
        put(&i.cos, Tensor::new(cos, dev)?)?;
        put(&i.sin, Tensor::new(sin, dev)?)?;
        put(&i.mask, Tensor::new(mask, dev)?)?;
        put(&i.idx, Tensor::new(idx, dev)?)?;
        Ok(())
    }
}

impl DecodeGraph<BatchInputs> {
    /// Input buffers for `b` sequences over `layers` layers, rotary rows of `half` values
    /// in `dtype`.
    pub(crate) fn batch(
        b: usize,
        layers: usize,
        half: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let words = b * crate::layers::fused::BATCH_WORDS;
        let inputs = BatchInputs {
            ids: Tensor::zeros(b, DType::U32, device)?,
            cos: Tensor::zeros((b, half), dtype, device)?,
            sin: Tensor::zeros((b, half), dtype, device)?,
            tables: Tensor::zeros((layers, words), DType::I64, device)?,
        };
        Ok(Self::with_inputs(inputs, device))
    }

    /// Writes one step's inputs: each sequence's token and rotary rows (`b * half` values,
    /// row by row) and every layer's tables (`layers * b * BATCH_WORDS` words), each in one
    /// asynchronous copy from the host.
    ///
    /// # Errors
    /// Sizes that do not match the buffers, the driver's errors.
    pub(crate) fn set_batch_inputs(
        &self,
        tokens: &[u32],
        cos: &[f32],
        sin: &[f32],
        tables: &[i64],
    ) -> Result<()> {
        let i = &self.inputs;
        #[cfg(feature = "cuda")]
        {
            crate::cuda::upload_exact(&i.ids, tokens)?;
            crate::cuda::upload_f32(&i.cos, cos)?;
            crate::cuda::upload_f32(&i.sin, sin)?;
            crate::cuda::upload_exact(&i.tables, tables)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (i, tokens, cos, sin, tables);
            Err(crate::error::Error::Unsupported {
                what: "a captured batch step".into(),
                by: "a build without cargo feature `cuda`".into(),
            })
        }
    }
}

impl<I> DecodeGraph<I> {
    /// The buffers the step reads.
    pub(crate) fn inputs(&self) -> &I {
        &self.inputs
    }

    fn with_inputs(inputs: I, device: &Device) -> Self {
        #[cfg(feature = "cuda")]
        let stream = match device {
            Device::Cuda(d) => Some(d.cuda_stream()),
            _ => None,
        };
        Self {
            inputs,
            device: device.clone(),
            #[cfg(feature = "cuda")]
            eager_only: stream.is_none() || !enabled(),
            #[cfg(not(feature = "cuda"))]
            eager_only: true,
            #[cfg(feature = "cuda")]
            stream,
            eager_runs: 0,
            #[cfg(feature = "cuda")]
            captured: None,
        }
    }

    /// Runs the step `body` computes from the inputs: eagerly the first time, captured and
    /// launched the second, replayed after. Returns the logits on the device.
    ///
    /// # Errors
    /// The body's errors, or the driver's when launching.
    pub(crate) fn run(&mut self, mut body: impl FnMut(&I) -> Result<Tensor>) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some((g, out)) = &self.captured {
            g.0.launch()
                .map_err(|e| driver_err("replaying the decode step", e))?;
            return Ok(out.clone());
        }
        if self.eager_only {
            return body(&self.inputs);
        }
        // Kernels whose tensors are strided take their shapes and strides from a small
        // device buffer uploaded per launch; a captured upload would read freed host memory
        // on replay. With candle's parameter cache on, the warm-up run uploads each of
        // those buffers once (kept for the process), and the capture reuses them; a launch
        // that would still upload fails the capture (the step then runs eagerly).
        #[cfg(feature = "cuda")]
        let _params = match &self.device {
            Device::Cuda(d) => Some(d.enable_cuda_graph_htod_cache()),
            _ => None,
        };
        if self.eager_runs == 0 {
            self.eager_runs += 1;
            tracing::debug!("decode graph: warm-up step");
            return body(&self.inputs);
        }
        #[cfg(feature = "cuda")]
        {
            self.capture(body)
        }
        #[cfg(not(feature = "cuda"))]
        {
            body(&self.inputs)
        }
    }

    /// Captures `body` on the device's stream and launches the graph once.
    #[cfg(feature = "cuda")]
    fn capture(&mut self, mut body: impl FnMut(&I) -> Result<Tensor>) -> Result<Tensor> {
        let Some(stream) = self.stream.clone() else {
            return body(&self.inputs);
        };
        tracing::debug!("decode graph: capturing");
        match crate::cuda::capture(&stream, || body(&self.inputs)) {
            Ok((g, out)) => {
                tracing::debug!("decode graph: captured, launching");
                g.launch()
                    .map_err(|e| driver_err("launching the decode step", e))?;
                self.captured = Some((OwnedGraph(g), out.clone()));
                Ok(out)
            }
            Err(why) => {
                tracing::warn!("decode step not captured as a CUDA graph ({why}); running eagerly");
                self.eager_only = true;
                body(&self.inputs)
            }
        }
    }
}
