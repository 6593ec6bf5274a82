//! CPU threads per rank. candle's CPU kernels share one process-wide worker pool whose
//! callers spin at a barrier, and in-process ranks would take turns on it: N ranks in one
//! process (or N rank processes on one host) get `cores / N` kernel threads each, so the
//! ranks run side by side instead of spinning against each other.

/// Environment variables that size candle's pools (read once, at first use).
const POOL_VARS: [&str; 2] = ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"];

/// Kernel threads for each of `ranks` ranks sharing this host's cores.
pub fn per_rank(ranks: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / ranks.max(1)).max(1)
}

/// The environment settings for `ranks` ranks on this host, unless the user set them.
pub fn pool_env(ranks: usize) -> Vec<(&'static str, String)> {
    POOL_VARS
        .iter()
        .filter(|v| std::env::var_os(v).is_none())
        .map(|v| (*v, per_rank(ranks).to_string()))
        .collect()
}

/// Sizes this process's pools for `ranks` in-process ranks. Call before any kernel runs,
/// while the process has one thread (the start of `main`).
pub fn size_pools_for(ranks: usize) {
    for (k, v) in pool_env(ranks) {
        // SAFETY: called at the start of main, before any other thread exists.
        unsafe { std::env::set_var(k, v) };
    }
}
