//! The llama-family decoder graph on the parallel layers: embedding (replicated), per layer
//! RMSNorm -> attention (qkv column-parallel, per-rank KV cache, o row-parallel) -> RMSNorm
//! -> SwiGLU MLP, final RMSNorm, lm_head column-parallel over the vocabulary with an
//! all-gather so the logits are whole on every rank.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor, D};

use super::config::ModelConfig;
use super::kv::{KvShape, KvWrite, LayerCache, SeqCache};
use super::rope::Rope;
use super::sampling::StepOutput;
use crate::comm::Communicator;
use crate::error::{Error, LayerContext, Result};
use crate::layers::fused::{
    add_rms_norm_in, batch_words, decode_attention, decode_attention_batch, device_address,
    layer_table, layer_tables, rope_store, rope_store_batch, set_positions, CacheLen, NormIn,
    RopeIn, RopeSeq, SeqTable, StorePos, BATCH_WORDS,
};
use crate::layers::moe::{MoeBlock, MoeImpl};
use crate::layers::{
    AttentionDims, AttentionProjections, LoraSet, Mlp, ParallelLinear, Partial, Piece, Reduce,
};
use crate::quant::{IsqType, QuantConfig};
use crate::shard::{plan_heads, plan_split, Shard, SplitSpec};
use crate::weights::{ExpertView, WeightSource};

/// How to load a checkpoint's weights.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// How linear weights are stored and loaded.
    pub quant: QuantConfig,
    /// Block size of the checkpoint's quantized linears (1 for dense weights): shard
    /// boundaries of row-parallel layers are aligned to it.
    pub block: usize,
    /// LoRA adapters merged at load.
    pub lora: Option<LoraSet>,
    /// In-situ quantization applied to each layer as soon as it is loaded, so no more than
    /// one layer's dense weights exist at a time.
    pub isq: Option<IsqType>,
    /// Draw a progress bar of the layers on stderr (rank 0 on a terminal).
    pub progress: bool,
    /// Expert layout of MoE models.
    pub moe: MoeImpl,
}

/// One sequence's part of a step: tokens at positions `start_pos..start_pos + tokens.len()`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SeqStep {
    /// Caller's id for the sequence; its KV cache lives on every rank under this id.
    pub seq_id: u64,
    /// New tokens (the prompt for a prefill, one token for a decode step).
    pub tokens: Vec<u32>,
    /// Position of the first token; 0 starts the sequence afresh.
    pub start_pos: usize,
    /// Return logits for every new token, not only the last (perplexity).
    pub all_logits: bool,
    /// Draw the next token on the rank with these parameters and return it instead of the
    /// logits (see `sampling::SeqSamplers`: the sequence's own sampler, the tokens it
    /// was fed as history).
    pub sample: Option<super::SamplingParams>,
}

/// A layer's feed-forward block.
// One per layer, built once and never moved in the step: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
enum FeedForward {
    /// SwiGLU MLP.
    Dense(Mlp),
    /// Sparse mixture of experts.
    Moe(Box<MoeBlock>),
}

impl FeedForward {
    fn move_to(&mut self, device: &Device) -> Result<()> {
        match self {
            FeedForward::Dense(m) => m.move_to(device),
            FeedForward::Moe(m) => m.move_to(device),
        }
    }

    /// The block of the normed input `n`: `(residual sum, output)`, the output possibly
    /// still owing its all-reduce.
    fn forward_normed(&self, n: NormIn<'_>) -> Result<(Tensor, Partial<'_>)> {
        match self {
            FeedForward::Dense(m) => m.forward_normed(n),
            FeedForward::Moe(m) => {
                let (x, h) = add_rms_norm_in(n)?;
                Ok((x, Partial::done(m.forward(&h)?)))
            }
        }
    }

    fn linears(&self) -> Vec<&ParallelLinear> {
        match self {
            FeedForward::Dense(m) => vec![&m.gate_up, &m.down],
            FeedForward::Moe(m) => m.linears(),
        }
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_norm: Tensor,
    attn: AttentionProjections,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    post_norm: Tensor,
    ffn: FeedForward,
}

/// This rank's shard of a decoder-only model, plus its KV caches.
#[derive(Debug)]
pub struct Model {
    cfg: ModelConfig,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: ParallelLinear,
    rope: Rope,
    dtype: DType,
    device: Device,
    /// This rank (for errors of the GPU step deadline).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    rank: usize,
    caches: HashMap<u64, SeqCache>,
    /// The captured step of the last batch of sequences decoded together (CUDA graphs on).
    batch_graph: Option<BatchGraph>,
    /// A batch the fused kernels were found not to serve (its [`BatchGraph::key`]): it runs
    /// eagerly without being looked at again.
    batch_unserved: Option<Vec<(u64, usize, Option<u64>)>>,
    /// Sampling state of the sequences this rank draws tokens for.
    samplers: super::sampling::SeqSamplers,
}

/// A captured decode step of several sequences, one token each, with what it was captured
/// for: the sequences, their caches' capacities and addresses (a batch of other sequences,
/// or a cache reallocated, needs a new capture) and the descriptor tables it reads, of which
/// only the positions change between steps.
#[derive(Debug)]
struct BatchGraph {
    key: Vec<(u64, usize, Option<u64>)>,
    graph: super::graph::DecodeGraph<super::graph::BatchInputs>,
    tables: Vec<i64>,
}

/// The lm_head's vocabulary rows on `rank` (uneven when ranks do not divide the vocabulary).
///
/// # Errors
/// More ranks than vocabulary rows.
pub fn vocab_range(vocab: usize, rank: usize, world: usize) -> Result<Range<usize>> {
    let plan = plan_split(
        &SplitSpec {
            name: "vocab_size",
            units: vocab,
            unit_elems: 1,
            align: 1,
        },
        world,
    )?;
    Ok(plan[rank].clone())
}

impl Model {
    /// Loads this rank's shard (rank and world size come from `comm`).
    ///
    /// # Errors
    /// Missing or mis-shaped tensors, heads or widths that cannot be split; errors name the
    /// tensor or layer.
    pub fn load(
        cfg: &ModelConfig,
        src: &dyn WeightSource,
        opts: &LoadOptions,
        comm: Arc<dyn Communicator>,
    ) -> Result<Self> {
        let dtype = opts.quant.dtype();
        // Weights are read on the CPU and moved, a layer at a time, to the rank's device.
        let device = comm.device();
        // MoE experts appear under per-expert names whatever the checkpoint's layout.
        let view = ExpertView::new(src, cfg)?;
        let src: &dyn WeightSource = &view;
        let h = cfg.hidden_size;
        let read_full = |name: &str, shape: &[usize]| -> Result<Tensor> {
            src.read_expect(name, shape, &Shard::full(), dtype)
        };
        let embed = read_full("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let dims = AttentionDims {
            hidden: h,
            n_heads: cfg.num_heads,
            n_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            qkv_bias: cfg.qkv_bias,
            o_bias: cfg.o_bias,
        };
        let lora = opts.lora.as_ref();
        // Each split keeps the largest block alignment it can: the format's block, else the
        // 32-element block of the legacy GGML types (ISQ falls back to those), else none,
        // where pieces load dense.
        let world = comm.world_size();
        let choose = |ok: &dyn Fn(usize) -> bool| {
            [opts.block, 32, 1]
                .into_iter()
                .filter(|&a| a <= opts.block.max(1))
                .find(|&a| ok(a))
                .unwrap_or(1)
        };
        let attn_align = choose(&|a| {
            plan_heads(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, world, a).is_ok()
        });
        let width_align = |units: usize| {
            choose(&|a| {
                plan_split(
                    &SplitSpec {
                        name: "intermediate_size",
                        units,
                        unit_elems: 1,
                        align: a,
                    },
                    world,
                )
                .is_ok()
            })
        };
        let mlp_align = width_align(cfg.intermediate_size);
        let expert_align = cfg
            .moe
            .as_ref()
            .map_or(1, |m| width_align(m.expert_intermediate));
        if opts.block > 1
            && (attn_align == 1 || mlp_align == 1 || (cfg.moe.is_some() && expert_align == 1))
        {
            tracing::warn!(
                "{world} ranks cannot split attention ({attn_align}) and MLP ({mlp_align}) on \
                 {}-element blocks; pieces cut inside a block load dense",
                opts.block
            );
        }
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let norm = |n: &str, len: usize| read_full(&format!("{p}.{n}.weight"), &[len]);
            let attn = AttentionProjections::load(
                &format!("{p}.self_attn"),
                dims,
                &opts.quant,
                src,
                comm.clone(),
                attn_align,
                lora,
            )?;
            let (q_norm, k_norm) = if cfg.qk_norm {
                (
                    Some(norm("self_attn.q_norm", cfg.head_dim)?),
                    Some(norm("self_attn.k_norm", cfg.head_dim)?),
                )
            } else {
                (None, None)
            };
            let ffn = match &cfg.moe {
                Some(moe) if cfg.is_moe_layer(i) => FeedForward::Moe(Box::new(MoeBlock::load(
                    &format!("{p}.{}", moe.prefix),
                    h,
                    moe,
                    opts.moe,
                    &opts.quant,
                    src,
                    comm.clone(),
                    expert_align,
                )?)),
                _ => FeedForward::Dense(Mlp::load(
                    &format!("{p}.mlp"),
                    h,
                    cfg.intermediate_size,
                    &opts.quant,
                    src,
                    comm.clone(),
                    mlp_align,
                    lora,
                )?),
            };
            let mut layer = DecoderLayer {
                input_norm: norm("input_layernorm", h)?,
                attn,
                q_norm,
                k_norm,
                post_norm: norm("post_attention_layernorm", h)?,
                ffn,
            };
            if let Some(ty) = opts.isq {
                layer.apply_isq(ty, &[])?;
            }
            if !device.is_cpu() {
                layer
                    .move_to(&device)
                    .in_layer(&format!("model.layers.{i}"))?;
            }
            layers.push(layer);
            if opts.progress {
                progress_bar(i + 1, cfg.num_layers, opts.isq);
            }
        }
        let norm = read_full("model.norm.weight", &[h])?;
        let head_name = if cfg.tie_word_embeddings || !src.contains("lm_head.weight") {
            "model.embed_tokens"
        } else {
            "lm_head"
        };
        let rows = vocab_range(cfg.vocab_size, comm.rank(), comm.world_size())?;
        let mut lm_head = ParallelLinear::load(
            "lm_head",
            &opts.quant,
            src,
            &[Piece::new(
                head_name,
                cfg.vocab_size,
                h,
                Shard::range(0, rows),
            )],
            false,
            Reduce::AllGather,
            comm.clone(),
        )?
        .with_gather_sizes(
            (0..comm.world_size())
                .map(|r| vocab_range(cfg.vocab_size, r, comm.world_size()).map(|v| v.len()))
                .collect::<Result<Vec<_>>>()?,
        );
        if !device.is_cpu() {
            lm_head.move_to(&device)?;
        }
        Ok(Self {
            cfg: cfg.clone(),
            embed: embed.to_device(&device)?,
            layers,
            norm: norm.to_device(&device)?,
            lm_head,
            rope: Rope::new(cfg),
            dtype,
            device,
            rank: comm.rank(),
            caches: HashMap::new(),
            batch_graph: None,
            batch_unserved: None,
            samplers: Default::default(),
        })
    }

    /// The configuration this model was loaded with.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The device this rank's shard lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs one step for each sequence; returns per sequence its drawn token (when it asked,
    /// [`SeqStep::sample`]) or its `[n, vocab]` f32 logits on the host (`n` = 1, or every new
    /// token when `all_logits`).
    ///
    /// # Errors
    /// A position that does not continue the sequence's cache, a context overflow, kernel or
    /// collective errors.
    pub fn step(&mut self, seqs: &[SeqStep]) -> Result<Vec<StepOutput>> {
        if self.batchable(seqs) {
            let logits = self.decode_batch(seqs)?;
            self.await_step()?;
            let rows = (0..seqs.len())
                .map(|b| Ok(logits.narrow(0, b, 1)?))
                .collect::<Result<Vec<_>>>()?;
            return self.samplers.outputs(seqs, &rows);
        }
        let mut out = Vec::with_capacity(seqs.len());
        for s in seqs {
            // Each sequence's outputs are taken before the next runs: a captured step writes
            // its logits into the same buffer at every replay.
            let l = self.forward_seq(s)?;
            self.await_step()?;
            out.extend(self.samplers.outputs(std::slice::from_ref(s), &[l])?);
        }
        Ok(out)
    }

    /// [`Self::step`] on a rank that returns nothing: the step runs and its work is awaited
    /// (within the deadline), and no logits leave the device.
    ///
    /// # Errors
    /// As [`Self::step`].
    pub fn advance(&mut self, seqs: &[SeqStep]) -> Result<()> {
        if self.batchable(seqs) {
            self.decode_batch(seqs)?;
        } else {
            for s in seqs {
                self.forward_seq(s)?;
            }
        }
        self.await_step()
    }

    /// Whether `seqs` run as one batch: several distinct sequences of one token each.
    fn batchable(&self, seqs: &[SeqStep]) -> bool {
        let ids: std::collections::HashSet<u64> = seqs.iter().map(|s| s.seq_id).collect();
        seqs.len() > 1 && ids.len() == seqs.len() && seqs.iter().all(|s| s.tokens.len() == 1)
    }

    /// Drops a sequence's KV cache.
    pub fn release(&mut self, seq_id: u64) {
        self.caches.remove(&seq_id);
        self.samplers.release(seq_id);
        if self
            .batch_graph
            .as_ref()
            .is_some_and(|g| g.key.iter().any(|k| k.0 == seq_id))
        {
            self.batch_graph = None;
        }
    }

    /// Checks `s` against the model and its sequence's cache, and takes that cache out of
    /// the map (a new one for a new sequence); on error the cache stays where it was.
    fn take_cache(&mut self, s: &SeqStep) -> Result<SeqCache> {
        let t = s.tokens.len();
        if t == 0 {
            return Err(Error::Config {
                field: "tokens".into(),
                reason: format!("sequence {} has no tokens in this step", s.seq_id),
            });
        }
        let end = s.start_pos + t;
        if end > self.cfg.max_position_embeddings {
            return Err(Error::Config {
                field: "max_position_embeddings".into(),
                reason: format!(
                    "sequence {} would reach {end} tokens; the model's context is {}",
                    s.seq_id, self.cfg.max_position_embeddings
                ),
            });
        }
        if let Some(&bad) = s
            .tokens
            .iter()
            .find(|&&id| id as usize >= self.cfg.vocab_size)
        {
            return Err(Error::Config {
                field: "tokens".into(),
                reason: format!(
                    "token id {bad} is outside the vocabulary of {}",
                    self.cfg.vocab_size
                ),
            });
        }
        let n_layers = self.layers.len();
        let mut cache = self
            .caches
            .remove(&s.seq_id)
            .unwrap_or_else(|| SeqCache::new(n_layers, &self.device));
        if s.start_pos == 0 {
            cache.reset();
        }
        if cache.len != s.start_pos {
            let cached = cache.len;
            self.caches.insert(s.seq_id, cache);
            return Err(Error::Config {
                field: "start_pos".into(),
                reason: format!(
                    "sequence {} has {cached} cached positions, the step starts at {}",
                    s.seq_id, s.start_pos
                ),
            });
        }
        Ok(cache)
    }

    fn forward_seq(&mut self, s: &SeqStep) -> Result<Tensor> {
        let t = s.tokens.len();
        let mut cache = self.take_cache(s)?;
        let out = self.run_seq(s, &mut cache);
        if out.is_ok() {
            cache.len += t;
        }
        // A failed step leaves the cache as it was before it (positions past `len` are
        // never read).
        self.caches.insert(s.seq_id, cache);
        out
    }

    /// Awaits the step's work on a GPU within a deadline (`SHARDWISE_GPU_STEP_DEADLINE_MS`,
    /// default 240 s, under the coordinator's 300 s) before anything is copied from it: a
    /// collective whose peer never arrives (NCCL has no timeout of its own) becomes an error of
    /// this rank instead of a thread blocked in a copy forever. Nothing to await elsewhere.
    fn await_step(&self) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = &self.device {
            let ms = crate::comm::env_usize("SHARDWISE_GPU_STEP_DEADLINE_MS", 240_000);
            let deadline = std::time::Duration::from_millis(ms as u64);
            if !crate::cuda::wait_for(&d.cuda_stream(), deadline)? {
                return Err(Error::Rank {
                    rank: self.rank,
                    reason: format!(
                        "the step's GPU work did not finish within {ms} ms: a collective's peer \
                         rank never arrived (gone or stuck), or a kernel hangs"
                    ),
                });
            }
        }
        Ok(())
    }

    /// One decode token for each of several sequences in one forward: the projections and
    /// feed-forward blocks multiply every sequence's row at once (weights read once, one
    /// all-reduce per block for the batch); attention runs per sequence on its own cache.
    fn decode_batch(&mut self, seqs: &[SeqStep]) -> Result<Tensor> {
        let mut taken: Vec<(u64, SeqCache)> = Vec::with_capacity(seqs.len());
        for s in seqs {
            match self.take_cache(s) {
                Ok(c) => taken.push((s.seq_id, c)),
                Err(e) => {
                    for (id, c) in taken {
                        self.caches.insert(id, c);
                    }
                    return Err(e);
                }
            }
        }
        let mut caches: Vec<SeqCache> = taken.into_iter().map(|(_, c)| c).collect();
        let out = match self.run_batch_graphed(seqs, &mut caches) {
            Ok(Some(out)) => Ok(out),
            Ok(None) => self.run_batch(seqs, &mut caches),
            Err(e) => Err(e),
        };
        for (s, mut c) in seqs.iter().zip(caches) {
            if out.is_ok() {
                c.len += 1;
            }
            self.caches.insert(s.seq_id, c);
        }
        out
    }

    /// [`Self::decode_batch`]'s forward: `[batch, vocab]` f32 logits on this rank's device.
    fn run_batch(&self, seqs: &[SeqStep], caches: &mut [SeqCache]) -> Result<Tensor> {
        let shape = self.kv_shape();
        let mut ctxs = Vec::with_capacity(seqs.len());
        for (s, c) in seqs.iter().zip(caches.iter_mut()) {
            c.reserve(self.layers.len(), 1, shape, &self.device)?;
            ctxs.push(StepCtx::new(
                &self.rope,
                &self.cfg,
                s.start_pos,
                1,
                self.dtype,
                &self.device,
            )?);
        }
        let ids: Vec<u32> = seqs.iter().map(|s| s.tokens[0]).collect();
        let ids = Tensor::new(ids.as_slice(), &self.device)?;
        self.batch_forward(&ids, caches, |i, layer, qkv, caches| {
            let mut per_seq: Vec<&mut LayerCache> =
                caches.iter_mut().map(|c| &mut c.layers[i]).collect();
            layer.attention_batch(qkv, &ctxs, &mut per_seq)
        })
    }

    /// A batch step's forward, one token per sequence (`ids`: `[batch]`): embedding, every
    /// layer with `attention` giving layer `i`'s attention output from its q/k/v product, the
    /// final norm and head; `[batch, vocab]` f32 logits. Eager and captured batch steps differ
    /// only in their attention.
    fn batch_forward(
        &self,
        ids: &Tensor,
        caches: &mut [SeqCache],
        mut attention: impl FnMut(
            usize,
            &DecoderLayer,
            &(Tensor, Tensor, Tensor),
            &mut [SeqCache],
        ) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps as f32;
        let mut x = self.embed.index_select(ids, 0)?.unsqueeze(1)?;
        let mut pending = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let (nx, f) = layer
                .forward_with(&x, pending.as_ref(), eps, |n| {
                    let (x, qkv) = layer.attn.qkv_normed(n)?;
                    Ok((x, attention(i, layer, &qkv, &mut *caches)?))
                })
                .in_layer(&format!("model.layers.{i}"))?;
            (x, pending) = (nx, Some(f));
        }
        let x = x.squeeze(1)?;
        let pending = pending.map(|p| p.map(|y| Ok(y.squeeze(1)?))).transpose()?;
        self.head(&x, pending.as_ref(), eps)
    }

    /// [`Self::decode_batch`]'s forward replayed as a CUDA graph of this batch of sequences
    /// (see [`super::graph`]): with graphs on, where every sequence has fixed caches and the
    /// fused rotary and attention kernels serve them, reading each sequence's position, rows
    /// and caches from device tables written before each replay. `None` (nothing done) where
    /// that does not serve: the eager batch runs. A batch of other sequences than the last
    /// one's is captured anew (after one eager warm-up step).
    fn run_batch_graphed(
        &mut self,
        seqs: &[SeqStep],
        caches: &mut [SeqCache],
    ) -> Result<Option<Tensor>> {
        let serves = super::graph::enabled()
            && self.device.is_cuda()
            && self.graphable()
            && self.layers.iter().all(|l| l.q_norm.is_none());
        if !serves {
            return Ok(None);
        }
        let (b, n_layers, shape) = (seqs.len(), self.layers.len(), self.kv_shape());
        for c in caches.iter_mut() {
            c.reserve(n_layers, 1, shape, &self.device)?;
        }
        let key: Vec<(u64, usize, Option<u64>)> = seqs
            .iter()
            .zip(caches.iter())
            .map(|(s, c)| {
                let first = c.layers.first().and_then(LayerCache::fixed_parts);
                let addr = first.map(|(k, _)| device_address(k));
                Ok((s.seq_id, c.capacity, addr.transpose()?.flatten()))
            })
            .collect::<Result<_>>()?;
        if key.iter().any(|k| k.1 == 0 || k.2.is_none()) {
            return Ok(None);
        }
        if self.batch_unserved.as_ref() == Some(&key) {
            return Ok(None);
        }
        let mut bg = match self.batch_graph.take() {
            Some(g) if g.key == key => g,
            _ => match self.new_batch_graph(key.clone(), caches)? {
                Some(g) => g,
                None => {
                    self.batch_unserved = Some(key);
                    return Ok(None);
                }
            },
        };
        let half = self.cfg.head_dim / 2;
        let (mut cos, mut sin) = (Vec::with_capacity(b * half), Vec::with_capacity(b * half));
        for s in seqs {
            let (c, sn) = self.rope.rows(s.start_pos, 1);
            cos.extend(c);
            sin.extend(sn);
        }
        let positions: Vec<usize> = seqs.iter().map(|s| s.start_pos).collect();
        for table in bg.tables.chunks_mut(b * BATCH_WORDS) {
            set_positions(table, &positions);
        }
        let ids: Vec<u32> = seqs.iter().map(|s| s.tokens[0]).collect();
        bg.graph.set_batch_inputs(&ids, &cos, &sin, &bg.tables)?;
        let out = bg.graph.run(|inputs| self.batch_body(inputs, caches));
        self.batch_graph = Some(bg);
        out.map(Some)
    }

    /// A batch graph for the sequences of `caches` (reserved), with their descriptor tables;
    /// `None` where the fused kernels do not serve them.
    fn new_batch_graph(
        &self,
        key: Vec<(u64, usize, Option<u64>)>,
        caches: &[SeqCache],
    ) -> Result<Option<BatchGraph>> {
        let (b, half) = (caches.len(), self.cfg.head_dim / 2);
        let graph =
            super::graph::DecodeGraph::batch(b, self.layers.len(), half, self.dtype, &self.device)?;
        let rows = batch_rows(graph.inputs())?;
        let interleaved = self.rope.interleaved();
        let mut tables = Vec::with_capacity(self.layers.len() * b * BATCH_WORDS);
        for l in 0..self.layers.len() {
            let mut words = Vec::with_capacity(b);
            for (c, (cos, sin)) in caches.iter().zip(&rows) {
                let Some((kc, vc)) = c.layers.get(l).and_then(LayerCache::fixed_parts) else {
                    return Ok(None);
                };
                let seq = RopeSeq {
                    cos_sin: [cos, sin],
                    caches: [kc, vc],
                    pos: 0,
                };
                match batch_words(&seq, interleaved)? {
                    Some(w) => words.push(w),
                    None => return Ok(None),
                }
            }
            tables.extend(layer_table(&words));
        }
        Ok(Some(BatchGraph { key, graph, tables }))
    }

    /// A captured batch step's forward from its input buffers: `[batch, vocab]` f32 logits.
    fn batch_body(
        &self,
        inputs: &super::graph::BatchInputs,
        caches: &mut [SeqCache],
    ) -> Result<Tensor> {
        let b = caches.len();
        let rows = batch_rows(inputs)?;
        let base = device_address(&inputs.tables)?.ok_or_else(|| Error::Unsupported {
            what: "a captured batch step".into(),
            by: "a device without CUDA".into(),
        })?;
        let rope = (self.rope.interleaved(), self.cfg.sliding_window);
        self.batch_forward(&inputs.ids, caches, |i, layer, qkv, caches| {
            let per_seq: Vec<&LayerCache> = caches.iter().map(|c| &c.layers[i]).collect();
            let at = base + (i * b * BATCH_WORDS * 8) as u64;
            layer.attention_table(qkv, &per_seq, &rows, at, rope)
        })
    }

    /// Shape of this rank's fixed KV caches.
    fn kv_shape(&self) -> KvShape {
        let a = self
            .layers
            .first()
            .map(|l| (l.attn.heads.kv_heads.len(), l.attn.dims.head_dim));
        let (kv_heads, head_dim) = a.unwrap_or((0, self.cfg.head_dim));
        KvShape {
            kv_heads,
            head_dim,
            dtype: self.dtype,
        }
    }

    /// One step of one sequence on its caches; f32 logits on this rank's device.
    fn run_seq(&self, s: &SeqStep, cache: &mut SeqCache) -> Result<Tensor> {
        let t = s.tokens.len();
        cache.reserve(self.layers.len(), t, self.kv_shape(), &self.device)?;
        // Fixed caches on a GPU take the graph path only when graphs are on; on the CPU they
        // exist only for tests of that path (`SHARDWISE_FIXED_KV=1`).
        let graph_path = super::graph::enabled() || self.device.is_cpu();
        if t == 1 && cache.capacity > 0 && self.graphable() && graph_path {
            return self.run_graphed(s, cache);
        }
        let ids = Tensor::new(s.tokens.as_slice(), &self.device)?;
        let ctx = StepCtx::new(
            &self.rope,
            &self.cfg,
            s.start_pos,
            t,
            self.dtype,
            &self.device,
        )?;
        self.body(&ids, &ctx, &mut cache.layers, s.all_logits)
    }

    /// Embedding, layers, norm and head: the whole step, eager or captured.
    fn body(
        &self,
        ids: &Tensor,
        ctx: &StepCtx<'_>,
        caches: &mut [LayerCache],
        all_logits: bool,
    ) -> Result<Tensor> {
        let t = ids.dim(0)?;
        let mut x = self.embed.index_select(ids, 0)?.unsqueeze(0)?;
        let mut pending = None;
        for (i, (layer, cache)) in self.layers.iter().zip(caches.iter_mut()).enumerate() {
            let (nx, f) = layer
                .forward(&x, pending.as_ref(), ctx, cache)
                .in_layer(&format!("model.layers.{i}"))?;
            (x, pending) = (nx, Some(f));
        }
        // The norm is per row: the rows whose logits are wanted are picked first.
        let rows = |x: &Tensor| -> Result<Tensor> {
            Ok(if all_logits {
                x.i(0)?
            } else {
                x.i((0, t - 1..t))?
            })
        };
        let pending = pending.map(|p| p.map(rows)).transpose()?;
        self.head(&rows(&x)?, pending.as_ref(), ctx.eps)
    }

    /// Final norm of `x + pending` and the lm_head: f32 logits.
    fn head(&self, x: &Tensor, pending: Option<&Partial<'_>>, eps: f32) -> Result<Tensor> {
        let n = Partial::norm_in(pending, x, &self.norm, eps);
        let (_, logits) = self.lm_head.forward_normed(n, false)?;
        Ok(logits.to_dtype(DType::F32)?)
    }

    /// Whether a decode step can be captured: MoE routing reads the router's choices on the
    /// host, and a rank whose query heads straddle KV groups gathers them with an index
    /// uploaded per step.
    fn graphable(&self) -> bool {
        self.layers.iter().all(|l| {
            matches!(l.ffn, FeedForward::Dense(_)) && l.attn.heads.uniform_group().is_some()
        })
    }

    /// A decode step from the sequence's input buffers: through its CUDA graph on a GPU (see
    /// [`super::graph`]), eagerly elsewhere (fixed caches on the CPU, for tests).
    fn run_graphed(&self, s: &SeqStep, cache: &mut SeqCache) -> Result<Tensor> {
        let pos = s.start_pos;
        let shape = self.kv_shape();
        let half = self.cfg.head_dim / 2;
        let mut graph = match cache.graph.take() {
            Some(g) => g,
            None => super::graph::DecodeGraph::new(cache.capacity, shape, half, &self.device)?,
        };
        let (cos, sin) = self.rope.rows(pos, 1);
        let window = self.cfg.sliding_window;
        let mask = (0..cache.capacity)
            .map(|j| {
                let visible = j <= pos && window.is_none_or(|w| pos - j < w);
                if visible {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        graph.set_inputs(s.tokens[0], pos, &cos, &sin, mask)?;
        // The body writes the caches through the scatter index only, so it can be replayed.
        let layers = &mut cache.layers;
        let out = graph.run(|inputs| {
            let ctx = StepCtx {
                rope: &self.rope,
                cos: inputs.cos.clone(),
                sin: inputs.sin.clone(),
                mask: Some(inputs.mask.clone()),
                window: self.cfg.sliding_window,
                eps: self.cfg.rms_norm_eps as f32,
                write: KvWrite::Indexed(&inputs.idx),
            };
            self.body(&inputs.ids, &ctx, layers, false)
        });
        cache.graph = Some(graph);
        out
    }

    /// Runs decoder layers `layers` on hidden states `x` (`[1, t, hidden]`, positions from 0,
    /// no cache kept): the per-layer `Forward` of tests and tools.
    ///
    /// # Errors
    /// An out-of-range layer, kernel or collective errors.
    pub fn forward_layers(&self, layers: Range<usize>, x: &Tensor) -> Result<Tensor> {
        if layers.end > self.layers.len() || layers.start > layers.end {
            return Err(Error::Config {
                field: "layers".into(),
                reason: format!("{layers:?} is outside 0..{}", self.layers.len()),
            });
        }
        let t = x.dim(1)?;
        let ctx = StepCtx::new(&self.rope, &self.cfg, 0, t, self.dtype, &self.device)?;
        let mut x = x.to_device(&self.device)?.to_dtype(self.dtype)?;
        for i in layers {
            let mut cache = LayerCache::growing(t);
            let (nx, f) = self.layers[i]
                .forward(&x, None, &ctx, &mut cache)
                .in_layer(&format!("model.layers.{i}"))?;
            x = (nx + f.settle()?)?;
        }
        Ok(x.to_device(&Device::Cpu)?)
    }

    /// Quantizes every linear layer whose name contains one of `filter` (all when empty),
    /// except the lm_head, which stays as loaded. Returns how many layers were quantized.
    ///
    /// # Errors
    /// Kernel errors, naming the layer.
    pub fn apply_isq(&mut self, ty: IsqType, filter: &[String]) -> Result<usize> {
        use rayon::prelude::*;
        // Layers in parallel over the CPU threads; each holds one dense and one quantized
        // copy of a layer at a time.
        let counts = self
            .layers
            .par_iter_mut()
            .map(|l| l.apply_isq(ty, filter))
            .collect::<Result<Vec<_>>>()?;
        Ok(counts.into_iter().sum())
    }

    /// True when MoE experts are held stacked ([`MoeImpl::Fused`]), which the UQFF writer
    /// does not store.
    pub fn has_fused_experts(&self) -> bool {
        self.layers
            .iter()
            .any(|l| matches!(&l.ffn, FeedForward::Moe(m) if m.fused_bytes() > 0))
    }

    /// Tensors every rank holds whole: embedding, norms and MoE routers, under their
    /// checkpoint names.
    pub fn replicated_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![
            ("model.embed_tokens.weight".to_string(), self.embed.clone()),
            ("model.norm.weight".to_string(), self.norm.clone()),
        ];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            v.push((format!("{p}.input_layernorm.weight"), l.input_norm.clone()));
            v.push((
                format!("{p}.post_attention_layernorm.weight"),
                l.post_norm.clone(),
            ));
            if let (Some(q), Some(k)) = (&l.q_norm, &l.k_norm) {
                v.push((format!("{p}.self_attn.q_norm.weight"), q.clone()));
                v.push((format!("{p}.self_attn.k_norm.weight"), k.clone()));
            }
            if let (FeedForward::Moe(m), Some(moe)) = (&l.ffn, &self.cfg.moe) {
                v.push((
                    format!("{p}.{}.gate.weight", moe.prefix),
                    m.router.weight.clone(),
                ));
            }
        }
        v
    }

    /// Bytes of weights this rank holds (linear pieces plus replicated tensors).
    pub fn weight_bytes(&self) -> u64 {
        let lin: usize = self
            .linears()
            .iter()
            .flat_map(|l| l.parts().iter())
            .map(|p| p.storage_bytes())
            .sum();
        let rep: usize = self
            .replicated_tensors()
            .iter()
            .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
            .sum();
        let fused: usize = self
            .layers
            .iter()
            .map(|l| match &l.ffn {
                FeedForward::Moe(m) => m.fused_bytes(),
                FeedForward::Dense(_) => 0,
            })
            .sum();
        (lin + rep + fused) as u64
    }

    /// Every parallel linear of this rank, in graph order (serialization, statistics).
    pub fn linears(&self) -> Vec<&ParallelLinear> {
        let mut v = Vec::with_capacity(self.layers.len() * 4 + 1);
        for l in &self.layers {
            v.extend([&l.attn.qkv, &l.attn.o]);
            v.extend(l.ffn.linears());
        }
        v.push(&self.lm_head);
        v
    }
}

/// One line of `[#####.....] 12/30 layers`, redrawn in place.
fn progress_bar(done: usize, total: usize, isq: Option<IsqType>) {
    use std::io::Write;
    let width = 30;
    let filled = done * width / total.max(1);
    let mut err = std::io::stderr();
    let _ = write!(
        err,
        "\r  [{}{}] {done}/{total} layers{}",
        "#".repeat(filled),
        ".".repeat(width - filled),
        isq.map(|t| format!(" (ISQ {})", t.name()))
            .unwrap_or_default()
    );
    if done == total {
        let _ = writeln!(err);
    }
    let _ = err.flush();
}

/// `[t, start + t]` additive mask (0 or -inf): causal, and limited to `window` past
/// positions when set. `None` for a single token without a window (nothing to mask).
fn causal_mask(
    t: usize,
    start: usize,
    window: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Option<Tensor>> {
    let total = start + t;
    if t == 1 && window.is_none_or(|w| w >= total) {
        return Ok(None);
    }
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            let pos = start + i;
            (0..total).map(move |j| {
                let future = j > pos;
                let too_old = window.is_some_and(|w| pos - j.min(pos) >= w);
                if future || too_old {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Some(
        Tensor::from_vec(mask, (t, total), device)?.to_dtype(dtype)?,
    ))
}

/// What every layer of one step shares: rotary tables and mask for the step's positions.
struct StepCtx<'a> {
    rope: &'a Rope,
    /// Rotary rows, in the model's dtype.
    cos: Tensor,
    sin: Tensor,
    mask: Option<Tensor>,
    /// Attention window (past positions), if the model has one.
    window: Option<usize>,
    eps: f32,
    /// Where fixed KV caches take this step's keys and values.
    write: KvWrite<'a>,
}

impl<'a> StepCtx<'a> {
    fn new(
        rope: &'a Rope,
        cfg: &ModelConfig,
        start: usize,
        t: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let (cos, sin) = rope.tables(start, t, device)?;
        Ok(Self {
            rope,
            cos: cos.to_dtype(dtype)?,
            sin: sin.to_dtype(dtype)?,
            mask: causal_mask(t, start, cfg.sliding_window, dtype, device)?,
            window: cfg.sliding_window,
            eps: cfg.rms_norm_eps as f32,
            write: KvWrite::At(start),
        })
    }
}

impl DecoderLayer {
    /// Moves every tensor of the layer to `device`.
    fn move_to(&mut self, device: &Device) -> Result<()> {
        let mv = |t: &mut Tensor| -> Result<()> {
            *t = t.to_device(device)?;
            Ok(())
        };
        mv(&mut self.input_norm)?;
        mv(&mut self.post_norm)?;
        for t in [&mut self.q_norm, &mut self.k_norm].into_iter().flatten() {
            mv(t)?;
        }
        self.attn.qkv.move_to(device)?;
        self.attn.o.move_to(device)?;
        self.ffn.move_to(device)
    }

    /// Quantizes this layer's linears whose name contains one of `filter` (all when empty);
    /// returns how many.
    fn apply_isq(&mut self, ty: IsqType, filter: &[String]) -> Result<usize> {
        let wanted = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f));
        let mut n = 0;
        let mut lins = vec![&mut self.attn.qkv, &mut self.attn.o];
        match &mut self.ffn {
            FeedForward::Dense(m) => lins.extend([&mut m.gate_up, &mut m.down]),
            FeedForward::Moe(m) => n += m.apply_isq(ty, filter)?,
        }
        for lin in lins {
            if wanted(lin.name()) {
                lin.apply_isq(ty)?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn forward(
        &self,
        x: &Tensor,
        pending: Option<&Partial<'_>>,
        ctx: &StepCtx<'_>,
        cache: &mut LayerCache,
    ) -> Result<(Tensor, Partial<'_>)> {
        self.forward_with(x, pending, ctx.eps, |n| {
            if let Some((x, q)) = self.qkv_rotated(n, ctx, cache)? {
                let (k, v) = cache.fixed_views(ctx.write, 1)?;
                return Ok((x, self.attend_cached(&q, &k, &v, ctx)?));
            }
            let (x, (q, k, v)) = self.attn.qkv_normed(n)?;
            Ok((x, self.attend(&q, &k, &v, ctx, cache)?))
        })
    }

    /// Residual `x` plus `pending` (the previous layer's feed-forward output) and the input
    /// norm (as a [`NormIn`]) through `attention` (the q/k/v product to the attention of this
    /// rank's heads; it returns the residual sum and that), the output projection, residual,
    /// norm, feed-forward. Returns the residual stream and this layer's feed-forward output,
    /// which the next norm adds (each add fused with the norm and the product that follow it,
    /// see [`ParallelLinear::forward_normed`]; each row-parallel output's all-reduce done by
    /// the norm that follows it where it can, see [`ParallelLinear::forward_owing`]).
    fn forward_with(
        &self,
        x: &Tensor,
        pending: Option<&Partial<'_>>,
        eps: f32,
        attention: impl FnOnce(NormIn<'_>) -> Result<(Tensor, Tensor)>,
    ) -> Result<(Tensor, Partial<'_>)> {
        let (x, y) = attention(Partial::norm_in(pending, x, &self.input_norm, eps))?;
        let a = self.attn.o_owing(&y)?;
        self.ffn
            .forward_normed(Partial::norm_in(Some(&a), &x, &self.post_norm, eps))
    }

    /// The q/k/v product of one token with its rotary embedding and KV cache write in the same
    /// kernel (see [`crate::layers::fused::norm_linear_rope`]): `(residual sum, rotated
    /// queries [1, q heads, 1, head_dim])`, or `None` where that does not serve (then nothing
    /// was computed or written).
    fn qkv_rotated(
        &self,
        n: NormIn<'_>,
        ctx: &StepCtx<'_>,
        cache: &LayerCache,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let (b, t, _) = n.x.dims3()?;
        let Some((kc, vc)) = self.rope_caches(b, t, cache) else {
            return Ok(None);
        };
        let rope = RopeIn {
            cos: &ctx.cos,
            sin: &ctx.sin,
            interleaved: ctx.rope.interleaved(),
            kc,
            vc,
            pos: store_pos(ctx.write),
            q_heads: self.attn.heads.q_heads.len(),
        };
        self.attn.qkv_rotated(n, rope)
    }

    /// The fixed caches where the fused rotary kernels serve: one token of one sequence, no
    /// q/k norms, a fixed cache.
    fn rope_caches<'c>(
        &self,
        b: usize,
        t: usize,
        cache: &'c LayerCache,
    ) -> Option<(&'c Tensor, &'c Tensor)> {
        match (b, t, &self.q_norm) {
            (1, 1, None) => cache.fixed_parts(),
            _ => None,
        }
    }

    /// Attention of `[batch, 1, hidden]` rows, one sequence each (its own positions and
    /// cache), from one q/k/v product for the batch: `[batch, 1, local q heads * head_dim]`.
    fn attention_batch(
        &self,
        (q, k, v): &(Tensor, Tensor, Tensor),
        ctxs: &[StepCtx<'_>],
        caches: &mut [&mut LayerCache],
    ) -> Result<Tensor> {
        let hd = self.attn.dims.head_dim;
        let nq = self.attn.heads.q_heads.len();
        let b = ctxs.len();
        // Every sequence's token rotated and stored in one launch, and attended in another,
        // where the fused kernels serve (fixed caches, positions on the host); else sequence
        // by sequence.
        if let Some((q, kvs)) = self.rotate_store_batch(q, k, v, ctxs, caches)? {
            let views: Vec<(&Tensor, &Tensor)> = kvs.iter().map(|(k, v)| (k, v)).collect();
            let scale = 1.0 / (hd as f64).sqrt();
            let window = ctxs.first().and_then(|c| c.window);
            if self.attn.heads.uniform_group().is_some() {
                if let Some(y) =
                    decode_attention_batch(&q, &views, window, scale as f32, SeqTable::Host)?
                {
                    return Ok(y.reshape((b, 1, nq * hd))?);
                }
            }
            let ys = ctxs
                .iter()
                .zip(kvs.iter())
                .enumerate()
                .map(|(i, (ctx, (k, v)))| self.attend_cached(&q.narrow(0, i, 1)?, k, v, ctx))
                .collect::<Result<Vec<_>>>()?;
            return Ok(Tensor::cat(&ys, 0)?);
        }
        let rotated = ctxs
            .iter()
            .zip(caches.iter_mut())
            .enumerate()
            .map(|(b, (ctx, cache))| {
                let row = |t: &Tensor| t.narrow(0, b, 1);
                self.rotate_store(&row(q)?, &row(k)?, &row(v)?, ctx, cache)
            })
            .collect::<Result<Vec<_>>>()?;
        let ys = rotated
            .iter()
            .zip(ctxs)
            .map(|((q, k, v), ctx)| self.attend_cached(q, k, v, ctx))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&ys, 0)?)
    }

    /// [`Self::attention_batch`] of a captured batch step: every sequence's token rotated and
    /// stored, and attended over its whole cache, at the positions of the layer's device
    /// tables at `at` ([`crate::layers::fused::layer_table`]); `rows` are each sequence's
    /// rotary input rows.
    fn attention_table(
        &self,
        (q, k, v): &(Tensor, Tensor, Tensor),
        caches: &[&LayerCache],
        rows: &[(Tensor, Tensor)],
        at: u64,
        (interleaved, window): (bool, Option<usize>),
    ) -> Result<Tensor> {
        let (hd, nq, b) = (
            self.attn.dims.head_dim,
            self.attn.heads.q_heads.len(),
            caches.len(),
        );
        let unserved = || Error::Unsupported {
            what: "a captured batch step".into(),
            by: "the fused rotary and attention kernels (these caches or heads)".into(),
        };
        let mut seqs = Vec::with_capacity(b);
        for (c, (cos, sin)) in caches.iter().zip(rows) {
            let (kc, vc) = c.fixed_parts().ok_or_else(unserved)?;
            seqs.push(RopeSeq {
                cos_sin: [cos, sin],
                caches: [kc, vc],
                pos: 0,
            });
        }
        let (att, rope) = layer_tables(at, b);
        let q = rope_store_batch(q, k, v, &seqs, interleaved, rope)?.ok_or_else(unserved)?;
        let views: Vec<(&Tensor, &Tensor)> =
            seqs.iter().map(|s| (s.caches[0], s.caches[1])).collect();
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let y = decode_attention_batch(&q, &views, window, scale, att)?.ok_or_else(unserved)?;
        Ok(y.reshape((b, 1, nq * hd))?)
    }

    /// [`Self::rotate_store`] of one token of each of several sequences (`q`, `k`, `v`:
    /// `[b, 1, width]`) in one launch: the rotated queries `[b, q heads, 1, head_dim]` and each
    /// sequence's cached keys and values. `None` (nothing written) unless every sequence has
    /// fixed caches written at a host-known position and the fused kernel serves them.
    #[allow(clippy::type_complexity)]
    fn rotate_store_batch(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctxs: &[StepCtx<'_>],
        caches: &[&mut LayerCache],
    ) -> Result<Option<(Tensor, Vec<(Tensor, Tensor)>)>> {
        let mut seqs = Vec::with_capacity(ctxs.len());
        for (ctx, cache) in ctxs.iter().zip(caches.iter()) {
            let (KvWrite::At(pos), Some((kc, vc))) = (ctx.write, self.rope_caches(1, 1, cache))
            else {
                return Ok(None);
            };
            seqs.push(RopeSeq {
                cos_sin: [&ctx.cos, &ctx.sin],
                caches: [kc, vc],
                pos,
            });
        }
        if seqs.len() < 2 {
            return Ok(None);
        }
        let interleaved = ctxs.first().is_some_and(|c| c.rope.interleaved());
        let Some(q) = rope_store_batch(q, k, v, &seqs, interleaved, SeqTable::Host)? else {
            return Ok(None);
        };
        let kvs = ctxs
            .iter()
            .zip(caches.iter())
            .map(|(ctx, cache)| cache.fixed_views(ctx.write, 1))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some((q, kvs)))
    }

    /// This rank's heads of one sequence: `q`, `k`, `v` (`[1 or b, t, width]`) through the
    /// norms, rotary embedding and cache into `[b, t, local q heads * head_dim]`.
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &StepCtx<'_>,
        cache: &mut LayerCache,
    ) -> Result<Tensor> {
        let (q, k, v) = self.rotate_store(q, k, v, ctx, cache)?;
        self.attend_cached(&q, &k, &v, ctx)
    }

    /// [`Self::attend`] up to the attention: the rotated queries `[b, q heads, t, head_dim]`
    /// and the cached keys and values, this step's included.
    fn rotate_store(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &StepCtx<'_>,
        cache: &mut LayerCache,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let eps = ctx.eps;
        let (b, t, _) = q.dims3()?;
        let hd = self.attn.dims.head_dim;
        let nq = self.attn.heads.q_heads.len();
        let nkv = self.attn.heads.kv_heads.len();
        // One token into a fixed cache: rotary and cache write as one kernel where it serves.
        let fused = match self.rope_caches(b, t, cache) {
            Some((kc, vc)) => {
                let pos = store_pos(ctx.write);
                let (cos, sin) = (&ctx.cos, &ctx.sin);
                rope_store(q, k, v, cos, sin, ctx.rope.interleaved(), kc, vc, pos)?
            }
            None => None,
        };
        let (q, k, v) = match fused {
            Some(q) => {
                let (k, v) = cache.fixed_views(ctx.write, 1)?;
                (q, k, v)
            }
            None => {
                let mut q = q.reshape((b, t, nq, hd))?;
                let mut k = k.reshape((b, t, nkv, hd))?;
                if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
                    q = candle_nn::ops::rms_norm(&q.contiguous()?, qn, eps)?;
                    k = candle_nn::ops::rms_norm(&k.contiguous()?, kn, eps)?;
                }
                let q = ctx.rope.apply(&q.transpose(1, 2)?, &ctx.cos, &ctx.sin)?;
                let k = ctx.rope.apply(&k.transpose(1, 2)?, &ctx.cos, &ctx.sin)?;
                let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
                let (k, v) = cache.append(&k, &v, ctx.write)?;
                (q, k, v)
            }
        };
        Ok((q, k, v))
    }

    /// Attention of rotated queries `q` (`[b, q heads, t, head_dim]`) over the cached keys and
    /// values `k`, `v` (this step's included): `[b, t, q heads * head_dim]`.
    fn attend_cached(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        ctx: &StepCtx<'_>,
    ) -> Result<Tensor> {
        let (b, _, t, hd) = q.dims4()?;
        let nq = self.attn.heads.q_heads.len();
        let nkv = self.attn.heads.kv_heads.len();
        let scale = 1.0 / (hd as f64).sqrt();
        if t == 1 && b == 1 && self.attn.heads.uniform_group().is_some() {
            let len = match ctx.write {
                KvWrite::Indexed(idx) => CacheLen::Device(idx),
                KvWrite::At(_) => CacheLen::Host,
            };
            if let Some(y) = decode_attention(q, k, v, len, ctx.window, scale as f32)? {
                return Ok(y.reshape((b, t, nq * hd))?);
            }
        }
        let y = match self.attn.heads.uniform_group() {
            // Each KV head's `g` query heads as `g` rows of one product: no copies of the
            // keys and values per query head.
            Some(g) if g > 1 => {
                let q = q.contiguous()?.reshape((b, nkv, g * t, hd))?;
                let att = (q.matmul(&k.t()?)? * scale)?;
                let att = match &ctx.mask {
                    Some(m) => {
                        let l = att.dim(3)?;
                        att.reshape((b, nkv, g, t, l))?.broadcast_add(m)?.reshape((
                            b,
                            nkv,
                            g * t,
                            l,
                        ))?
                    }
                    None => att,
                };
                let att = candle_nn::ops::softmax_last_dim(&att)?;
                att.matmul(&v.contiguous()?)?.reshape((b, nq, t, hd))?
            }
            _ => {
                let k = crate::layers::expand_kv(k, &self.attn.heads)?;
                let v = crate::layers::expand_kv(v, &self.attn.heads)?;
                let mut att = (q.matmul(&k.t()?)? * scale)?;
                if let Some(m) = &ctx.mask {
                    att = att.broadcast_add(m)?;
                }
                let att = candle_nn::ops::softmax_last_dim(&att)?;
                att.matmul(&v.contiguous()?)?
            }
        };
        Ok(y.transpose(1, 2)?.reshape((b, t, nq * hd))?)
    }
}

/// Each sequence's rotary rows (`[1, head_dim / 2]` views) of a captured batch step's inputs.
fn batch_rows(inputs: &super::graph::BatchInputs) -> Result<Vec<(Tensor, Tensor)>> {
    (0..inputs.ids.dim(0)?)
        .map(|i| Ok((inputs.cos.narrow(0, i, 1)?, inputs.sin.narrow(0, i, 1)?)))
        .collect()
}

/// Where a fused kernel writes a step's key and value: the position on the host, or in the
/// device tensor of a step replayed as a CUDA graph.
fn store_pos(write: KvWrite<'_>) -> StorePos<'_> {
    match write {
        KvWrite::At(p) => StorePos::Host(p),
        KvWrite::Indexed(idx) => StorePos::Device(idx),
    }
}

/// Index of the largest logit in a `[vocab]` or `[1, vocab]` tensor.
///
/// # Errors
/// Kernel errors.
pub fn argmax(logits: &Tensor) -> Result<u32> {
    Ok(logits
        .flatten_all()?
        .argmax(D::Minus1)?
        .to_scalar::<u32>()?)
}
