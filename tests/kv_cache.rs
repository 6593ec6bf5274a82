//! The GPU's fixed-capacity KV caches (buffers that keep their addresses, positions past the
//! sequence masked) against the CPU's growing caches, on the CPU: `SHARDWISE_FIXED_KV=1`
//! selects them, and decode steps then run the way CUDA graphs replay them (inputs from
//! device buffers, the cache written at an index tensor, attention over the whole capacity
//! under a mask), eagerly. 300 greedy steps cross the first capacity (256 positions), so the
//! caches also grow once. Alone in its own test binary, because it sets an environment variable.

mod common;

use common::reference::{fixtures, greedy_step_logits, max_abs_diff, with_env};
use shardwise::runtime::LocalTransport;

#[test]
fn fixed_capacity_kv_caches_match_growing_caches() {
    // tiny-llama: 9 query heads on 3 KV heads (uneven groups at 2 ranks); tiny-qwen3: q/k
    // norms, 3 query heads per KV head; tiny-mistral: one KV head, replicated at 2 ranks.
    for name in ["tiny-llama", "tiny-qwen3", "tiny-mistral"] {
        let dir = fixtures().join("models").join(name);
        for world in [1, 2] {
            let run = |fixed| {
                with_env("SHARDWISE_FIXED_KV", fixed, || {
                    greedy_step_logits(&dir, world, LocalTransport::InProcess, 300)
                })
            };
            let (growing, fixed) = (run(None), run(Some("1")));
            let d = max_abs_diff(&growing, &fixed);
            assert!(
                d <= 1e-5,
                "{name} at {world} rank(s): fixed caches are {d} away"
            );
        }
    }
}
