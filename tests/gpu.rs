//! CUDA ranks with NCCL (built with `--features cuda`, run on the GPU machine by
//! `scripts/gpu-run.sh`): the tiny transformers fixtures on GPUs at one and two ranks against
//! the same references the CPU tests use (f32: logits within 1e-3, identical greedy tokens),
//! and bf16 at two ranks against one within bf16 tolerance; the peer-memory all-reduce against
//! host sums of fresh random inputs, its all-gather against host concatenation, and its
//! deadline naming a rank that never arrives (a bounded wait on the stream seeing the work
//! unfinished meanwhile); decode steps replayed as CUDA graphs against the same steps run
//! eagerly; GGML blocks multiplied by the CUDA kernels against the same blocks on the CPU; the
//! fused decode kernels and the GEMV products (with their fused norm and silu, and the q/k/v
//! product with its rotary embedding and cache write) against float64 references; products
//! that finish their own all-reduce against products all-reduced after, and their deadline
//! naming a rank that never arrives; an NCCL group that never fills named after its deadline.
#![cfg(feature = "cuda")]

mod common;

use candle_core::DType;
use common::reference::{
    all_logits, batched_vs_single, check_reference_on, f32_spec, fixtures, greedy_step_logits,
    loaded, max_abs, max_abs_diff, rt, with_env,
};
use shardwise::runtime::{LoadSpec, LocalTransport};

fn gpus() -> usize {
    if candle_core::utils::cuda_is_available() {
        (0..8)
            .take_while(|&i| candle_core::Device::new_cuda(i).is_ok())
            .count()
    } else {
        0
    }
}

#[test]
fn tiny_models_on_gpus_match_transformers() {
    let world = gpus().min(2);
    assert!(world >= 1, "no CUDA device");
    for name in [
        "tiny-llama",
        "tiny-qwen3",
        "tiny-qwen2",
        "tiny-mistral",
        "tiny-qwen3-moe",
    ] {
        let dir = fixtures().join("models").join(name);
        let spec = LoadSpec {
            model: dir.clone(),
            dtype: Some(DType::F32),
            ..Default::default()
        };
        check_reference_on(
            &format!("{name} on GPU"),
            &spec,
            &dir.join("reference.json"),
            1..=world,
            LocalTransport::Nccl,
        );
    }
}

#[test]
fn bf16_two_gpus_match_one_within_bf16_tolerance() {
    if gpus() < 2 {
        eprintln!("skipped: one GPU");
        return;
    }
    let dir = fixtures().join("models").join("tiny-llama");
    let run = |world: usize| {
        rt().block_on(async {
            let spec = LoadSpec {
                dtype: Some(DType::BF16),
                ..f32_spec(&dir)
            };
            let c = loaded(&spec, world, LocalTransport::Nccl).await;
            let l = all_logits(&c, &[1, 17, 200, 45, 3, 99, 128, 7, 64, 12]).await;
            c.shutdown().await.unwrap();
            l
        })
    };
    let (one, two) = (run(1), run(2));
    let rel = max_abs_diff(&one, &two) / max_abs(&one);
    // bf16 keeps 8 bits of mantissa (2^-8 = 0.4%); two ranks sum in another order.
    assert!(rel <= 2e-2, "two GPUs are {rel} from one in bf16");
    eprintln!("bf16: two GPUs are {rel} (relative) from one");
}

/// One rank's inputs and results, one row per call.
type Calls = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// Every call's inputs, drawn fresh on the host, and every rank's result, for `calls`
/// all-reduces issued back to back (no synchronisation between them).
fn back_to_back(
    comms: &[shardwise::comm::nccl::NcclComm],
    n: usize,
    dtype: DType,
    calls: usize,
) -> Vec<Calls> {
    use shardwise::comm::Communicator;
    shardwise::comm::each_rank(comms.iter().collect(), |_, c| {
        let dev = c.cuda_device();
        let xs = (0..calls)
            .map(|_| {
                candle_core::Tensor::randn(0f32, 1.0, n, &candle_core::Device::Cpu)?.to_dtype(dtype)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        // Every other call's input starts one element into its buffer (not 16-byte aligned).
        let outs = xs
            .iter()
            .enumerate()
            .map(|(k, x)| {
                let x = x.to_device(dev)?;
                let x = if k % 2 == 1 {
                    candle_core::Tensor::cat(&[&x.narrow(0, 0, 1)?, &x], 0)?.narrow(0, 1, n)?
                } else {
                    x
                };
                c.all_reduce_sum(&x)
            })
            .collect::<shardwise::Result<Vec<_>>>()?;
        let f32s = |ts: &[candle_core::Tensor]| {
            ts.iter()
                .map(|t| t.to_dtype(DType::F32)?.to_vec1::<f32>())
                .collect::<candle_core::Result<Vec<_>>>()
        };
        Ok((f32s(&xs)?, f32s(&outs)?))
    })
    .unwrap()
}

/// An NCCL group over up to 4 GPUs with its peer-memory path up, or `None` (skipped) on one
/// GPU.
fn peer_group() -> Option<Vec<shardwise::comm::nccl::NcclComm>> {
    if gpus() < 2 {
        eprintln!("skipped: one GPU");
        return None;
    }
    let world = gpus().min(4);
    let comms = shardwise::comm::nccl::group(world).unwrap();
    assert!(
        comms.iter().all(|c| c.has_peer_path()),
        "the peer-memory path did not come up on {world} GPUs"
    );
    Some(comms)
}

#[test]
fn peer_all_reduce_matches_host_sums_back_to_back() {
    let Some(comms) = peer_group() else {
        return;
    };
    let max = shardwise::comm::peer::MAX_BYTES;
    for (dtype, tol) in [(DType::F32, 1e-6), (DType::BF16, 8e-3), (DType::F16, 1e-3)] {
        for n in [1, 7, 4096, 65_537, max / dtype.size_in_bytes()] {
            let per_rank = back_to_back(&comms, n, dtype, 24);
            for call in 0..24 {
                let first = &per_rank[0].1[call];
                for (r, (_, outs)) in per_rank.iter().enumerate() {
                    assert!(
                        outs[call] == *first,
                        "{dtype:?} n={n} call {call}: rank {r} differs from rank 0"
                    );
                }
                for i in 0..n {
                    let want: f64 = per_rank.iter().map(|(xs, _)| f64::from(xs[call][i])).sum();
                    let got = f64::from(first[i]);
                    assert!(
                        (got - want).abs() <= tol * want.abs().max(1.0),
                        "{dtype:?} n={n} call {call} element {i}: {got} against {want}"
                    );
                }
            }
        }
    }
}

/// `err` names rank 1, within 20 s of `t0`.
fn names_rank_1_in_time(err: &str, t0: std::time::Instant) {
    assert!(err.contains("rank 1"), "{err}");
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(20),
        "{:?}",
        t0.elapsed()
    );
    eprintln!("named after {:?}: {err}", t0.elapsed());
}

/// Two ranks with the peer-memory path up and a peer deadline of 1.5 s, or `None` (skipped) on
/// one GPU. The deadline is read when the group starts; only this group gets the short one.
fn short_deadline_pair() -> Option<Vec<shardwise::comm::nccl::NcclComm>> {
    if gpus() < 2 {
        eprintln!("skipped: one GPU");
        return None;
    }
    std::env::set_var("SHARDWISE_PEER_DEADLINE_MS", "1500");
    let comms = shardwise::comm::nccl::group(2);
    std::env::remove_var("SHARDWISE_PEER_DEADLINE_MS");
    let comms = comms.unwrap();
    assert!(comms[0].has_peer_path());
    Some(comms)
}

#[test]
fn peer_all_reduce_names_a_rank_that_never_arrives() {
    use shardwise::comm::Communicator;
    let Some(comms) = short_deadline_pair() else {
        return;
    };
    let dev = comms[0].cuda_device();
    let x = candle_core::Tensor::ones(1024, DType::F32, dev).unwrap();
    // Rank 1 never calls: rank 0's kernel gives up after the deadline, and says who.
    let t0 = std::time::Instant::now();
    comms[0].all_reduce_sum(&x).unwrap();
    // Meanwhile a bounded wait on the stream (what a rank does before copying a step's
    // logits) reports the unfinished work instead of blocking, then sees it end.
    let stream = dev.as_cuda_device().unwrap().cuda_stream();
    let ms = std::time::Duration::from_millis;
    assert!(
        !shardwise::cuda::wait_for(&stream, ms(300)).unwrap(),
        "the waiting kernel finished within 300 ms"
    );
    assert!(shardwise::cuda::wait_for(&stream, ms(15_000)).unwrap());
    dev.synchronize().unwrap();
    let err = comms[0].all_reduce_sum(&x).unwrap_err().to_string();
    names_rank_1_in_time(&err, t0);
}

#[test]
fn product_all_reduce_names_a_rank_that_never_arrives() {
    use shardwise::layers::fused;
    // As above, for the wait inside a product that finishes its own all-reduce.
    let (rows, n, kd) = (1, 512, 256);
    lone_product_call_names_rank_1(rows * n * 4, |c, target| {
        let dev = c.cuda_device();
        let x = candle_core::Tensor::ones((rows, kd), DType::BF16, dev).unwrap();
        let w = candle_core::Tensor::ones((n, kd), DType::BF16, dev).unwrap();
        fused::linear_reduced(&x, &w, target)
            .unwrap()
            .expect("the GEMV serves");
    });
}

#[test]
fn norm_all_reduce_names_a_rank_that_never_arrives() {
    use shardwise::layers::fused::{self, NormIn, Owed};
    // As above, for the wait inside a norm that finishes an owed all-reduce.
    let (rows, n) = (8, 512);
    lone_product_call_names_rank_1(rows * n * 4, |c, target| {
        let dev = c.cuda_device();
        let x = candle_core::Tensor::ones((rows, n), DType::BF16, dev).unwrap();
        let w = candle_core::Tensor::ones(n, DType::BF16, dev).unwrap();
        let norm = NormIn {
            x: &x,
            delta: Some(&x),
            owed: Some(Owed { target, comm: c }),
            w: &w,
            eps: 1e-5,
        };
        fused::add_rms_norm_in(norm).unwrap();
    });
}

/// Rank 0 of a [`short_deadline_pair`] makes one call of the products' peer protocol for an
/// output of `bytes` bytes (`call`, given the target) that rank 1 never makes: its blocks give
/// up after the deadline, and the next call names rank 1.
fn lone_product_call_names_rank_1(
    bytes: usize,
    call: impl FnOnce(&shardwise::comm::nccl::NcclComm, shardwise::comm::PeerReduce),
) {
    use shardwise::comm::Communicator;
    let Some(comms) = short_deadline_pair() else {
        return;
    };
    let target = comms[0]
        .reduce_target(bytes)
        .unwrap()
        .expect("a product target on the peer path");
    let t0 = std::time::Instant::now();
    call(&comms[0], target);
    comms[0].cuda_device().synchronize().unwrap();
    let err = comms[0].reduce_target(bytes).unwrap_err().to_string();
    names_rank_1_in_time(&err, t0);
}

#[test]
fn nccl_init_names_a_group_that_never_fills() {
    // Rank 0 of 2 joins a group that rank 1 never joins: an error after the deadline, not a
    // hang (the helper thread stays blocked in NCCL until the process exits).
    let id = shardwise::comm::nccl::new_unique_id().unwrap();
    let t0 = std::time::Instant::now();
    let err = with_env("SHARDWISE_NCCL_INIT_DEADLINE_MS", Some("1500"), || {
        shardwise::comm::nccl::NcclComm::init(0, 2, 0, &id)
    })
    .map(|_| ())
    .unwrap_err()
    .to_string();
    assert!(err.contains("rank 0") && err.contains("init"), "{err}");
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        t0.elapsed()
    );
    eprintln!("named after {:?}: {err}", t0.elapsed());
}

#[test]
fn decode_steps_replayed_as_cuda_graphs_match_eager_steps() {
    let world = gpus().min(2);
    assert!(world >= 1, "no CUDA device");
    // Eager steps (`SHARDWISE_CUDA_GRAPH=0`: fixed caches written at host-known positions,
    // attention over the sequence) against steps replayed from CUDA graphs (positions and
    // lengths read on the device, attention over the capacity). 300 steps cross the caches' first capacity (256
    // positions): they grow and the step is captured again.
    for name in ["tiny-llama", "tiny-qwen3", "tiny-qwen2", "tiny-mistral"] {
        let dir = fixtures().join("models").join(name);
        for w in 1..=world {
            let run = |graphs| {
                with_env("SHARDWISE_CUDA_GRAPH", graphs, || {
                    greedy_step_logits(&dir, w, LocalTransport::Nccl, 300)
                })
            };
            let (eager, graphed) = (run(Some("0")), run(Some("1")));
            let d = max_abs_diff(&eager, &graphed);
            assert!(
                d <= 1e-4,
                "{name} at {w} GPU(s): graphs are {d} from eager steps"
            );
            eprintln!("{name} at {w} GPU(s): graphs within {d} of eager steps");
        }
    }
}

#[test]
fn decoding_sequences_in_one_step_on_gpus_matches_one_at_a_time() {
    let world = gpus().min(2);
    assert!(world >= 1, "no CUDA device");
    // Three sequences of different lengths decoded in one step (one rotary and one attention
    // launch for all three where the fused kernels serve) against one sequence per step
    // (graphs off: every step eager, the single-sequence kernels). Then the batched steps
    // replayed as CUDA graphs (positions from device tables; qwen3's q/k norms keep it
    // eager): 260 steps cross the caches' first capacity (256), which captures anew.
    for (name, graphs) in [
        ("tiny-llama", false),
        ("tiny-qwen3", false),
        ("tiny-llama", true),
        ("tiny-qwen2", true),
        ("tiny-mistral", true),
        ("tiny-qwen3", true),
    ] {
        let dir = fixtures().join("models").join(name);
        let (steps, env) = if graphs {
            (260, Some(("SHARDWISE_CUDA_GRAPH", "1")))
        } else {
            (12, None)
        };
        for w in 1..=world {
            let diffs = with_env("SHARDWISE_CUDA_GRAPH", Some("0"), || {
                batched_vs_single(&dir, w, LocalTransport::Nccl, steps, env)
            });
            let how = if graphs { "graphed" } else { "eager" };
            for (i, d) in diffs.into_iter().enumerate() {
                assert!(d <= 1e-4, "{name} at {w} GPU(s), {how}, sequence {i}: {d}");
                eprintln!("{name} at {w} GPU(s), sequence {i}: {how} batch within {d} of single");
            }
        }
    }
}

#[test]
fn ggml_blocks_on_gpus_match_the_same_blocks_on_the_cpu() {
    use candle_core::quantized::GgmlDType;
    use shardwise::quant::IsqType;
    // Q8_0 blocks made at load (ISQ) on the CPU, then multiplied by candle's CUDA kernels on
    // the GPU ranks; the reference is the same blocks multiplied on the CPU.
    let dir = fixtures().join("models").join("tiny-qwen3");
    let spec = LoadSpec {
        isq: Some(IsqType::Ggml(GgmlDType::Q8_0)),
        ..f32_spec(&dir)
    };
    let tokens = [1u32, 17, 200, 45, 3, 99, 128, 7, 64, 12];
    let run = |world: usize, transport: LocalTransport| {
        rt().block_on(async {
            let c = loaded(&spec, world, transport).await;
            let l = all_logits(&c, &tokens).await;
            c.shutdown().await.unwrap();
            l
        })
    };
    let cpu = run(1, LocalTransport::InProcess);
    for world in 1..=gpus().min(2) {
        let gpu = run(world, LocalTransport::Nccl);
        let rel = max_abs_diff(&cpu, &gpu) / max_abs(&cpu);
        // The kernels quantize or order the activations differently per block.
        assert!(rel <= 2e-2, "Q8_0 on {world} GPU(s) is {rel} from the CPU");
        eprintln!("Q8_0 on {world} GPU(s): {rel} (relative) from the CPU");
    }
}

/// Fresh normal draws, `[n]`, in f64.
fn randn(n: usize, rng: &mut impl rand::Rng) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let (u, v): (f64, f64) = (rng.random_range(1e-12..1.0), rng.random());
            (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        })
        .collect()
}

/// `xs` as a tensor of `dtype` on `dev`, and the values that tensor holds (rounded), in f64.
fn put(
    xs: &[f64],
    shape: &[usize],
    dtype: DType,
    dev: &candle_core::Device,
) -> (candle_core::Tensor, Vec<f64>) {
    let t = candle_core::Tensor::from_vec(xs.iter().map(|&x| x as f32).collect(), shape, dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let back = t
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    (t, back)
}

fn values(t: &candle_core::Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// `x + delta` (or `x` alone) as the fused kernels compute it: rounded to `dtype` before the
/// norm, as the plain add rounds it.
fn residual_sum(x: &[f64], delta: Option<&[f64]>, dtype: DType) -> Vec<f64> {
    let sum: Vec<f64> = match delta {
        Some(d) => x.iter().zip(d).map(|(a, b)| a + b).collect(),
        None => x.to_vec(),
    };
    put(&sum, &[sum.len()], dtype, &candle_core::Device::Cpu).1
}

/// RMSNorm in f64 of `rows` rows of width `n` with weight `w`.
fn rms_rows(x: &[f64], w: &[f64], rows: usize, n: usize, eps: f64) -> Vec<f64> {
    let mut out = vec![0.0; rows * n];
    for r in 0..rows {
        let row = &x[r * n..(r + 1) * n];
        let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / n as f64 + eps).sqrt();
        for i in 0..n {
            out[r * n + i] = row[i] * inv * w[i];
        }
    }
    out
}

/// Head `h` (width `hd`) of `x` rotated by the `[cos, sin]` rows: pairs `(p, p + hd / 2)`, or
/// `(2p, 2p + 1)` when `interleaved`.
fn rotate_head(x: &[f64], h: usize, hd: usize, [c, s]: [&[f64]; 2], interleaved: bool) -> Vec<f64> {
    let half = hd / 2;
    let mut y = x[h * hd..(h + 1) * hd].to_vec();
    for p in 0..half {
        let (i1, i2) = if interleaved {
            (2 * p, 2 * p + 1)
        } else {
            (p, p + half)
        };
        let (a, b) = (x[h * hd + i1], x[h * hd + i2]);
        y[i1] = a * c[p] - b * s[p];
        y[i2] = a * s[p] + b * c[p];
    }
    y
}

/// `x @ w^T` of `rows` rows `kd` wide with a weight of `n` rows.
fn product64(x: &[f64], w: &[f64], rows: usize, n: usize, kd: usize) -> Vec<f64> {
    (0..rows * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            (0..kd).map(|k| x[r * kd + k] * w[c * kd + k]).sum()
        })
        .collect()
}

/// The fused kernels' dtypes and the relative error each may show against a float64
/// reference (a kernel's result; results of two rounded steps get twice this).
const KERNEL_TOLERANCES: [(DType, f64); 2] = [(DType::F32, 2e-5), (DType::BF16, 1.6e-2)];

/// Calls of a peer protocol per rank in [`mixed_calls`].
const MIXED_CALLS: usize = 6;

/// `call(comm, own, rng)` made [`MIXED_CALLS`] times on every rank of `comms` at once (each
/// rank's calls in order), `own` as [`own_way`] says for the call and rank: the results per
/// rank, then per call.
fn mixed_calls<T: Send>(
    comms: &[shardwise::comm::nccl::NcclComm],
    call: impl Fn(
            &shardwise::comm::nccl::NcclComm,
            bool,
            &mut rand::rngs::ThreadRng,
        ) -> shardwise::error::Result<T>
        + Sync,
) -> Vec<Vec<T>> {
    shardwise::comm::each_rank(comms.iter().collect(), |r, c| {
        let mut rng = rand::rng();
        (0..MIXED_CALLS)
            .map(|k| call(c, own_way(k, r), &mut rng))
            .collect()
    })
    .unwrap()
}

/// Whether rank `r` makes call `call` of a peer protocol its own way (the kernel that finishes
/// the all-reduce itself) rather than the all-reduce kernel: every rank in calls 0, 3, ...,
/// rank 0 alone in calls 1, 4, ..., no rank in calls 2, 5, ...: ranks that mix the two ways
/// must still meet.
fn own_way(call: usize, r: usize) -> bool {
    match call % 3 {
        0 => true,
        1 => r == 0,
        _ => false,
    }
}

/// Largest |got - want| relative to the largest |want|.
fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1e-30f64, |m, w| m.max(w.abs()));
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f64::max)
        / scale
}

/// Attention of one token's queries `q` (`[q heads, head_dim]`) over the first `len` of
/// `cap` cached positions (`kv`: keys, values `[kv heads, cap, head_dim]`), within `window`,
/// in float64: `[q heads * head_dim]`.
fn attention_ref(
    q: &[f64],
    kv: [&[f64]; 2],
    [nq, nkv, hd]: [usize; 3],
    len: usize,
    cap: usize,
    window: Option<usize>,
) -> Vec<f64> {
    let g = nq / nkv;
    let scale = 1.0 / (hd as f64).sqrt();
    let first = window.map_or(0, |w| len.saturating_sub(w));
    let mut want = vec![0.0; nq * hd];
    for h in 0..nq {
        let kvh = h / g;
        let at = |buf: &[f64], j: usize, d: usize| buf[(kvh * cap + j) * hd + d];
        let s: Vec<f64> = (first..len)
            .map(|j| {
                (0..hd)
                    .map(|d| q[h * hd + d] * at(kv[0], j, d))
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let l: f64 = p.iter().sum();
        for d in 0..hd {
            want[h * hd + d] = (first..len)
                .zip(&p)
                .map(|(j, p)| p * at(kv[1], j, d))
                .sum::<f64>()
                / l;
        }
    }
    want
}

#[test]
fn fused_kernels_match_float64_references() {
    use shardwise::layers::fused::{
        add_rms_norm, batch_words, decode_attention, decode_attention_batch, device_address,
        layer_table, layer_tables, rope_store, rope_store_batch, set_positions, silu_mul, CacheLen,
        RopeSeq, SeqTable, StorePos,
    };
    // A batch's descriptors as a captured step keeps them: one layer's table on the device,
    // built for position 0 and then given each sequence's position; (attention, rotary).
    let device_tables = |seqs: &[RopeSeq], interleaved: bool, dev: &candle_core::Device| {
        let words: Vec<_> = seqs
            .iter()
            .map(|s| {
                let at0 = RopeSeq { pos: 0, ..*s };
                batch_words(&at0, interleaved)
                    .unwrap()
                    .expect("descriptors for this batch")
            })
            .collect();
        let mut table = layer_table(&words);
        set_positions(&mut table, &seqs.iter().map(|s| s.pos).collect::<Vec<_>>());
        let t = candle_core::Tensor::new(table.as_slice(), dev).unwrap();
        let at = device_address(&t).unwrap().expect("a device table");
        let (att, rope) = layer_tables(at, seqs.len());
        (t, att, rope)
    };
    assert!(gpus() >= 1, "no CUDA device");
    let dev = candle_core::Device::new_cuda(0).unwrap();
    let mut rng = rand::rng();
    for (dtype, tol) in KERNEL_TOLERANCES {
        // A KV cache `[1, kv heads, capacity, head_dim]` of fresh normal draws.
        let cache = |nkv: usize, cap: usize, hd: usize, rng: &mut rand::rngs::ThreadRng| {
            put(&randn(nkv * cap * hd, rng), &[1, nkv, cap, hd], dtype, &dev)
        };
        // Residual add + RMSNorm, and the norm alone, rows of uneven width.
        for (rows, n) in [(1, 4096), (3, 1000), (2, 7)] {
            let (x, xv) = put(&randn(rows * n, &mut rng), &[rows, 1, n], dtype, &dev);
            let (d, dv) = put(&randn(rows * n, &mut rng), &[rows, 1, n], dtype, &dev);
            let (w, wv) = put(&randn(n, &mut rng), &[n], dtype, &dev);
            let eps = 1e-5;
            for with_delta in [false, true] {
                let (s, h) = add_rms_norm(&x, with_delta.then_some(&d), &w, eps as f32).unwrap();
                let sum = residual_sum(&xv, with_delta.then_some(dv.as_slice()), dtype);
                let want = rms_rows(&sum, &wv, rows, n, eps);
                let what = format!("{dtype:?} add_rms_norm {rows}x{n} delta {with_delta}");
                let e = rel_err(&values(&s), &sum);
                assert!(e <= tol, "{what}: sum off by {e}");
                let e = rel_err(&values(&h), &want);
                assert!(e <= 2.0 * tol, "{what}: norm off by {e}");
            }
        }
        // silu(gate) * up of a merged product.
        let (rows, half) = (3, 1000);
        let (gu, gv) = put(
            &randn(rows * 2 * half, &mut rng),
            &[rows, 2 * half],
            dtype,
            &dev,
        );
        let want: Vec<f64> = (0..rows * half)
            .map(|i| {
                let (r, c) = (i / half, i % half);
                let g = gv[r * 2 * half + c];
                g / (1.0 + (-g).exp()) * gv[r * 2 * half + half + c]
            })
            .collect();
        let e = rel_err(&values(&silu_mul(&gu).unwrap()), &want);
        assert!(e <= 2.0 * tol, "{dtype:?} silu_mul off by {e}");
        // Rotary embedding of one token and its cache write, positions from the host and from
        // the device, both pairings.
        for (nq, nkv, hd, cap, pos, interleaved) in [
            (32usize, 8usize, 128usize, 256usize, 200usize, false),
            (9, 3, 64, 512, 0, true),
            (6, 2, 8, 16, 15, false),
        ] {
            let half = hd / 2;
            let (q, qv) = put(&randn(nq * hd, &mut rng), &[1, 1, nq * hd], dtype, &dev);
            let (k, kv) = put(&randn(nkv * hd, &mut rng), &[1, 1, nkv * hd], dtype, &dev);
            let (v, vv) = put(&randn(nkv * hd, &mut rng), &[1, 1, nkv * hd], dtype, &dev);
            let angles: Vec<f64> = (0..half)
                .map(|i| pos as f64 * 0.9f64.powi(i as i32))
                .collect();
            let cosf: Vec<f64> = angles.iter().map(|a| a.cos()).collect();
            let sinf: Vec<f64> = angles.iter().map(|a| a.sin()).collect();
            let (cos, cv) = put(&cosf, &[1, half], dtype, &dev);
            let (sin, sv) = put(&sinf, &[1, half], dtype, &dev);
            let rot = |x: &[f64], h: usize| rotate_head(x, h, hd, [&cv, &sv], interleaved);
            let want_q: Vec<f64> = (0..nq).flat_map(|h| rot(&qv, h)).collect();
            let devpos = candle_core::Tensor::new(&[pos as u32], &dev).unwrap();
            for how in [StorePos::Host(pos), StorePos::Device(&devpos)] {
                let (kc, kcv) = cache(nkv, cap, hd, &mut rng);
                let (vc, vcv) = cache(nkv, cap, hd, &mut rng);
                let qo = rope_store(&q, &k, &v, &cos, &sin, interleaved, &kc, &vc, how)
                    .unwrap()
                    .expect("a fused kernel");
                let what = format!("{dtype:?} rope_store {nq}/{nkv}x{hd} at {pos} {how:?}");
                assert_eq!(qo.dims(), &[1, nq, 1, hd], "{what}");
                let e = rel_err(&values(&qo), &want_q);
                assert!(e <= 2.0 * tol, "{what}: q off by {e}");
                // The caches: the position holds the rotated key and the value, every other
                // position what it held.
                let (mut want_k, mut want_v) = (kcv.clone(), vcv.clone());
                for h in 0..nkv {
                    let at = (h * cap + pos) * hd;
                    want_k[at..at + hd].copy_from_slice(&rot(&kv, h));
                    want_v[at..at + hd].copy_from_slice(&vv[h * hd..(h + 1) * hd]);
                }
                let e = rel_err(&values(&kc), &want_k);
                assert!(e <= 2.0 * tol, "{what}: key cache off by {e}");
                assert_eq!(values(&vc), want_v, "{what}: value cache");
            }
        }
        // The same for one token of each of several sequences in one launch (positions and
        // capacities differ), against each sequence's reference.
        for (nq, nkv, hd, interleaved, seqs) in [
            (
                32usize,
                8usize,
                128usize,
                false,
                vec![(200usize, 256usize), (0, 512), (511, 512)],
            ),
            (9, 3, 64, true, vec![(3, 16); 8]),
        ] {
            for on_device in [false, true] {
                let (b, half) = (seqs.len(), hd / 2);
                let (q, qv) = put(&randn(b * nq * hd, &mut rng), &[b, 1, nq * hd], dtype, &dev);
                let (k, kv) = put(
                    &randn(b * nkv * hd, &mut rng),
                    &[b, 1, nkv * hd],
                    dtype,
                    &dev,
                );
                let (v, vv) = put(
                    &randn(b * nkv * hd, &mut rng),
                    &[b, 1, nkv * hd],
                    dtype,
                    &dev,
                );
                let mut parts = Vec::new();
                for &(pos, cap) in &seqs {
                    let angles: Vec<f64> = (0..half)
                        .map(|i| (pos as f64 + 0.5) * 0.9f64.powi(i as i32))
                        .collect();
                    let cosf: Vec<f64> = angles.iter().map(|a| a.cos()).collect();
                    let sinf: Vec<f64> = angles.iter().map(|a| a.sin()).collect();
                    let (cos, cv) = put(&cosf, &[1, half], dtype, &dev);
                    let (sin, sv) = put(&sinf, &[1, half], dtype, &dev);
                    let (kc, kcv) = cache(nkv, cap, hd, &mut rng);
                    let (vc, vcv) = cache(nkv, cap, hd, &mut rng);
                    parts.push(((cos, cv), (sin, sv), (kc, kcv), (vc, vcv), pos, cap));
                }
                let rows: Vec<RopeSeq> = parts
                    .iter()
                    .map(|((cos, _), (sin, _), (kc, _), (vc, _), pos, _)| RopeSeq {
                        cos_sin: [cos, sin],
                        caches: [kc, vc],
                        pos: *pos,
                    })
                    .collect();
                // On the device, the table's positions (the rows' own serve for shapes only).
                let (_table, _, rope_table) = device_tables(&rows, interleaved, &dev);
                let (rows, table) = if on_device {
                    let at0 = rows.iter().map(|r| RopeSeq { pos: 0, ..*r }).collect();
                    (at0, rope_table)
                } else {
                    (rows, SeqTable::Host)
                };
                let qo = rope_store_batch(&q, &k, &v, &rows, interleaved, table)
                    .unwrap()
                    .expect("a fused kernel for this batch");
                assert_eq!(qo.dims(), &[b, nq, 1, hd]);
                let got_q = values(&qo);
                for (i, ((_, cv), (_, sv), (kc, kcv), (vc, vcv), pos, cap)) in
                    parts.iter().enumerate()
                {
                    let what = format!(
                        "{dtype:?} rope_store of {b} sequences, sequence {i} at {pos}, {table:?}"
                    );
                    let cs = [cv.as_slice(), sv.as_slice()];
                    let rot = |x: &[f64], h: usize| rotate_head(x, h, hd, cs, interleaved);
                    let (qi, ki) = (&qv[i * nq * hd..], &kv[i * nkv * hd..]);
                    let want_q: Vec<f64> = (0..nq).flat_map(|h| rot(qi, h)).collect();
                    let e = rel_err(&got_q[i * nq * hd..(i + 1) * nq * hd], &want_q);
                    assert!(e <= 2.0 * tol, "{what}: q off by {e}");
                    let (mut want_k, mut want_v) = (kcv.clone(), vcv.clone());
                    for h in 0..nkv {
                        let at = (h * cap + pos) * hd;
                        want_k[at..at + hd].copy_from_slice(&rot(ki, h));
                        let vi = (i * nkv + h) * hd;
                        want_v[at..at + hd].copy_from_slice(&vv[vi..vi + hd]);
                    }
                    let e = rel_err(&values(kc), &want_k);
                    assert!(e <= 2.0 * tol, "{what}: key cache off by {e}");
                    assert_eq!(values(vc), want_v, "{what}: value cache");
                }
            }
        }
        // A group too large for the kernels' registers is left to the plain path.
        let (q, _) = put(&randn(16 * 256, &mut rng), &[1, 16, 1, 256], dtype, &dev);
        let (k, _) = put(&randn(8 * 256, &mut rng), &[1, 1, 8, 256], dtype, &dev);
        let none = decode_attention(&q, &k, &k, CacheLen::Host, None, 1.0).unwrap();
        assert!(
            none.is_none(),
            "16 heads of 256 per KV head took a fused kernel"
        );
        // One query token against a cache: (q heads, kv heads, head_dim, positions,
        // capacity, window); read as a narrowed view (length on the host) and as the whole
        // capacity with the position in a device tensor.
        for (nq, nkv, hd, len, cap, window) in [
            (32, 8, 128, 512usize, 768, None),
            (9, 3, 64, 1, 256, None),
            (4, 4, 80, 300, 512, Some(100)),
            (8, 1, 256, 1000, 1024, None),
            (32, 2, 64, 700, 768, None),
            (14, 2, 128, 77, 256, None),
            (6, 2, 32, 4100, 4352, Some(4000)),
        ] {
            let (q, qv) = put(&randn(nq * hd, &mut rng), &[1, nq, 1, hd], dtype, &dev);
            let (k, kv) = cache(nkv, cap, hd, &mut rng);
            let (v, vv) = cache(nkv, cap, hd, &mut rng);
            let scale = 1.0 / (hd as f64).sqrt();
            let want = attention_ref(&qv, [&kv, &vv], [nq, nkv, hd], len, cap, window);
            let pos = candle_core::Tensor::new(&[(len - 1) as u32], &dev).unwrap();
            let views = [
                (
                    k.narrow(2, 0, len).unwrap(),
                    v.narrow(2, 0, len).unwrap(),
                    CacheLen::Host,
                ),
                (k.clone(), v.clone(), CacheLen::Device(&pos)),
            ];
            for (kk, vk, how) in views {
                let y = decode_attention(&q, &kk, &vk, how, window, scale as f32)
                    .unwrap()
                    .expect("a fused kernel for this shape");
                assert_eq!(y.dims(), &[1, nq, 1, hd]);
                let e = rel_err(&values(&y), &want);
                let what = format!("{dtype:?} attention {nq}/{nkv}x{hd}, {len} of {cap}, {how:?}");
                assert!(e <= 2.0 * tol, "{what}: off by {e}");
            }
        }
        // Several sequences in one launch, each over its own cache (capacities and lengths
        // differ, one sequence of a single position), against each sequence's reference.
        for (nq, nkv, hd, window, seqs) in [
            (
                32,
                8,
                128,
                None,
                vec![(512usize, 768usize), (1, 256), (300, 512), (77, 256)],
            ),
            (
                9,
                3,
                64,
                Some(100),
                vec![(250, 256), (40, 256), (1000, 1024)],
            ),
            (14, 2, 128, None, vec![(5, 256); 8]),
        ] {
            let b = seqs.len();
            let (q, qv) = put(&randn(b * nq * hd, &mut rng), &[b, nq, 1, hd], dtype, &dev);
            let scale = 1.0 / (hd as f64).sqrt();
            let mut caches = Vec::new();
            let mut want = Vec::new();
            for (i, &(len, cap)) in seqs.iter().enumerate() {
                let (k, kv) = cache(nkv, cap, hd, &mut rng);
                let (v, vv) = cache(nkv, cap, hd, &mut rng);
                let qi = &qv[i * nq * hd..(i + 1) * nq * hd];
                want.extend(attention_ref(
                    qi,
                    [&kv, &vv],
                    [nq, nkv, hd],
                    len,
                    cap,
                    window,
                ));
                let (kn, vn) = (k.narrow(2, 0, len).unwrap(), v.narrow(2, 0, len).unwrap());
                caches.push((kn, vn, (k, v)));
            }
            let views: Vec<(&candle_core::Tensor, &candle_core::Tensor)> =
                caches.iter().map(|(k, v, _)| (k, v)).collect();
            // And as a captured step reads them: whole caches, lengths from a device table.
            let (rot, _) = put(&randn(hd / 2, &mut rng), &[1, hd / 2], dtype, &dev);
            let full: Vec<RopeSeq> = caches
                .iter()
                .zip(&seqs)
                .map(|((_, _, (k, v)), &(len, _))| RopeSeq {
                    cos_sin: [&rot, &rot],
                    caches: [k, v],
                    pos: len - 1,
                })
                .collect();
            let (_table, att_table, _) = device_tables(&full, false, &dev);
            let full_views: Vec<(&candle_core::Tensor, &candle_core::Tensor)> =
                full.iter().map(|s| (s.caches[0], s.caches[1])).collect();
            for (views, table) in [(&views, SeqTable::Host), (&full_views, att_table)] {
                let y = decode_attention_batch(&q, views, window, scale as f32, table)
                    .unwrap()
                    .expect("a fused kernel for this batch");
                assert_eq!(y.dims(), &[b, nq, 1, hd]);
                let e = rel_err(&values(&y), &want);
                let what = format!(
                    "{dtype:?} attention of {b} sequences, {nq}/{nkv}x{hd}, {seqs:?}, {table:?}"
                );
                assert!(e <= 2.0 * tol, "{what}: off by {e}");
            }
        }
    }
}

#[test]
fn gemv_kernels_match_float64_references() {
    use shardwise::layers::fused::{linear, norm_linear, NormIn};
    assert!(gpus() >= 1, "no CUDA device");
    let dev = candle_core::Device::new_cuda(0).unwrap();
    let mut rng = rand::rng();
    let eps = 1e-5;
    for (dtype, tol) in KERNEL_TOLERANCES {
        // (rows, weight rows, width): decode shapes and ragged tails of the 16-byte loads.
        for (rows, wrows, kd) in [(1, 4096, 4096), (2, 1000, 576), (1, 6, 8), (2, 18, 1288)] {
            let (x, xv) = put(&randn(rows * kd, &mut rng), &[rows, 1, kd], dtype, &dev);
            let (d, dv) = put(&randn(rows * kd, &mut rng), &[rows, 1, kd], dtype, &dev);
            let (nw, nwv) = put(&randn(kd, &mut rng), &[kd], dtype, &dev);
            let (w, wv) = put(&randn(wrows * kd, &mut rng), &[wrows, kd], dtype, &dev);
            let product = |h: &[f64]| product64(h, &wv, rows, wrows, kd);
            let silu_of = |y: &[f64]| -> Vec<f64> {
                let half = wrows / 2;
                (0..rows * half)
                    .map(|i| {
                        let (r, c) = (i / half, i % half);
                        let g = y[r * wrows + c];
                        g / (1.0 + (-g).exp()) * y[r * wrows + half + c]
                    })
                    .collect()
            };
            let what = format!("{dtype:?} gemv {rows}x{kd} by {wrows}");
            let y = linear(&x, &w).unwrap().expect("a GEMV kernel");
            assert_eq!(y.dims(), &[rows, 1, wrows], "{what}");
            let e = rel_err(&values(&y), &product(&xv));
            assert!(e <= tol, "{what}: product off by {e}");
            for (with_delta, silu) in [(false, false), (true, false), (false, true), (true, true)] {
                let sum = residual_sum(&xv, with_delta.then_some(dv.as_slice()), dtype);
                let h = rms_rows(&sum, &nwv, rows, kd, eps);
                let n = NormIn {
                    owed: None,
                    x: &x,
                    delta: with_delta.then_some(&d),
                    w: &nw,
                    eps: eps as f32,
                };
                let (s, y) = norm_linear(n, &w, silu).unwrap().expect("a GEMV kernel");
                let what = format!("{what} delta {with_delta} silu {silu}");
                let e = rel_err(&values(&s), &sum);
                assert!(e <= tol, "{what}: sum off by {e}");
                let want = product(&h);
                let (want, width) = if silu {
                    (silu_of(&want), wrows / 2)
                } else {
                    (want, wrows)
                };
                assert_eq!(y.dims(), &[rows, 1, width], "{what}");
                let e = rel_err(&values(&y), &want);
                assert!(e <= 2.0 * tol, "{what}: output off by {e}");
            }
        }
        // More rows than a GEMV takes, and a width not in 16-byte units: matrix products.
        let (x3, _) = put(&randn(3 * 64, &mut rng), &[3, 64], dtype, &dev);
        let (w, _) = put(&randn(8 * 64, &mut rng), &[8, 64], dtype, &dev);
        assert!(linear(&x3, &w).unwrap().is_none(), "3 rows took a GEMV");
        let (x, _) = put(&randn(6, &mut rng), &[1, 6], dtype, &dev);
        let (w, _) = put(&randn(8 * 6, &mut rng), &[8, 6], dtype, &dev);
        assert!(linear(&x, &w).unwrap().is_none(), "width 6 took a GEMV");
    }
}

#[test]
fn qkv_gemv_with_rotary_matches_float64_reference() {
    use shardwise::layers::fused::{norm_linear_rope, NormIn, RopeIn, StorePos};
    assert!(gpus() >= 1, "no CUDA device");
    let dev = candle_core::Device::new_cuda(0).unwrap();
    let mut rng = rand::rng();
    let eps = 1e-5;
    for (dtype, tol) in KERNEL_TOLERANCES {
        // (q heads, kv heads, head_dim, width, capacity, position, interleaved)
        for (nq, nkv, hd, kd, cap, pos, interleaved) in [
            (
                32usize, 8usize, 128usize, 4096usize, 256usize, 200usize, false,
            ),
            (9, 3, 64, 576, 64, 0, true),
            (6, 2, 8, 64, 16, 15, false),
        ] {
            let (half, wrows) = (hd / 2, (nq + 2 * nkv) * hd);
            let (x, xv) = put(&randn(kd, &mut rng), &[1, 1, kd], dtype, &dev);
            let (d, dv) = put(&randn(kd, &mut rng), &[1, 1, kd], dtype, &dev);
            let (nw, nwv) = put(&randn(kd, &mut rng), &[kd], dtype, &dev);
            let (w, wv) = put(&randn(wrows * kd, &mut rng), &[wrows, kd], dtype, &dev);
            let angles: Vec<f64> = (0..half)
                .map(|i| (pos + 1) as f64 * 0.8f64.powi(i as i32))
                .collect();
            let cosf: Vec<f64> = angles.iter().map(|a| a.cos()).collect();
            let sinf: Vec<f64> = angles.iter().map(|a| a.sin()).collect();
            let (cos, cv) = put(&cosf, &[1, half], dtype, &dev);
            let (sin, sv) = put(&sinf, &[1, half], dtype, &dev);
            let devpos = candle_core::Tensor::new(&[pos as u32], &dev).unwrap();
            for (with_delta, how) in [
                (true, StorePos::Host(pos)),
                (false, StorePos::Device(&devpos)),
            ] {
                let sum = residual_sum(&xv, with_delta.then_some(dv.as_slice()), dtype);
                let qkv = product64(&rms_rows(&sum, &nwv, 1, kd, eps), &wv, 1, wrows, kd);
                let rot = |h: usize| rotate_head(&qkv, h, hd, [&cv, &sv], interleaved);
                let kc = put(
                    &randn(nkv * cap * hd, &mut rng),
                    &[1, nkv, cap, hd],
                    dtype,
                    &dev,
                );
                let vc = put(
                    &randn(nkv * cap * hd, &mut rng),
                    &[1, nkv, cap, hd],
                    dtype,
                    &dev,
                );
                let n = NormIn {
                    owed: None,
                    x: &x,
                    delta: with_delta.then_some(&d),
                    w: &nw,
                    eps: eps as f32,
                };
                let rope = RopeIn {
                    cos: &cos,
                    sin: &sin,
                    interleaved,
                    kc: &kc.0,
                    vc: &vc.0,
                    pos: how,
                    q_heads: nq,
                };
                let what = format!("{dtype:?} q/k/v {nq}/{nkv}x{hd} of {kd} at {pos} {how:?}");
                let (s, q) = norm_linear_rope(n, &w, rope)
                    .unwrap()
                    .expect("a GEMV kernel with rotary");
                let e = rel_err(&values(&s), &sum);
                assert!(e <= tol, "{what}: sum off by {e}");
                assert_eq!(q.dims(), &[1, nq, 1, hd], "{what}");
                let want_q: Vec<f64> = (0..nq).flat_map(rot).collect();
                let e = rel_err(&values(&q), &want_q);
                assert!(e <= 2.0 * tol, "{what}: q off by {e}");
                // The position holds the rotated key and the value; every other position
                // what it held.
                let (mut want_k, mut want_v) = (kc.1.clone(), vc.1.clone());
                for h in 0..nkv {
                    let at = (h * cap + pos) * hd;
                    want_k[at..at + hd].copy_from_slice(&rot(nq + h));
                    let v0 = (nq + nkv + h) * hd;
                    want_v[at..at + hd].copy_from_slice(&qkv[v0..v0 + hd]);
                }
                let e = rel_err(&values(&kc.0), &want_k);
                assert!(e <= 2.0 * tol, "{what}: key cache off by {e}");
                let e = rel_err(&values(&vc.0), &want_v);
                assert!(e <= 2.0 * tol, "{what}: value cache off by {e}");
            }
        }
        // Heads not a multiple of 4 wide: no kernel, nothing written.
        let (hd, kd) = (6, 64);
        let (x, _) = put(&randn(kd, &mut rng), &[1, 1, kd], dtype, &dev);
        let (nw, _) = put(&randn(kd, &mut rng), &[kd], dtype, &dev);
        let (w, _) = put(&randn(3 * hd * kd, &mut rng), &[3 * hd, kd], dtype, &dev);
        let (cos, _) = put(&randn(hd / 2, &mut rng), &[1, hd / 2], dtype, &dev);
        let (kc, kcv) = put(&randn(4 * hd, &mut rng), &[1, 1, 4, hd], dtype, &dev);
        let n = NormIn {
            owed: None,
            x: &x,
            delta: None,
            w: &nw,
            eps: eps as f32,
        };
        let rope = RopeIn {
            cos: &cos,
            sin: &cos,
            interleaved: false,
            kc: &kc,
            vc: &kc,
            pos: StorePos::Host(1),
            q_heads: 1,
        };
        assert!(
            norm_linear_rope(n, &w, rope).unwrap().is_none(),
            "head width 6 took a kernel"
        );
        assert_eq!(values(&kc), kcv, "head width 6: the cache changed");
    }
}

#[test]
fn peer_all_gather_matches_host_concatenation_between_all_reduces() {
    use shardwise::comm::Communicator;
    let Some(comms) = peer_group() else {
        return;
    };
    let world = comms.len();
    let max = shardwise::comm::peer::MAX_BYTES;
    for dtype in [DType::F32, DType::BF16] {
        let most = max / dtype.size_in_bytes();
        // Uneven widths per rank (padded to the widest inside), one and two rows.
        for (rows, widths) in [
            (1, vec![5usize, 3]),
            (1, vec![64_128, 64_127]),
            (2, vec![4097, 4096]),
            (1, vec![most, most - 3]),
        ] {
            let sizes: Vec<usize> = (0..world).map(|r| widths[r % widths.len()]).collect();
            let per_rank = shardwise::comm::each_rank(comms.iter().collect(), |r, c| {
                let dev = c.cuda_device();
                let mut got = Vec::new();
                let mut sent = Vec::new();
                for _ in 0..6 {
                    let x = candle_core::Tensor::randn(
                        0f32,
                        1.0,
                        (rows, sizes[r]),
                        &candle_core::Device::Cpu,
                    )?
                    .to_dtype(dtype)?;
                    let all = c.all_gather_sized(&x.to_device(dev)?, 1, &sizes)?;
                    // An all-reduce in between: both share the peer buffers' epochs.
                    let _ = c.all_reduce_sum(&x.narrow(1, 0, 1)?.to_device(dev)?)?;
                    got.push(
                        all.to_dtype(DType::F32)?
                            .to_device(&candle_core::Device::Cpu)?,
                    );
                    sent.push(x.to_dtype(DType::F32)?);
                }
                Ok((sent, got))
            })
            .unwrap();
            for call in 0..6 {
                let pieces: Vec<&candle_core::Tensor> =
                    per_rank.iter().map(|(sent, _)| &sent[call]).collect();
                let want = candle_core::Tensor::cat(&pieces, 1)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                for (r, (_, got)) in per_rank.iter().enumerate() {
                    let got = got[call].flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    assert!(
                        got == want,
                        "{dtype:?} {rows}x{sizes:?} call {call}: rank {r}'s gather differs"
                    );
                }
            }
        }
    }
}

#[test]
fn norms_finishing_an_owed_all_reduce_match_the_all_reduce_then_the_norm() {
    use shardwise::comm::Communicator;
    use shardwise::layers::fused::{self, NormIn, Owed};
    let Some(comms) = peer_group() else {
        return;
    };
    let world = comms.len();
    let eps = 1e-5f32;
    for (dtype, tol) in KERNEL_TOLERANCES {
        // A batch step's rows, rows of odd words (2050 bf16 elements), the region's whole slot,
        // and a width whose 2-byte rows are not whole words (the plain call then).
        for (rows, n) in [(8, 4096), (3, 2050), (2, 16384), (1, 4097)] {
            let per_rank = mixed_calls(&comms, |c, own, rng| {
                let dev = c.cuda_device();
                let (x, x64) = put(&randn(rows * n, rng), &[rows, n], dtype, dev);
                let (d, d64) = put(&randn(rows * n, rng), &[rows, n], dtype, dev);
                let (w, w64) = put(&randn(n, rng), &[n], dtype, dev);
                let target = c
                    .reduce_target(rows * n * 4)?
                    .expect("a product target on the peer path");
                let owed = Owed { target, comm: c };
                // The same call of the protocol made either way.
                let (sum, normed) = if own {
                    let n = NormIn {
                        x: &x,
                        delta: Some(&d),
                        owed: Some(owed),
                        w: &w,
                        eps,
                    };
                    fused::add_rms_norm_in(n)?
                } else {
                    fused::add_rms_norm(&x, Some(&owed.settle(&d)?), &w, eps)?
                };
                let reduced = c.all_reduce_sum(&d)?;
                let (psum, pnormed) = fused::add_rms_norm(&x, Some(&reduced), &w, eps)?;
                // A product finishing its own all-reduce in between: the same region's call
                // numbers.
                let (px, _) = put(&randn(2 * 64, rng), &[2, 64], dtype, dev);
                let (pw, _) = put(&randn(256 * 64, rng), &[256, 64], dtype, dev);
                let pt = c.reduce_target(2 * 256 * 4)?.expect("a product target");
                let _ = fused::linear_reduced(&px, &pw, pt)?.expect("the GEMV serves");
                Ok((
                    [values(&sum), values(&normed)],
                    [values(&psum), values(&pnormed)],
                    (x64, d64, w64, values(&reduced)),
                ))
            });
            for call in 0..MIXED_CALLS {
                let total: Vec<f64> = (0..rows * n)
                    .map(|i| per_rank.iter().map(|calls| calls[call].2 .1[i]).sum())
                    .collect();
                for (r, calls) in per_rank.iter().enumerate() {
                    let (got, plain, (x64, _, w64, reduced)) = &calls[call];
                    let what = format!("{dtype:?} {rows}x{n} call {call} rank {r}/{world}");
                    assert!(
                        got == plain,
                        "{what}: differs from the all-reduce then the norm"
                    );
                    let err = rel_err(reduced, &total);
                    assert!(err <= tol, "{what}: the all-reduce is {err} from float64");
                    // The reference from the all-reduce's rounded sums: the norm's own error.
                    let sum = residual_sum(x64, Some(reduced), dtype);
                    assert!(
                        rel_err(&got[0], &sum) == 0.0,
                        "{what}: the residual sum differs"
                    );
                    let err = rel_err(&got[1], &rms_rows(&sum, w64, rows, n, eps as f64));
                    assert!(err <= tol, "{what}: the norm is {err} from float64");
                }
            }
        }
    }
}

#[test]
fn products_finishing_their_all_reduce_match_products_all_reduced_after() {
    use shardwise::comm::Communicator;
    use shardwise::layers::fused;
    let Some(comms) = peer_group() else {
        return;
    };
    let world = comms.len();
    for (dtype, tol) in KERNEL_TOLERANCES {
        // Whole blocks of 4 outputs, a last block of 2, two rows, the region's whole slot.
        for (rows, n, kd) in [
            (1, 4096, 1024),
            (1, 4102, 512),
            (2, 2050, 256),
            (2, 16384, 128),
        ] {
            let per_rank = mixed_calls(&comms, |c, own, rng| {
                let dev = c.cuda_device();
                let (x, x64) = put(&randn(rows * kd, rng), &[rows, kd], dtype, dev);
                let (w, w64) = put(&randn(n * kd, rng), &[n, kd], dtype, dev);
                let target = c
                    .reduce_target(rows * n * 4)?
                    .expect("a product target on the peer path");
                // The same call of the protocol made either way.
                let reduced = if own {
                    fused::linear_reduced(&x, &w, target)?.expect("the GEMV serves")
                } else {
                    c.all_reduce_product(&fused::linear(&x, &w)?.expect("the GEMV serves"))?
                };
                let plain = c.all_reduce_sum(&fused::linear(&x, &w)?.expect("the GEMV serves"))?;
                // A gather in between: all three share the peer buffers' call numbers.
                let _ = c.all_gather(&x.narrow(1, 0, 3)?.contiguous()?, 1)?;
                Ok((
                    values(&reduced),
                    values(&plain),
                    product64(&x64, &w64, rows, n, kd),
                ))
            });
            for call in 0..MIXED_CALLS {
                let want: Vec<f64> = (0..rows * n)
                    .map(|i| per_rank.iter().map(|calls| calls[call].2[i]).sum())
                    .collect();
                let first = &per_rank[0][call].0;
                for (r, calls) in per_rank.iter().enumerate() {
                    let (reduced, plain, _) = &calls[call];
                    let what = format!("{dtype:?} {rows}x{n}x{kd} call {call} rank {r}/{world}");
                    assert!(
                        reduced == plain,
                        "{what}: the product's own sum differs from the all-reduce's"
                    );
                    assert!(reduced == first, "{what}: differs from rank 0");
                    let err = rel_err(reduced, &want);
                    assert!(err <= 2.0 * tol, "{what}: {err} from float64");
                }
            }
        }
    }
}
