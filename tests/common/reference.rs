//! Checking a model against its transformers fixture (`tests/fixtures/models/<name>`): logits
//! of every case within 1e-3, identical greedy tokens, the perplexity within 1e-3 relative,
//! and every world size within 1e-5 (relative) of one rank.

use std::path::{Path, PathBuf};

use serde_json::Value;
use shardwise::model::{SamplingParams, SeqStep};
use shardwise::runtime::generate::{generate, perplexity, GenerateParams};
use shardwise::runtime::{Cluster, LoadSpec, LocalTransport, StepRequest};

/// `tests/fixtures` (`SHARDWISE_FIXTURES` overrides it for test binaries run on another
/// machine, as scripts/gpu-run.sh does).
pub fn fixtures() -> PathBuf {
    match std::env::var_os("SHARDWISE_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"),
    }
}

/// A parsed JSON file.
pub fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A JSON array of numbers as f32.
pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// A multi-threaded tokio runtime.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Logits of every position of `tokens` (a fresh sequence).
pub async fn all_logits(c: &Cluster, tokens: &[u32]) -> Vec<Vec<f32>> {
    let l = c
        .step(StepRequest {
            seqs: vec![SeqStep {
                seq_id: 1,
                tokens: tokens.to_vec(),
                start_pos: 0,
                all_logits: true,
                sample: None,
            }],
            release: vec![],
        })
        .await
        .unwrap();
    l[0].to_vec2().unwrap()
}

/// `n` greedy tokens after `prompt`, no EOS stop.
pub async fn greedy(c: &Cluster, prompt: &[u32], n: usize) -> Vec<u32> {
    let params = GenerateParams {
        max_tokens: n,
        sampling: SamplingParams::default(),
        eos: vec![],
        context: 1 << 20,
    };
    generate(c, prompt, &params, |_| Ok(())).await.unwrap().0
}

/// `world` in-process ranks over `transport`, with `spec` loaded.
pub async fn loaded(spec: &LoadSpec, world: usize, transport: LocalTransport) -> Cluster {
    let c = Cluster::local(world, transport).await.unwrap();
    c.load(spec.clone()).await.unwrap();
    c
}

/// `spec` for the f32 weights of `dir`.
pub fn f32_spec(dir: &Path) -> LoadSpec {
    LoadSpec {
        model: dir.to_path_buf(),
        dtype: Some(candle_core::DType::F32),
        ..Default::default()
    }
}

/// Runs `f` with the environment variable `key` set to `value` (or unset), and unsets it
/// after. For tests alone in their binary or run one at a time: the environment is shared.
pub fn with_env<T>(key: &str, value: Option<&str>, f: impl FnOnce() -> T) -> T {
    match value {
        Some(v) => std::env::set_var(key, v),
        None => std::env::remove_var(key),
    }
    let out = f();
    std::env::remove_var(key);
    out
}

/// Index of the largest value (greedy sampling).
pub fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap()
}

/// Greedy decode, one step per token, of `steps` steps after a short prompt on `world`
/// in-process ranks (f32); every step's logits.
pub fn greedy_step_logits(
    dir: &Path,
    world: usize,
    transport: LocalTransport,
    steps: usize,
) -> Vec<Vec<f32>> {
    rt().block_on(async {
        let c = loaded(&f32_spec(dir), world, transport).await;
        let (out, _) = stepped(&c, &[3, 17, 200, 45, 9], steps, argmax).await;
        c.shutdown().await.unwrap();
        out
    })
}

/// `steps` steps of one fresh sequence after `prompt`, each step's logits taken to the caller
/// and the next token picked from them by `pick`: every step's logits and the picked tokens.
pub async fn stepped(
    c: &Cluster,
    prompt: &[u32],
    steps: usize,
    mut pick: impl FnMut(&[f32]) -> u32,
) -> (Vec<Vec<f32>>, Vec<u32>) {
    let (mut tokens, mut pos) = (prompt.to_vec(), 0);
    let (mut rows, mut picked) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let l = c
            .step(StepRequest {
                seqs: vec![SeqStep {
                    seq_id: 7,
                    tokens: tokens.clone(),
                    start_pos: pos,
                    all_logits: false,
                    sample: None,
                }],
                release: vec![],
            })
            .await
            .unwrap();
        let row: Vec<f32> = l[0].flatten_all().unwrap().to_vec1().unwrap();
        pos += tokens.len();
        let t = pick(&row);
        tokens = vec![t];
        picked.push(t);
        rows.push(row);
    }
    (rows, picked)
}

/// Largest elementwise difference.
pub fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Largest magnitude.
pub fn max_abs(a: &[Vec<f32>]) -> f32 {
    a.iter().flatten().map(|x| x.abs()).fold(0.0, f32::max)
}

/// Loads `spec` at every world size of `worlds` (in-process ranks) and checks it against
/// `reference` (a fixture's reference.json) and against the first world size. Returns the
/// first world size's logits per case.
pub fn check_reference(
    label: &str,
    spec: &LoadSpec,
    reference: &Path,
    worlds: std::ops::RangeInclusive<usize>,
) -> Vec<Vec<Vec<f32>>> {
    check_reference_on(label, spec, reference, worlds, LocalTransport::InProcess)
}

/// [`check_reference`] with ranks exchanging tensors over `transport`.
pub fn check_reference_on(
    label: &str,
    spec: &LoadSpec,
    reference: &Path,
    worlds: std::ops::RangeInclusive<usize>,
    transport: LocalTransport,
) -> Vec<Vec<Vec<f32>>> {
    let rt = rt();
    let reference = json(reference);
    let cases = reference["cases"].as_array().unwrap();
    let mut first: Vec<Vec<Vec<f32>>> = Vec::new();
    for world in worlds {
        rt.block_on(async {
            let c = loaded(spec, world, transport).await;
            for (k, case) in cases.iter().enumerate() {
                let input = ids(&case["input_ids"]);
                let ours = all_logits(&c, &input).await;
                let theirs: Vec<Vec<f32>> = case["logits"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(floats)
                    .collect();
                let d = max_abs_diff(&ours, &theirs);
                assert!(
                    d <= 1e-3,
                    "{label} world {world} case {k}: max |dlogit| {d}"
                );
                if first.len() < cases.len() {
                    first.push(ours.clone());
                } else {
                    let rel = max_abs_diff(&ours, &first[k]) / max_abs(&first[k]);
                    assert!(
                        rel <= 1e-5,
                        "{label} world {world} case {k}: {rel} from the first world size"
                    );
                }
                let want = ids(&case["greedy_ids"]);
                let got = greedy(&c, &input, want.len()).await;
                assert_eq!(got, want, "{label} world {world} case {k}: greedy tokens");
                if let Some(p) = case["perplexity"].as_f64() {
                    let (ppl, n) = perplexity(&c, &input, 1 << 20).await.unwrap();
                    assert_eq!(n, input.len() - 1);
                    assert!(
                        ((ppl - p) / p).abs() <= 1e-3,
                        "{label} world {world} case {k}: perplexity {ppl} vs {p}"
                    );
                }
            }
            c.shutdown().await.unwrap();
        });
    }
    first
}

/// Prefills three sequences of different lengths, then decodes `steps` greedy tokens for
/// each, either all three in one step (`batched`) or one sequence per step; every decode
/// step's logits per sequence.
pub async fn three_sequences(c: &Cluster, steps: usize, batched: bool) -> Vec<Vec<Vec<f32>>> {
    let prompts: [&[u32]; 3] = [&[5, 80, 31], &[7, 7, 200, 45, 9, 12, 100], &[250]];
    let mut next = Vec::new();
    let mut pos = Vec::new();
    for (id, p) in prompts.iter().enumerate() {
        let l = c
            .step(StepRequest {
                seqs: vec![SeqStep {
                    seq_id: id as u64 + 40,
                    tokens: p.to_vec(),
                    start_pos: 0,
                    all_logits: false,
                    sample: None,
                }],
                release: vec![],
            })
            .await
            .unwrap();
        next.push(argmax(
            &l[0].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        ));
        pos.push(p.len());
    }
    let mut out = vec![Vec::new(); 3];
    for _ in 0..steps {
        let seq = |i: usize| SeqStep {
            seq_id: i as u64 + 40,
            tokens: vec![next[i]],
            start_pos: pos[i],
            all_logits: false,
            sample: None,
        };
        let rows: Vec<candle_core::Tensor> = if batched {
            c.step(StepRequest {
                seqs: (0..3).map(seq).collect(),
                release: vec![],
            })
            .await
            .unwrap()
        } else {
            let mut rows = Vec::new();
            for i in 0..3 {
                let mut l = c
                    .step(StepRequest {
                        seqs: vec![seq(i)],
                        release: vec![],
                    })
                    .await
                    .unwrap();
                rows.push(l.remove(0));
            }
            rows
        };
        for (i, r) in rows.iter().enumerate() {
            let r: Vec<f32> = r.flatten_all().unwrap().to_vec1().unwrap();
            next[i] = argmax(&r);
            pos[i] += 1;
            out[i].push(r);
        }
    }
    out
}

/// Largest difference, per sequence, between [`three_sequences`] decoded in one step and one
/// sequence per step (`steps` steps each), on a fresh cluster of `world` ranks over
/// `transport` (f32 weights); the environment variable `batched_env` is set for the batched
/// steps only.
pub fn batched_vs_single(
    dir: &Path,
    world: usize,
    transport: LocalTransport,
    steps: usize,
    batched_env: Option<(&str, &str)>,
) -> [f32; 3] {
    let (batched, single) = rt().block_on(async {
        let c = loaded(&f32_spec(dir), world, transport).await;
        // Ranks read these settings at each step: only the batched steps see them.
        let before = batched_env.map(|(k, v)| {
            let was = std::env::var(k).ok();
            std::env::set_var(k, v);
            (k, was)
        });
        let b = three_sequences(&c, steps, true).await;
        match before {
            Some((k, Some(was))) => std::env::set_var(k, was),
            Some((k, None)) => std::env::remove_var(k),
            None => {}
        }
        let s = three_sequences(&c, steps, false).await;
        c.shutdown().await.unwrap();
        (b, s)
    });
    [0, 1, 2].map(|i| max_abs_diff(&batched[i], &single[i]))
}
