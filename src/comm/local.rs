//! In-process collectives for ranks running on threads of one process.
//!
//! Ranks meet at a rendezvous guarded by a mutex and condition variable: each deposits its
//! tensor, the last to arrive publishes the full set, and every rank computes its result
//! from the set in rank order, so all ranks get bitwise-identical sums. A rank whose
//! handle is dropped leaves the group; the others then fail at once naming it, and a rank
//! that never arrives is named when the deadline passes.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use super::Communicator;
use crate::error::{Error, Result};

/// Default time a rank waits for its peers at a collective.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    AllReduce,
    AllGather,
    Broadcast,
    Barrier,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce_sum",
            Op::AllGather => "all_gather",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
        }
    }
}

#[derive(Debug)]
struct State {
    generation: u64,
    slots: Vec<Option<(Op, Option<Tensor>)>>,
    published: Deposits,
    departed: Vec<usize>,
}

#[derive(Debug)]
struct Shared {
    world_size: usize,
    timeout: Duration,
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LocalComm {
    /// Creates `world_size` communicators, one per rank, with the default deadline.
    ///
    /// # Errors
    /// `world_size` is zero.
    pub fn group(world_size: usize) -> Result<Vec<LocalComm>> {
        Self::group_with_timeout(world_size, DEFAULT_TIMEOUT)
    }

    /// Creates `world_size` communicators whose waits end after `timeout`.
    ///
    /// # Errors
    /// `world_size` is zero.
    pub fn group_with_timeout(world_size: usize, timeout: Duration) -> Result<Vec<LocalComm>> {
        if world_size == 0 {
            return Err(Error::Config {
                field: "world_size".into(),
                reason: "must be at least 1".into(),
            });
        }
        let shared = Arc::new(Shared {
            world_size,
            timeout,
            state: Mutex::new(State {
                generation: 0,
                slots: vec![None; world_size],
                published: Arc::new(Published::default()),
                departed: Vec::new(),
            }),
            cv: Condvar::new(),
        });
        Ok((0..world_size)
            .map(|rank| LocalComm {
                rank,
                shared: shared.clone(),
            })
            .collect())
    }
}

/// Every rank's deposit at one collective, in rank order, and the reduction computed once
/// for all of them (by whichever rank asks first; the others wait for it and share it).
#[derive(Debug, Default)]
struct Published {
    deposits: Vec<(Op, Option<Tensor>)>,
    sum: std::sync::OnceLock<std::result::Result<Tensor, String>>,
}

type Deposits = Arc<Published>;

/// One rank's handle on an in-process group. Dropping it tells the peers this rank is gone.
#[derive(Debug)]
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.departed.push(self.rank);
        drop(st);
        self.shared.cv.notify_all();
    }
}

impl LocalComm {
    fn err(&self, op: Op, reason: String) -> Error {
        Error::Comm {
            rank: self.rank,
            op: op.name(),
            reason,
        }
    }

    /// Deposits `t` and returns every rank's deposit once all have arrived.
    fn exchange(&self, op: Op, t: Option<&Tensor>) -> Result<Deposits> {
        let sh = &*self.shared;
        let mut st = sh.lock();
        if !st.departed.is_empty() {
            return Err(self.err(op, format!("rank(s) {:?} left the group", st.departed)));
        }
        let my_gen = st.generation;
        st.slots[self.rank] = Some((op, t.cloned()));
        if st.slots.iter().all(Option::is_some) {
            let set: Vec<_> = st.slots.iter_mut().filter_map(Option::take).collect();
            st.published = Arc::new(Published {
                deposits: set,
                sum: std::sync::OnceLock::new(),
            });
            st.generation += 1;
            let out = st.published.clone();
            drop(st);
            sh.cv.notify_all();
            return self.check_ops(op, out);
        }
        let deadline = Instant::now() + sh.timeout;
        while st.generation == my_gen {
            if !st.departed.is_empty() {
                return Err(self.err(op, format!("rank(s) {:?} left the group", st.departed)));
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> = (0..sh.world_size)
                    .filter(|&r| st.slots[r].is_none())
                    .collect();
                st.slots[self.rank] = None;
                return Err(self.err(
                    op,
                    format!(
                        "timed out after {:?} waiting for rank(s) {missing:?}",
                        sh.timeout
                    ),
                ));
            }
            st = sh
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let out = st.published.clone();
        drop(st);
        self.check_ops(op, out)
    }

    fn check_ops(&self, op: Op, set: Deposits) -> Result<Deposits> {
        if let Some((r, (other, _))) = set.deposits.iter().enumerate().find(|(_, (o, _))| *o != op)
        {
            return Err(self.err(
                op,
                format!("rank {r} called {} at the same step", other.name()),
            ));
        }
        Ok(set)
    }

    fn tensors<'a>(&self, op: Op, set: &'a [(Op, Option<Tensor>)]) -> Result<Vec<&'a Tensor>> {
        set.iter()
            .enumerate()
            .map(|(r, (_, t))| {
                t.as_ref()
                    .ok_or_else(|| self.err(op, format!("rank {r} sent no tensor")))
            })
            .collect()
    }

    fn check_same(&self, op: Op, ts: &[&Tensor], skip_dim: Option<usize>) -> Result<()> {
        let mine = ts[self.rank];
        for (r, t) in ts.iter().enumerate() {
            if let Some(m) = super::mismatch(t, mine, skip_dim) {
                return Err(self.err(op, format!("rank {r} {m}")));
            }
        }
        Ok(())
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world_size
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let op = Op::AllReduce;
        if !matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16) {
            return Err(self.err(op, format!("unsupported dtype {:?}", t.dtype())));
        }
        let set = self.exchange(op, Some(t))?;
        let ts = self.tensors(op, &set.deposits)?;
        self.check_same(op, &ts, None)?;
        // Summed once for the whole group, in rank order; half-precision inputs are summed in
        // f32 and rounded once.
        let sum = set.sum.get_or_init(|| {
            let add = || -> candle_core::Result<Tensor> {
                let mut acc = ts[0].to_dtype(DType::F32)?;
                for t in &ts[1..] {
                    acc = (acc + t.to_dtype(DType::F32)?)?;
                }
                acc.to_dtype(ts[0].dtype())
            };
            add().map_err(|e| e.to_string())
        });
        sum.clone().map_err(|e| self.err(op, e))
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        let op = Op::AllGather;
        if dim >= t.rank() {
            return Err(self.err(op, format!("dim {dim} out of range for {:?}", t.dims())));
        }
        let set = self.exchange(op, Some(t))?;
        let ts = self.tensors(op, &set.deposits)?;
        self.check_same(op, &ts, Some(dim))?;
        Ok(Tensor::cat(&ts, dim)?)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let op = Op::Broadcast;
        if root >= self.world_size() {
            return Err(self.err(op, format!("root {root} out of range")));
        }
        let set = self.exchange(op, Some(t))?;
        let ts = self.tensors(op, &set.deposits)?;
        self.check_same(op, &ts, None)?;
        Ok(ts[root].clone())
    }

    fn barrier(&self) -> Result<()> {
        self.exchange(Op::Barrier, None).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::suite;

    #[test]
    fn local_passes_the_transport_suite() {
        suite::run_all(|world| {
            Ok(
                LocalComm::group_with_timeout(world, Duration::from_secs(20))?
                    .into_iter()
                    .map(|c| Arc::new(c) as Arc<dyn Communicator>)
                    .collect(),
            )
        })
        .unwrap();
    }

    #[test]
    fn dead_rank_is_named_not_hung() {
        let mut comms = LocalComm::group_with_timeout(3, Duration::from_secs(30)).unwrap();
        let c2 = comms.pop().unwrap();
        drop(c2);
        let t = Tensor::ones(4, DType::F32, &candle_core::Device::Cpu).unwrap();
        let e = comms[0].all_reduce_sum(&t).unwrap_err().to_string();
        assert!(e.contains("rank(s) [2] left"), "{e}");
    }

    #[test]
    fn late_rank_times_out_with_its_number() {
        let comms = LocalComm::group_with_timeout(2, Duration::from_millis(200)).unwrap();
        let e = comms[0].barrier().unwrap_err().to_string();
        assert!(e.contains("waiting for rank(s) [1]"), "{e}");
    }
}
