//! The transport suite over shared memory, plus tokens, dead peers and cleanup.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use shardwise::comm::shm::{ShmComm, ShmConfig};
use shardwise::comm::{each_rank, suite, Communicator};
use shardwise::Result;

static GROUP: AtomicUsize = AtomicUsize::new(0);

fn name() -> String {
    format!(
        "test-{}-{}",
        std::process::id(),
        GROUP.fetch_add(1, Ordering::SeqCst)
    )
}

fn config(slot_bytes: usize) -> ShmConfig {
    ShmConfig {
        timeout: Duration::from_secs(20),
        connect_timeout: Duration::from_secs(10),
        slot_bytes,
        ..ShmConfig::new("suite-token")
    }
}

fn group_with(name: &str, cfgs: Vec<ShmConfig>) -> Vec<Result<ShmComm>> {
    let world = cfgs.len();
    each_rank(cfgs, |r, c| Ok(ShmComm::connect(name, r, world, &c))).unwrap()
}

fn group(world: usize, slot: usize) -> Result<Vec<Arc<dyn Communicator>>> {
    group_with(&name(), vec![config(slot); world])
        .into_iter()
        .map(|c| c.map(|c| Arc::new(c) as Arc<dyn Communicator>))
        .collect()
}

#[test]
fn shm_passes_the_transport_suite() {
    suite::run_all(|w| group(w, 1 << 20)).unwrap();
}

#[test]
fn shm_with_tiny_slots_passes_the_suite() {
    // Many chunks per all-reduce and many rounds per all-gather.
    for world in [2, 3, 5] {
        suite::check_all_reduce(&|w| group(w, 4096), world).unwrap();
        suite::check_lengths(&|w| group(w, 4096), world).unwrap();
        suite::check_all_gather(&|w| group(w, 4096), world).unwrap();
    }
}

#[test]
fn wrong_token_is_refused_and_nothing_is_left_behind() {
    let n = name();
    let mut cfgs = vec![config(1 << 16); 2];
    cfgs[1].token = "another".into();
    for c in &mut cfgs {
        c.connect_timeout = Duration::from_secs(2);
    }
    let res = group_with(&n, cfgs);
    let e = res[1].as_ref().unwrap_err().to_string();
    assert!(e.contains("another cluster token"), "{e}");
    assert!(res[0].is_err(), "rank 0 must not form a group alone");
    assert!(!std::path::Path::new(&format!("/dev/shm/shardwise-{n}")).exists());
}

#[test]
fn group_file_is_unlinked_once_attached() {
    let n = name();
    let comms = group_with(&n, vec![config(1 << 16); 3]);
    assert!(comms.iter().all(|c| c.is_ok()));
    assert!(!std::path::Path::new(&format!("/dev/shm/shardwise-{n}")).exists());
}

#[test]
fn a_failing_rank_stops_its_peers_at_once() {
    let comms: Vec<_> = group_with(&name(), vec![config(1 << 16); 3])
        .into_iter()
        .map(|c| c.unwrap())
        .collect();
    let errs = each_rank(comms.iter().collect(), |r, c| {
        // Rank 1 brings a tensor of another length.
        let n = if r == 1 { 10 } else { 12 };
        let t = Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
        Ok(c.all_reduce_sum(&t).unwrap_err().to_string())
    })
    .unwrap();
    for e in &errs {
        assert!(e.contains("rank 1"), "{e}");
    }
}
