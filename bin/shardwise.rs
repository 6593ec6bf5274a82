//! The `shardwise` command line: parses arguments, sets up logging, calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shardwise::app::{self, ClusterSpec, ModelSpec};
use shardwise::bench::allreduce;
use shardwise::cluster::ClusterConfig;
use shardwise::model::SamplingParams;
use shardwise::quant::IsqType;
use shardwise::runtime::wire::parse_dtype;
use shardwise::runtime::LocalTransport;
use shardwise::shard::plan_heads;

#[derive(Parser)]
#[command(
    name = "shardwise",
    version,
    about = "Tensor-parallel transformer runtime"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where the ranks run (exactly one of the two).
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct Ranks {
    /// Drive the rank servers of this ranks.toml (started by `launch` or `rank`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run N ranks as actors in this process.
    #[arg(long)]
    local: Option<usize>,
}

/// Model and how to load it.
#[derive(clap::Args)]
struct ModelArgs {
    /// Model directory (config.json, safetensors, tokenizer.json) or .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Quantize the linear layers after loading (q4_0, q4_1, q5_0, q5_1, q8_0, q2k..q8k, fp8).
    #[arg(long)]
    isq: Option<IsqType>,
    /// Load dense weights of this dtype (f32, bf16, f16); GGUF blocks are dequantized.
    #[arg(long)]
    dtype: Option<String>,
    /// Load the weights from a UQFF set written by `shardwise quantize` (--model still gives
    /// the configuration and tokenizer).
    #[arg(long)]
    from_uqff: Option<PathBuf>,
    /// Expert layout of MoE models: packed (per-expert layers in their own formats) or fused
    /// (stacked dense tensors).
    #[arg(long, default_value = "packed")]
    moe: shardwise::layers::moe::MoeImpl,
    /// Collectives of --local ranks: local (threads), grpc, shm, or nccl (ranks on GPUs
    /// 0..N; `cuda` builds).
    #[arg(long, default_value = "local")]
    transport: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text: the continuation of the prompt goes to stdout, token by token.
    Generate {
        #[command(flatten)]
        ranks: Ranks,
        #[command(flatten)]
        model: ModelArgs,
        /// Prompt text (used as is; no chat template is applied).
        #[arg(long)]
        prompt: String,
        /// Most new tokens.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Keep the k most likely tokens (0 = all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Nucleus sampling threshold (1 = off).
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        /// Penalty on tokens already present (1 = off).
        #[arg(long, default_value_t = 1.0)]
        repetition_penalty: f64,
        /// Seed of the sampler.
        #[arg(long, default_value_t = 299_792_458)]
        seed: u64,
        /// Keep generating past end-of-sequence tokens (benchmarks).
        #[arg(long)]
        ignore_eos: bool,
    },
    /// Perplexity of a text file run as one sequence.
    Perplexity {
        #[command(flatten)]
        ranks: Ranks,
        #[command(flatten)]
        model: ModelArgs,
        /// Text to score.
        #[arg(long)]
        text_file: PathBuf,
    },
    /// Quantize a model on every rank (ISQ) and write it as a UQFF set that reloads at any
    /// world size whose split aligns.
    Quantize {
        #[command(flatten)]
        ranks: Ranks,
        #[command(flatten)]
        model: ModelArgs,
        /// Path of the set's index (rank files are written next to it).
        #[arg(long)]
        out: PathBuf,
    },
    /// Start one rank server (collectives, rank actor, control service).
    Rank {
        /// Cluster description.
        #[arg(long)]
        config: PathBuf,
        /// This rank's number.
        #[arg(long)]
        rank: usize,
    },
    /// Start every rank of ranks.toml that lives on this machine; stop them all on Ctrl-C or
    /// when one exits.
    Launch {
        /// Cluster description.
        #[arg(long)]
        config: PathBuf,
    },
    /// Measure layers and I/O (figures go to BENCHMARKS.md).
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// One rank of `bench allreduce` (started by it; not for direct use).
    #[command(hide = true)]
    CommWorker {
        #[arg(long)]
        rank: usize,
        #[arg(long)]
        world: usize,
        #[arg(long)]
        transport: String,
        #[arg(long)]
        sizes: String,
        #[arg(long)]
        dtype: String,
        #[arg(long)]
        iters: usize,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        timeout_s: f64,
        #[arg(long)]
        verify: bool,
        #[arg(long)]
        kill_rank: Option<usize>,
        #[arg(long, default_value = "127.0.0.1")]
        bind: String,
    },
    /// Show how attention heads split over ranks.
    Plan {
        /// Query heads.
        #[arg(long)]
        heads: usize,
        /// Key/value heads.
        #[arg(long)]
        kv_heads: usize,
        /// Head width.
        #[arg(long, default_value_t = 64)]
        head_dim: usize,
        /// Ranks.
        #[arg(long)]
        world: usize,
        /// Block alignment (elements) of the output projection's input dimension.
        #[arg(long, default_value_t = 1)]
        align: usize,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Decode-step latency through the runtime (default: a synthetic Llama-3-8B shape).
    Decode {
        /// Model directory, .gguf file, or synthetic:llama3-8b / synthetic:tiny.
        #[arg(long, default_value = "synthetic:llama3-8b")]
        model: PathBuf,
        /// Ranks (in this process).
        #[arg(long, default_value_t = 1)]
        local: usize,
        /// Drive the rank servers of this ranks.toml instead of --local ranks.
        #[arg(long)]
        config: Option<PathBuf>,
        /// local, grpc, shm, or nccl (GPUs 0..N; `cuda` builds).
        #[arg(long, default_value = "local")]
        transport: String,
        /// Weight dtype: f32, bf16 or f16.
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// Sequences per step.
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        batch: Vec<usize>,
        /// Tokens in each sequence's KV cache before timing.
        #[arg(long, default_value_t = 512)]
        context: usize,
        /// Timed steps per batch size.
        #[arg(long, default_value_t = 30)]
        steps: usize,
        /// Call the model on rank threads directly, without the coordinator and actors.
        #[arg(long)]
        direct: bool,
    },
    /// NCCL all-reduce latency and bus bandwidth on the local GPUs (feature `cuda`).
    #[cfg(feature = "cuda")]
    Nccl {
        /// GPUs (ranks), 0..world.
        #[arg(long, default_value_t = 2)]
        world: usize,
        /// Message sizes in bytes (K, M, G suffixes).
        #[arg(long, default_value = "8K,64K,1M,16M,256M,1G")]
        sizes: String,
        /// f32, bf16 or f16.
        #[arg(long, default_value = "bf16")]
        dtype: String,
    },
    /// Forward of a SwiGLU MLP in f32 and ISQ formats at several world sizes.
    Layers {
        /// Model width.
        #[arg(long, default_value_t = 4096)]
        hidden: usize,
        /// MLP width.
        #[arg(long, default_value_t = 11008)]
        intermediate: usize,
        /// Formats: f32 or ISQ types.
        #[arg(long, value_delimiter = ',', default_value = "f32,q8_0,q4k")]
        formats: Vec<String>,
        /// World sizes.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        worlds: Vec<usize>,
        /// Tokens per forward.
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        tokens: Vec<usize>,
        /// Timed iterations per configuration.
        #[arg(long, default_value_t = 20)]
        iters: usize,
    },
    /// All-reduce time and bandwidth (nccl-tests algbw/busbw), one process per rank.
    Allreduce {
        /// Ranks.
        #[arg(long, default_value_t = 2)]
        world: usize,
        /// local (threads), grpc (loopback TCP), shm (shared memory) or auto (per peer pair).
        #[arg(long, default_value = "grpc")]
        transport: String,
        /// Message sizes in bytes (K, M, G suffixes).
        #[arg(long, default_value = "4K,1M,16M,64M,256M")]
        sizes: String,
        /// f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Timed iterations per size.
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// Check every result against a float64 sum and across ranks.
        #[arg(long)]
        verify: bool,
        /// One JSON object per size.
        #[arg(long)]
        json: bool,
        /// Collective deadline in seconds.
        #[arg(long, default_value_t = 60.0)]
        timeout_s: f64,
        /// Kill this rank mid-collective during the last size (failure testing).
        #[arg(long, hide = true)]
        kill_rank: Option<usize>,
        /// Network namespace of each rank, comma-separated (multi-host tests).
        #[arg(long, hide = true, value_delimiter = ',')]
        netns: Vec<String>,
        /// Address each rank listens on, comma-separated (with --netns).
        #[arg(long, hide = true, value_delimiter = ',')]
        ips: Vec<String>,
    },
    /// Sharded safetensors read throughput against `cat file >/dev/null`.
    Read {
        /// File size in MiB.
        #[arg(long, default_value_t = 1024)]
        size_mib: usize,
        /// Ranks reading shards in parallel.
        #[arg(long, default_value_t = 2)]
        world: usize,
        /// Directory for the temporary file.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Repetitions (best is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
}

fn cluster_spec(ranks: &Ranks, transport: &str) -> shardwise::Result<ClusterSpec> {
    let t = match transport {
        "local" => LocalTransport::InProcess,
        "grpc" => LocalTransport::Grpc,
        "shm" => LocalTransport::Shm,
        #[cfg(feature = "cuda")]
        "nccl" => LocalTransport::Nccl,
        other => {
            return Err(shardwise::Error::Config {
                field: "--transport".into(),
                reason: format!(
                    "`{other}` (expected local, grpc or shm{})",
                    if cfg!(feature = "cuda") {
                        ", or nccl for ranks on GPUs 0..N"
                    } else {
                        "; nccl needs a build with the `cuda` feature"
                    }
                ),
            })
        }
    };
    Ok(match (&ranks.config, ranks.local) {
        (Some(c), _) => ClusterSpec::Config(c.clone()),
        (None, Some(n)) => ClusterSpec::Local(n, t),
        (None, None) => unreachable!("clap requires --config or --local"),
    })
}

fn model_spec(m: &ModelArgs) -> shardwise::Result<ModelSpec> {
    Ok(ModelSpec {
        model: m.model.clone(),
        dtype: parse_dtype(m.dtype.as_deref().unwrap_or(""))?,
        isq: m.isq,
        uqff: m.from_uqff.clone(),
        moe: m.moe,
    })
}

fn tokio_runtime() -> shardwise::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| shardwise::Error::Io {
            path: "tokio runtime".into(),
            source,
        })
}

fn run(cli: Cli) -> shardwise::Result<()> {
    match cli.cmd {
        Cmd::Generate {
            ranks,
            model,
            prompt,
            max_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            ignore_eos,
        } => {
            let spec = cluster_spec(&ranks, &model.transport)?;
            let m = model_spec(&model)?;
            let sampling = SamplingParams {
                temperature,
                top_k,
                top_p,
                repetition_penalty,
                seed,
            };
            tokio_runtime()?.block_on(app::run_generate(
                &spec, &m, &prompt, max_tokens, sampling, ignore_eos,
            ))?;
        }
        Cmd::Perplexity {
            ranks,
            model,
            text_file,
        } => {
            let spec = cluster_spec(&ranks, &model.transport)?;
            let m = model_spec(&model)?;
            tokio_runtime()?.block_on(app::run_perplexity(&spec, &m, &text_file))?;
        }
        Cmd::Quantize { ranks, model, out } => {
            let spec = cluster_spec(&ranks, &model.transport)?;
            let m = model_spec(&model)?;
            tokio_runtime()?.block_on(app::run_quantize(&spec, &m, &out))?;
        }
        Cmd::Rank { config, rank } => {
            let cfg = ClusterConfig::load(&config)?;
            tokio_runtime()?.block_on(shardwise::cluster::rank_server::serve_rank(cfg, rank))?;
            // A request may still be running on a blocking thread: leave without waiting.
            std::process::exit(0);
        }
        Cmd::Launch { config } => {
            let cfg = ClusterConfig::load(&config)?;
            let exe = std::env::current_exe().map_err(|source| shardwise::Error::Io {
                path: "current executable".into(),
                source,
            })?;
            shardwise::cluster::launch::launch(&config, &cfg, &exe)?;
        }
        Cmd::Plan {
            heads,
            kv_heads,
            head_dim,
            world,
            align,
        } => {
            for (r, h) in plan_heads(heads, kv_heads, head_dim, world, align)?
                .iter()
                .enumerate()
            {
                println!(
                    "rank {r}: q heads {:?} ({}), kv heads {:?}{}",
                    h.q_heads,
                    h.q_heads.len(),
                    h.kv_heads,
                    if h.kv_replicated { " (replicated)" } else { "" }
                );
            }
        }
        Cmd::Bench {
            what:
                BenchCmd::Layers {
                    hidden,
                    intermediate,
                    formats,
                    worlds,
                    tokens,
                    iters,
                },
        } => {
            let formats = formats
                .iter()
                .map(|f| match f.as_str() {
                    "f32" => Ok(None),
                    other => other.parse::<IsqType>().map(Some),
                })
                .collect::<shardwise::Result<Vec<_>>>()?;
            println!("SwiGLU MLP {hidden}x{intermediate}, in-process ranks, {iters} iterations");
            println!("| format | world | tokens | median ms | min ms | down_proj per rank |");
            println!("|---|---|---|---|---|---|");
            for r in shardwise::bench::bench_mlp(
                hidden,
                intermediate,
                &formats,
                &worlds,
                &tokens,
                iters,
            )? {
                println!(
                    "| {} | {} | {} | {:.2} | {:.2} | {} |",
                    r.format,
                    r.world,
                    r.tokens,
                    r.median.as_secs_f64() * 1e3,
                    r.min.as_secs_f64() * 1e3,
                    r.formats_used.join(", ")
                );
            }
        }
        Cmd::CommWorker {
            rank,
            world,
            transport,
            sizes,
            dtype,
            iters,
            seed,
            timeout_s,
            verify,
            kill_rank,
            bind,
        } => {
            let opts = allreduce_opts(
                world, &transport, &sizes, &dtype, iters, verify, timeout_s, kill_rank,
            )?;
            allreduce::worker(rank, &opts, seed, &bind)?;
        }
        Cmd::Bench {
            what:
                BenchCmd::Allreduce {
                    world,
                    transport,
                    sizes,
                    dtype,
                    iters,
                    verify,
                    json,
                    timeout_s,
                    kill_rank,
                    netns,
                    ips,
                },
        } => {
            let mut opts = allreduce_opts(
                world, &transport, &sizes, &dtype, iters, verify, timeout_s, kill_rank,
            )?;
            if netns.len() != ips.len() || (!netns.is_empty() && netns.len() != world) {
                return Err(shardwise::Error::Config {
                    field: "netns".into(),
                    reason: format!(
                        "{} namespaces and {} addresses for {world} ranks",
                        netns.len(),
                        ips.len()
                    ),
                });
            }
            opts.hosts = netns.into_iter().zip(ips).collect();
            let rows = allreduce::run(&opts)?;
            if !json {
                println!(
                    "| transport | world | dtype | bytes | median ms | algbw GB/s | busbw GB/s |"
                );
                println!("|---|---|---|---|---|---|---|");
            }
            for r in rows {
                if json {
                    println!("{}", r.json());
                } else {
                    println!(
                        "| {} | {} | {} | {} | {:.3} | {:.3} | {:.3} |",
                        r.transport,
                        r.world,
                        r.dtype,
                        r.bytes,
                        r.median_s * 1e3,
                        r.algbw(),
                        r.busbw()
                    );
                }
            }
        }
        #[cfg(feature = "cuda")]
        Cmd::Bench {
            what:
                BenchCmd::Nccl {
                    world,
                    sizes,
                    dtype,
                },
        } => {
            let sizes = sizes
                .split(',')
                .map(allreduce::parse_size)
                .collect::<shardwise::Result<Vec<_>>>()?;
            let dtype = parse_dtype(&dtype)?.unwrap_or(candle_core::DType::BF16);
            for r in shardwise::bench::nccl::run(world, &sizes, dtype)? {
                println!(
                    "{} {} {:.2} {:.1}",
                    r.path, r.bytes, r.mean_us, r.busbw_gbps
                );
            }
        }
        Cmd::Bench {
            what:
                BenchCmd::Decode {
                    model,
                    local,
                    config,
                    transport,
                    dtype,
                    batch,
                    context,
                    steps,
                    direct,
                },
        } => {
            let ranks = Ranks {
                config: None,
                local: Some(local),
            };
            let ClusterSpec::Local(world, transport) = cluster_spec(&ranks, &transport)? else {
                unreachable!("a --local spec")
            };
            let dtype = parse_dtype(&dtype)?.unwrap_or(candle_core::DType::BF16);
            let world = match &config {
                Some(path) => ClusterConfig::load(path)?.world_size(),
                None => world,
            };
            let opts = shardwise::bench::decode::DecodeOpts {
                model,
                dtype,
                world,
                config,
                transport,
                batches: batch,
                context,
                steps,
            };
            let rows = if direct {
                shardwise::bench::decode::run_direct(&opts)?
            } else {
                shardwise::bench::decode::run(&opts)?
            };
            #[cfg(feature = "cuda")]
            let bw = {
                // Rank 0's GPU: a local NCCL rank's, or the device ranks.toml gives rank 0
                // (rank servers on this host).
                let gpu = match &opts.config {
                    Some(path) => match ClusterConfig::load(path)?.ranks[0].device {
                        shardwise::cluster::config::Device::Cuda(n) => Some(n),
                        shardwise::cluster::config::Device::Cpu => None,
                    },
                    None => (transport == LocalTransport::Nccl).then_some(0),
                };
                gpu.map(shardwise::bench::decode::copy_bandwidth)
                    .transpose()?
            };
            #[cfg(not(feature = "cuda"))]
            let bw: Option<f64> = None;
            if let Some(bw) = bw {
                println!("copy bandwidth (GPU 0): {bw:.0} GB/s");
            }
            println!(
                "| ranks | batch | ms/step | tok/s | weights/rank GiB | floor ms | empty request us |"
            );
            println!("|---|---|---|---|---|---|---|");
            for r in rows {
                let floor = bw.map_or("-".to_string(), |bw| {
                    format!("{:.2}", r.weight_bytes as f64 / (bw * 1e9) * 1e3)
                });
                let request = r
                    .request_us
                    .map_or("-".to_string(), |us| format!("{us:.0}"));
                println!(
                    "| {world} | {} | {:.2} | {:.1} | {:.2} | {floor} | {request} |",
                    r.batch,
                    r.ms_per_step,
                    r.batch as f64 * 1e3 / r.ms_per_step,
                    r.weight_bytes as f64 / (1u64 << 30) as f64,
                );
            }
        }
        Cmd::Bench {
            what:
                BenchCmd::Read {
                    size_mib,
                    world,
                    dir,
                    reps,
                },
        } => {
            let dir = dir.unwrap_or_else(std::env::temp_dir);
            println!("| read of a {size_mib} MiB safetensors file (page-cached) | best s | GB/s |");
            println!("|---|---|---|");
            for r in shardwise::bench::bench_read(&dir, size_mib, world, reps)? {
                println!(
                    "| {} | {:.3} | {:.2} |",
                    r.what,
                    r.best.as_secs_f64(),
                    r.gbps()
                );
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn allreduce_opts(
    world: usize,
    transport: &str,
    sizes: &str,
    dtype: &str,
    iters: usize,
    verify: bool,
    timeout_s: f64,
    kill_rank: Option<usize>,
) -> shardwise::Result<allreduce::AllReduceOpts> {
    Ok(allreduce::AllReduceOpts {
        world,
        transport: transport.parse()?,
        sizes: sizes
            .split(',')
            .map(allreduce::parse_size)
            .collect::<shardwise::Result<_>>()?,
        dtype: allreduce::parse_dtype(dtype)?,
        iters,
        verify,
        kill_rank,
        timeout: std::time::Duration::from_secs_f64(timeout_s.max(0.1)),
        hosts: Vec::new(),
    })
}

/// mimalloc keeps and reuses large freed blocks; glibc maps every buffer over 32 MiB afresh,
/// so each collective of a large tensor paid for zeroing its output pages again.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    shardwise::init_logging();
    let cli = Cli::parse();
    if let Cmd::Generate { ranks, .. }
    | Cmd::Perplexity { ranks, .. }
    | Cmd::Quantize { ranks, .. } = &cli.cmd
    {
        shardwise::threads::size_pools_for(ranks.local.unwrap_or(1));
    }
    // In-process ranks of `bench decode` share the cores as `generate`'s do.
    if let Cmd::Bench {
        what:
            BenchCmd::Decode {
                local,
                config: None,
                ..
            },
    } = &cli.cmd
    {
        shardwise::threads::size_pools_for(*local);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
