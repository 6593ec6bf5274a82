//! `shardwise bench decode`: decode-step latency of a model through the whole runtime
//! (coordinator, rank actors, collectives), at one world size and several batch sizes.
//!
//! Each of `batch` sequences is prefilled with `context` random tokens, then `steps` decode
//! steps are timed after 3 warm-up steps; one step advances every sequence by one token. On
//! CUDA ranks the same call measures the device's copy bandwidth, so the step can be compared
//! with its memory floor (bytes each rank reads per step / bandwidth).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::DType;

use crate::error::Result;
use crate::model::{SamplingParams, SeqStep};
use crate::runtime::{Cluster, LoadSpec, LocalTransport, StepRequest};

/// What to measure.
#[derive(Debug, Clone)]
pub struct DecodeOpts {
    /// Model path (e.g. `synthetic:llama3-8b`).
    pub model: PathBuf,
    /// Dense dtype of the weights.
    pub dtype: DType,
    /// Ranks (in this process), unless `config` names rank servers.
    pub world: usize,
    /// Drive the rank servers of this ranks.toml instead (one process per rank, e.g. one per
    /// GPU, started by `shardwise launch`).
    pub config: Option<PathBuf>,
    /// How they exchange tensors.
    pub transport: LocalTransport,
    /// Sequences per step.
    pub batches: Vec<usize>,
    /// Tokens already in each sequence's KV cache when timing starts.
    pub context: usize,
    /// Timed steps.
    pub steps: usize,
}

/// One batch size.
#[derive(Debug, Clone)]
pub struct DecodeRow {
    /// Sequences per step.
    pub batch: usize,
    /// Mean milliseconds per step.
    pub ms_per_step: f64,
    /// Weight bytes of rank 0.
    pub weight_bytes: u64,
    /// Mean microseconds of a request that does no work (a health check) through the
    /// coordinator and every rank, timed right after the steps: the runtime's own share of a
    /// step (`None` without the runtime).
    pub request_us: Option<f64>,
}

/// The same measurement without the runtime: `world` threads of this process each load their
/// shard and call [`crate::model::Model::step`] in lockstep (the collectives keep them
/// together), so the difference to [`run`] is the cost of the actors and their messages.
///
/// # Errors
/// Load, step or collective errors.
pub fn run_direct(opts: &DecodeOpts) -> Result<Vec<DecodeRow>> {
    let comms = opts.transport.group(opts.world)?;
    let rows = crate::comm::each_rank(comms, |_, comm| {
        let ck = crate::model::Checkpoint::open(&opts.model, Some(opts.dtype))?;
        let vocab = ck.config.vocab_size;
        let mut model =
            crate::model::Model::load(&ck.config, ck.source.as_ref(), &ck.load_options(), comm)?;
        let weight_bytes = model.weight_bytes();
        let mut rows = Vec::new();
        for &batch in &opts.batches {
            let seqs = |pos: usize, n: usize| step_seqs(batch, pos, n, vocab);
            model.step(&seqs(0, opts.context))?;
            let mut pos = opts.context;
            for _ in 0..3 {
                model.step(&seqs(pos, 1))?;
                pos += 1;
            }
            let t0 = Instant::now();
            for _ in 0..opts.steps {
                model.step(&seqs(pos, 1))?;
                pos += 1;
            }
            rows.push(DecodeRow {
                batch,
                ms_per_step: t0.elapsed().as_secs_f64() * 1e3 / opts.steps.max(1) as f64,
                weight_bytes,
                request_us: None,
            });
            (0..batch as u64).for_each(|s| model.release(s));
        }
        Ok(rows)
    })?;
    Ok(rows.into_iter().next().unwrap_or_default())
}

/// `batch` sequences' tokens `pos..pos + n` (fixed pseudo-random ids below `vocab`).
fn step_seqs(batch: usize, pos: usize, n: usize, vocab: usize) -> Vec<SeqStep> {
    (0..batch)
        .map(|s| SeqStep {
            seq_id: s as u64,
            tokens: (0..n)
                .map(|k| ((s * 7919 + (pos + k) * 104_729) % vocab) as u32)
                .collect(),
            start_pos: pos,
            all_logits: false,
            sample: Some(SamplingParams::default()),
        })
        .collect()
}

/// Runs the benchmark (builds its own tokio runtime).
///
/// # Errors
/// Load, step or collective errors.
pub fn run(opts: &DecodeOpts) -> Result<Vec<DecodeRow>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| crate::Error::Io {
            path: "tokio runtime".into(),
            source,
        })?;
    let vocab = crate::model::Checkpoint::open(&opts.model, None)?
        .config
        .vocab_size;
    rt.block_on(async {
        let c = match &opts.config {
            Some(path) => Cluster::connect(&crate::cluster::ClusterConfig::load(path)?).await?,
            None => Cluster::local(opts.world, opts.transport).await?,
        };
        let reports = c
            .load(LoadSpec {
                model: opts.model.clone(),
                dtype: Some(opts.dtype),
                ..Default::default()
            })
            .await?;
        let weight_bytes = reports.first().map_or(0, |r| r.weight_bytes);
        let mut rows = Vec::new();
        for &batch in &opts.batches {
            let seqs = |pos: usize, n: usize| step_seqs(batch, pos, n, vocab);
            c.step_outputs(StepRequest {
                seqs: seqs(0, opts.context),
                release: vec![],
            })
            .await?;
            let mut pos = opts.context;
            for _ in 0..3 {
                c.step_outputs(StepRequest {
                    seqs: seqs(pos, 1),
                    release: vec![],
                })
                .await?;
                pos += 1;
            }
            let t0 = Instant::now();
            for _ in 0..opts.steps {
                c.step_outputs(StepRequest {
                    seqs: seqs(pos, 1),
                    release: vec![],
                })
                .await?;
                pos += 1;
            }
            let ms_per_step = t0.elapsed().as_secs_f64() * 1e3 / opts.steps.max(1) as f64;
            let requests = 4 * opts.steps.max(1);
            let t0 = Instant::now();
            for _ in 0..requests {
                c.health().await?;
            }
            rows.push(DecodeRow {
                batch,
                ms_per_step,
                weight_bytes,
                request_us: Some(t0.elapsed().as_secs_f64() * 1e6 / requests as f64),
            });
            c.step_outputs(StepRequest {
                seqs: vec![],
                release: (0..batch as u64).collect(),
            })
            .await?;
        }
        if opts.config.is_none() {
            c.shutdown().await?;
        }
        Ok(rows)
    })
}

/// Device-to-device copy bandwidth of CUDA device `ordinal` in GB/s (bytes read plus bytes
/// written, per second), from copies of a 2 GiB buffer.
///
/// # Errors
/// No such device.
#[cfg(feature = "cuda")]
pub fn copy_bandwidth(ordinal: usize) -> Result<f64> {
    let dev = crate::cuda::device(ordinal)?;
    let x = candle_core::Tensor::zeros(1usize << 30, DType::BF16, &dev)?;
    let _ = x.copy()?;
    dev.synchronize()?;
    let reps = 10;
    let t0 = Instant::now();
    for _ in 0..reps {
        let _ = x.copy()?;
    }
    dev.synchronize()?;
    let secs = t0.elapsed().as_secs_f64() / f64::from(reps);
    Ok(2.0 * (2usize << 30) as f64 / secs / 1e9)
}
