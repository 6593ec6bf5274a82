//! The jobs behind `shardwise generate` and `shardwise perplexity`: open the cluster (in
//! process or from `ranks.toml`), load the model on every rank, run, report. Only the
//! generated text goes to stdout; everything else goes to stderr.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::DType;

use crate::cluster::ClusterConfig;
use crate::error::{Error, Result};
use crate::model::checkpoint::{encode, load_tokenizer};
use crate::model::{Checkpoint, SamplingParams, TextStream};
use crate::quant::IsqType;
use crate::runtime::generate::{generate, perplexity, GenerateParams};
use crate::runtime::{Cluster, LoadSpec, LocalTransport};

/// Where the ranks are.
#[derive(Debug, Clone)]
pub enum ClusterSpec {
    /// `n` rank actors in this process.
    Local(usize, LocalTransport),
    /// Rank servers listed in a `ranks.toml`.
    Config(PathBuf),
}

/// What to load.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Model directory or `.gguf` file.
    pub model: PathBuf,
    /// Dense dtype (dequantizes GGUF); `None` keeps the checkpoint's storage.
    pub dtype: Option<DType>,
    /// In-situ quantization after loading.
    pub isq: Option<IsqType>,
    /// Weights from a UQFF set written by `shardwise quantize`.
    pub uqff: Option<PathBuf>,
    /// Expert layout of MoE models.
    pub moe: crate::layers::moe::MoeImpl,
}

/// Paths sent to rank servers are absolute (they run in another working directory).
fn abs(p: &std::path::Path, spec: &ClusterSpec) -> PathBuf {
    if p.starts_with(crate::weights::synthetic::PREFIX)
        || p.to_str()
            .is_some_and(|s| s.starts_with(crate::weights::synthetic::PREFIX))
    {
        return p.to_path_buf();
    }
    match spec {
        ClusterSpec::Local(..) => p.to_path_buf(),
        ClusterSpec::Config(_) => std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()),
    }
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// Opens the cluster and loads the model on every rank, reporting to stderr. Returns the
/// cluster, the model's context length and its end-of-sequence tokens.
///
/// # Errors
/// Bad checkpoint, unreachable ranks, load failures (named).
pub async fn open(spec: &ClusterSpec, model: &ModelSpec) -> Result<(Cluster, usize, Vec<u32>)> {
    // The coordinator reads only the header: configuration and tokenizer.
    let ck = Checkpoint::open(&model.model, model.dtype)?;
    let cfg = ck.config.clone();
    drop(ck);
    let cluster = match spec {
        ClusterSpec::Local(n, t) => Cluster::local(*n, *t).await?,
        ClusterSpec::Config(path) => Cluster::connect(&ClusterConfig::load(path)?).await?,
    };
    eprintln!(
        "loading {} ({} layers, hidden {}, {} heads / {} KV heads) on {} ranks{}",
        model.model.display(),
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cluster.world_size(),
        model
            .isq
            .map(|t| format!(", ISQ {}", t.name()))
            .unwrap_or_default()
    );
    let t0 = Instant::now();
    let model_path = abs(&model.model, spec);
    let reports = cluster
        .load(LoadSpec {
            model: model_path,
            dtype: model.dtype,
            isq: model.isq,
            uqff: model.uqff.as_ref().map(|u| abs(u, spec)),
            moe: model.moe,
        })
        .await?;
    for (r, l) in reports.iter().enumerate() {
        eprintln!(
            "  rank {r}: weights {:.3} GiB, process RSS {:.3} GiB, {:.2} s",
            gib(l.weight_bytes),
            gib(l.rss_bytes),
            l.seconds
        );
    }
    eprintln!("loaded in {:.2} s", t0.elapsed().as_secs_f64());
    Ok((cluster, cfg.max_position_embeddings, cfg.eos_token_ids))
}

/// `shardwise generate`: streams the continuation of `prompt` to stdout.
///
/// # Errors
/// As [`open`], tokenizer errors, a prompt too long for the context, rank failures.
pub async fn run_generate(
    spec: &ClusterSpec,
    model: &ModelSpec,
    prompt: &str,
    max_tokens: usize,
    sampling: SamplingParams,
    ignore_eos: bool,
) -> Result<()> {
    let tok = load_tokenizer(&model.model)?;
    let ids = encode(&tok, prompt)?;
    let (cluster, context, eos) = open(spec, model).await?;
    if ids.len() >= context {
        let _ = cluster.shutdown().await;
        return Err(Error::Config {
            field: "prompt".into(),
            reason: format!(
                "{} tokens do not fit the model's context of {context}",
                ids.len()
            ),
        });
    }
    let params = GenerateParams {
        max_tokens,
        sampling,
        eos: if ignore_eos { vec![] } else { eos },
        context,
    };
    let mut stream = TextStream::new();
    let mut stdout = std::io::stdout();
    let result = generate(&cluster, &ids, &params, |t| {
        let piece = stream.push(&tok, t)?;
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
        Ok(())
    })
    .await;
    let (_, stats) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = cluster.shutdown().await;
            return Err(e);
        }
    };
    let rest = stream.finish(&tok)?;
    let _ = writeln!(stdout, "{rest}");
    eprintln!(
        "prompt {} tokens: prefill {:.1} tokens/s; generated {} tokens: decode {:.1} tokens/s{}",
        stats.prompt_tokens,
        stats.prefill_tps(),
        stats.new_tokens,
        stats.decode_tps(),
        if stats.hit_eos {
            " (stopped at EOS)"
        } else {
            ""
        }
    );
    finish(spec, cluster).await
}

/// `shardwise perplexity`: prints `perplexity: <value>` and the token count.
///
/// # Errors
/// As [`run_generate`]; an unreadable text file.
pub async fn run_perplexity(
    spec: &ClusterSpec,
    model: &ModelSpec,
    text_file: &PathBuf,
) -> Result<()> {
    let text = std::fs::read_to_string(text_file).map_err(|source| Error::Io {
        path: text_file.clone(),
        source,
    })?;
    let tok = load_tokenizer(&model.model)?;
    let ids = encode(&tok, &text)?;
    let (cluster, context, _) = open(spec, model).await?;
    let t0 = Instant::now();
    let r = perplexity(&cluster, &ids, context).await;
    let (ppl, n) = match r {
        Ok(v) => v,
        Err(e) => {
            let _ = cluster.shutdown().await;
            return Err(e);
        }
    };
    eprintln!("scored in {:.2} s", t0.elapsed().as_secs_f64());
    println!("perplexity: {ppl:.6}");
    println!("tokens: {} ({n} scored)", ids.len());
    finish(spec, cluster).await
}

/// In-process ranks stop with the job; rank servers stay up for the next one.
async fn finish(spec: &ClusterSpec, cluster: Cluster) -> Result<()> {
    match spec {
        ClusterSpec::Local(..) => cluster.shutdown().await,
        ClusterSpec::Config(_) => Ok(()),
    }
}

/// `shardwise quantize`: loads the model with ISQ on every rank and writes a UQFF set at `out`
/// (the index; each rank's file next to it).
///
/// # Errors
/// As [`open`]; I/O errors writing the set.
pub async fn run_quantize(
    spec: &ClusterSpec,
    model: &ModelSpec,
    out: &std::path::Path,
) -> Result<()> {
    let ck = Checkpoint::open(&model.model, model.dtype)?;
    let cfg = ck.config.clone();
    drop(ck);
    let (cluster, _, _) = open(spec, model).await?;
    let t0 = Instant::now();
    let files = match cluster.serialize(abs(out, spec)).await {
        Ok(f) => f,
        Err(e) => {
            let _ = cluster.shutdown().await;
            return Err(e);
        }
    };
    let isq = model.isq.map(|t| vec![t.name()]).unwrap_or_default();
    crate::model::persist::write_index(out, &cfg, isq, &files)?;
    let total: u64 = files.iter().map(|(_, b)| b).sum();
    eprintln!(
        "wrote {} ({} rank files, {:.3} GiB) in {:.2} s",
        out.display(),
        files.len(),
        gib(total),
        t0.elapsed().as_secs_f64()
    );
    finish(spec, cluster).await
}
