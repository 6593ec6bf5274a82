//! The `shardwise` command line: parses arguments, sets up logging, calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shardwise::quant::IsqType;
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

#[derive(Subcommand)]
enum Cmd {
    /// Measure layers and I/O (figures go to BENCHMARKS.md).
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
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

fn run(cli: Cli) -> shardwise::Result<()> {
    match cli.cmd {
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

fn main() -> ExitCode {
    shardwise::init_logging();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
