//! Point-to-point links over shared memory, for the pairs of a group that share a host.
//!
//! Each ordered pair of local ranks has a single-producer, single-consumer byte ring in one
//! group file (created and attached like the shared-memory collectives' file). `send` queues
//! the frame for a writer thread and returns at once, as the gRPC links do (collectives rely
//! on sends never blocking); the writer copies it into the ring when there is room. `recv` reads the next record straight
//! out of the ring. Waits spin briefly, then sleep on futexes in the ring header; every wait
//! has a deadline and checks that the peer process is alive.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use memmap2::MmapMut;

use super::links::Links;
use super::shm::{
    attach_group, futex_wait, futex_wake, member_pid, pid_alive, ShmConfig, DATA_OFFSET,
};
use crate::error::{Error, Result};
use crate::proto::Frame;

const RING_HEADER: usize = 64;

/// The mapping, shared by the links and their writer threads.
struct Mapping(MmapMut);

// SAFETY: all cross-thread access to the mapping goes through atomics (ring heads, tails,
// futex words) or through byte ranges that the single-producer/single-consumer protocol
// gives to one thread at a time.
unsafe impl Sync for Mapping {}

/// One direction of one pair.
#[derive(Clone, Copy)]
struct Ring {
    base: *mut u8,
    cap: usize,
}

// SAFETY: `base` points into a mapping kept alive by an `Arc<Mapping>` held alongside.
unsafe impl Send for Ring {}

impl Ring {
    fn head(&self) -> &AtomicU64 {
        // SAFETY: 8-aligned offset in the ring header.
        unsafe { &*(self.base as *const AtomicU64) }
    }
    fn tail(&self) -> &AtomicU64 {
        // SAFETY: as above.
        unsafe { &*(self.base.add(8) as *const AtomicU64) }
    }
    fn head_word(&self) -> &AtomicU32 {
        // SAFETY: 4-aligned offset in the ring header.
        unsafe { &*(self.base.add(16) as *const AtomicU32) }
    }
    fn tail_word(&self) -> &AtomicU32 {
        // SAFETY: as above.
        unsafe { &*(self.base.add(20) as *const AtomicU32) }
    }
    fn data(&self) -> *mut u8 {
        // SAFETY: the data area follows the header inside the mapping.
        unsafe { self.base.add(RING_HEADER) }
    }

    /// Copies `src` into the ring at stream position `pos` (wrapping).
    fn put(&self, pos: u64, src: &[u8]) {
        let at = (pos % self.cap as u64) as usize;
        let first = src.len().min(self.cap - at);
        // SAFETY: both pieces lie inside the data area; the producer owns [head, tail + cap).
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.data().add(at), first);
            std::ptr::copy_nonoverlapping(src.as_ptr().add(first), self.data(), src.len() - first);
        }
    }

    /// Copies ring bytes at stream position `pos` into `dst` (wrapping).
    fn get(&self, pos: u64, dst: &mut [u8]) {
        let at = (pos % self.cap as u64) as usize;
        let first = dst.len().min(self.cap - at);
        // SAFETY: both pieces lie inside the data area; the consumer owns [tail, head).
        unsafe {
            std::ptr::copy_nonoverlapping(self.data().add(at), dst.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(
                self.data(),
                dst.as_mut_ptr().add(first),
                dst.len() - first,
            );
        }
    }
}

/// Waits until `ready()`; spins briefly, then sleeps on `word`, checking the deadline and
/// that `peer_pid` lives.
fn wait(
    word: &AtomicU32,
    ready: impl Fn() -> bool,
    deadline: Instant,
    peer_pid: u32,
) -> std::result::Result<(), String> {
    for _ in 0..2000 {
        if ready() {
            return Ok(());
        }
        std::hint::spin_loop();
    }
    loop {
        let seen = word.load(Ordering::Acquire);
        if ready() {
            return Ok(());
        }
        futex_wait(word, seen, Duration::from_millis(50));
        if ready() {
            return Ok(());
        }
        if !pid_alive(peer_pid) {
            return Err(format!("exited (pid {peer_pid})"));
        }
        if Instant::now() >= deadline {
            return Err("timed out".into());
        }
    }
}

fn encode(f: &Frame) -> Vec<u8> {
    let len = 4 + 8 + 4 * 4 + 8 * f.shape.len() + f.data.len();
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&(len as u32).to_le_bytes());
    v.extend_from_slice(&f.seq.to_le_bytes());
    for x in [f.step, f.chunk, f.dtype, f.shape.len() as u32] {
        v.extend_from_slice(&x.to_le_bytes());
    }
    for d in &f.shape {
        v.extend_from_slice(&d.to_le_bytes());
    }
    v.extend_from_slice(&f.data);
    v
}

fn decode(rec: &[u8]) -> Option<Frame> {
    let u32_at = |o: usize| Some(u32::from_le_bytes(rec.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(rec.get(o..o + 8)?.try_into().ok()?));
    let nshape = u32_at(24)? as usize;
    let shape = (0..nshape)
        .map(|i| u64_at(28 + 8 * i))
        .collect::<Option<Vec<_>>>()?;
    let data_at = 28 + 8 * nshape;
    Some(Frame {
        seq: u64_at(4)?,
        step: u32_at(12)?,
        chunk: u32_at(16)?,
        dtype: u32_at(20)?,
        shape,
        data: Bytes::copy_from_slice(rec.get(data_at..)?),
    })
}

/// Links between the ranks of one host.
pub struct ShmLinks {
    rank: usize,
    world: usize,
    /// Global ranks on this host; a rank's index here is its local index.
    local: Vec<usize>,
    me: usize,
    map: Arc<Mapping>,
    cap: usize,
    queues: Vec<Option<std_mpsc::Sender<Frame>>>,
    writers: Vec<std::thread::JoinHandle<()>>,
    failed: Arc<Mutex<Option<String>>>,
    timeout: Duration,
    addrs: Vec<String>,
}

impl std::fmt::Debug for ShmLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ShmLinks(rank {} with local ranks {:?})",
            self.rank, self.local
        )
    }
}

impl ShmLinks {
    /// Attaches rank `rank` to the links of the host group `local` (global ranks, sorted;
    /// `rank` among them), through the group file `name`. `ring_bytes` bounds one frame.
    ///
    /// # Errors
    /// As [`super::shm::ShmComm::connect`].
    pub fn connect(
        name: &str,
        rank: usize,
        addrs: &[String],
        local: &[usize],
        cfg: &ShmConfig,
        ring_bytes: usize,
    ) -> Result<Self> {
        let me = local
            .iter()
            .position(|&r| r == rank)
            .ok_or_else(|| Error::Config {
                field: "rank".into(),
                reason: format!("rank {rank} is not among the host's ranks {local:?}"),
            })?;
        let n = local.len();
        let cap = ring_bytes.next_multiple_of(64);
        let map = Arc::new(Mapping(attach_group(
            name,
            me,
            n,
            cfg,
            n * n * (RING_HEADER + cap),
        )?));
        let mut links = Self {
            rank,
            world: addrs.len(),
            local: local.to_vec(),
            me,
            map,
            cap,
            queues: (0..addrs.len()).map(|_| None).collect(),
            writers: Vec::new(),
            failed: Arc::new(Mutex::new(None)),
            timeout: cfg.timeout,
            addrs: addrs.to_vec(),
        };
        for (j, &peer) in local.iter().enumerate().filter(|&(j, _)| j != me) {
            let (tx, rx) = std_mpsc::channel::<Frame>();
            let ring = links.ring(me, j);
            let (map, failed, timeout, cap) =
                (links.map.clone(), links.failed.clone(), links.timeout, cap);
            let pid = member_pid(&links.map.0, j);
            let who = links.peer(peer);
            links.writers.push(std::thread::spawn(move || {
                let _keep = map;
                for f in rx {
                    let rec = encode(&f);
                    if rec.len() > cap {
                        *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!(
                            "frame of {} bytes exceeds the {cap}-byte ring to {who}",
                            rec.len()
                        ));
                        return;
                    }
                    let head = ring.head().load(Ordering::Relaxed);
                    let room = || {
                        head + rec.len() as u64 - ring.tail().load(Ordering::Acquire) <= cap as u64
                    };
                    if let Err(e) = wait(ring.tail_word(), room, Instant::now() + timeout, pid) {
                        *failed.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some(format!("{who} {e} while receiving"));
                        return;
                    }
                    ring.put(head, &rec);
                    ring.head()
                        .store(head + rec.len() as u64, Ordering::Release);
                    ring.head_word().fetch_add(1, Ordering::Release);
                    futex_wake(ring.head_word());
                }
            }));
            links.queues[peer] = Some(tx);
        }
        Ok(links)
    }

    fn ring(&self, from: usize, to: usize) -> Ring {
        let n = self.local.len();
        // SAFETY: the offset is inside the mapping (sized n * n rings after the header).
        let base = unsafe {
            self.map
                .0
                .as_ptr()
                .add(DATA_OFFSET + (from * n + to) * (RING_HEADER + self.cap))
                as *mut u8
        };
        Ring {
            base,
            cap: self.cap,
        }
    }

    fn err(&self, op: &'static str, reason: String) -> Error {
        Error::Comm {
            rank: self.rank,
            op,
            reason,
        }
    }

    /// True when `peer` is reached through these links.
    pub fn has(&self, peer: usize) -> bool {
        peer != self.rank && self.local.contains(&peer)
    }
}

impl Links for ShmLinks {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn send(&self, to: usize, frame: Frame) -> Result<()> {
        if let Some(why) = self
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Err(self.err("send", why));
        }
        let q = self
            .queues
            .get(to)
            .and_then(Option::as_ref)
            .ok_or_else(|| self.err("send", format!("no shared-memory link to rank {to}")))?;
        q.send(frame)
            .map_err(|_| self.err("send", format!("{} is gone", self.peer(to))))
    }

    fn recv(&self, from: usize) -> Result<Frame> {
        let j = self
            .local
            .iter()
            .position(|&r| r == from)
            .filter(|&j| j != self.me)
            .ok_or_else(|| self.err("recv", format!("no shared-memory link from rank {from}")))?;
        let ring = self.ring(j, self.me);
        let tail = ring.tail().load(Ordering::Relaxed);
        let ready = || ring.head().load(Ordering::Acquire) > tail;
        let pid = member_pid(&self.map.0, j);
        wait(ring.head_word(), ready, Instant::now() + self.timeout, pid)
            .map_err(|e| self.err("recv", format!("{} {e}", self.peer(from))))?;
        let mut len = [0u8; 4];
        ring.get(tail, &mut len);
        let len = u32::from_le_bytes(len) as usize;
        let mut rec = vec![0u8; len];
        ring.get(tail, &mut rec);
        ring.tail().store(tail + len as u64, Ordering::Release);
        ring.tail_word().fetch_add(1, Ordering::Release);
        futex_wake(ring.tail_word());
        decode(&rec).ok_or_else(|| {
            self.err(
                "recv",
                format!("{} sent a malformed record", self.peer(from)),
            )
        })
    }

    fn peer(&self, rank: usize) -> String {
        format!(
            "rank {rank} ({}, shared memory)",
            self.addrs.get(rank).map_or("?", |s| s.as_str())
        )
    }
}

impl Drop for ShmLinks {
    fn drop(&mut self) {
        // Writers drain their queues into the rings, then stop.
        self.queues.clear();
        for w in self.writers.drain(..) {
            let _ = w.join();
        }
    }
}
