//! Shared-memory collectives for the ranks of one host.
//!
//! Ranks map one file under `/dev/shm`. Each rank has a slot; an all-reduce copies a chunk
//! into its slot, waits at a barrier, sums its own portion of the chunk over every slot (in
//! rank order) into a shared result area, waits again, and copies the result out. Every
//! element is summed once, in the same order, so all ranks get identical bytes. Two sets of
//! slots alternate so that a chunk needs two barriers, not three.
//!
//! Barriers spin briefly and then sleep on a futex in the shared page, so idle ranks do not
//! burn a core. While waiting, a rank checks that its peers' processes are alive: a peer that
//! died is named (rank and pid) at once, and every wait has a deadline.
//!
//! Rank 0 creates the file (mode 0600, under a temporary name, then renamed into place) with
//! a tag derived from the cluster token; the others refuse a file whose tag does not match.
//! Once every rank has attached, rank 0 unlinks the file: the mapping lives on, and nothing
//! is left behind in `/dev/shm` even if a rank crashes later.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use hmac::Mac;
use memmap2::MmapMut;

use super::wire::{self, WireElem};
use super::Communicator;
use crate::error::{Error, Result};

const MAGIC: u64 = 0x5348_4152_4457_5331; // "SHARDWS1"
const VERSION: u32 = 1;
/// Most ranks one shared-memory group can hold.
pub const MAX_WORLD: usize = 256;
const HEADER: usize = 16384;
// Header offsets.
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_WORLD: usize = 12;
const OFF_SLOT: usize = 16;
const OFF_CREATOR: usize = 24;
const OFF_ABORT: usize = 28;
const OFF_ARRIVE: usize = 32;
const OFF_GEN: usize = 36;
const OFF_TAG: usize = 40;
const OFF_PIDS: usize = 128;
const OFF_LENS: usize = OFF_PIDS + 4 * MAX_WORLD;
const OFF_REASON: usize = OFF_LENS + 8 * MAX_WORLD;
const REASON_LEN: usize = 1024;

/// Settings of a shared-memory group.
#[derive(Debug, Clone)]
pub struct ShmConfig {
    /// Cluster token (the same secret on every rank).
    pub token: String,
    /// Deadline of every wait inside a collective.
    pub timeout: Duration,
    /// Deadline for every rank to attach.
    pub connect_timeout: Duration,
    /// Bytes per rank slot (the chunk size of a transfer).
    pub slot_bytes: usize,
    /// Directory holding the shared file.
    pub dir: PathBuf,
}

impl ShmConfig {
    /// Defaults with the given token: 60 s deadline, 30 s to attach, 1 MiB slots (measured
    /// best on a 2-core host: slot sets stay in cache), `/dev/shm`.
    pub fn new(token: impl Into<String>) -> Self {
        Self {
            token: token.into(),
            timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(30),
            slot_bytes: super::env_usize("SHARDWISE_SHM_SLOT_BYTES", 1 << 20),
            dir: PathBuf::from("/dev/shm"),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    phase: u64,
    poisoned: Option<String>,
}

/// A communicator over shared memory (ranks are processes, or threads, of one host).
#[derive(Debug)]
pub struct ShmComm {
    rank: usize,
    world: usize,
    slot: usize,
    map: MmapMut,
    timeout: Duration,
    state: Mutex<State>,
}

pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    #[cfg(target_os = "linux")]
    {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `word` points into a live shared mapping; FUTEX_WAIT only reads it.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAIT,
                expected,
                &ts as *const libc::timespec,
                std::ptr::null::<u32>(),
                0,
            )
        };
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (word, expected);
        std::thread::sleep(timeout.min(Duration::from_micros(50)));
    }
}

pub(crate) fn futex_wake(word: &AtomicU32) {
    #[cfg(target_os = "linux")]
    // SAFETY: as above; FUTEX_WAKE does not touch memory.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            0,
            0,
            0,
        )
    };
    #[cfg(not(target_os = "linux"))]
    let _ = word;
}

pub(crate) fn pid_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    let exists = rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
    // A killed process stays a zombie until its parent reaps it: it exists but is dead.
    exists && !is_zombie(pid)
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Field 3, after the parenthesised command name (which may contain spaces).
            let after = &s[s.rfind(')')? + 1..];
            after
                .split_whitespace()
                .next()
                .map(|st| st == "Z" || st == "X")
        })
        .unwrap_or(false)
}

fn tag(token: &str, name: &str, world: usize) -> [u8; 32] {
    let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(token.as_bytes())
        .unwrap_or_else(|_| unreachable!());
    m.update(b"shardwise-shm");
    m.update(name.as_bytes());
    m.update(&(world as u64).to_le_bytes());
    m.finalize().into_bytes().into()
}

impl ShmComm {
    /// Creates (rank 0) or attaches to (other ranks) the group `name` and waits until every
    /// rank has attached.
    ///
    /// # Errors
    /// Bad rank or world size, I/O errors naming the file, a file made with another token or
    /// world size, or ranks that do not attach before the deadline (named).
    pub fn connect(name: &str, rank: usize, world: usize, cfg: &ShmConfig) -> Result<Self> {
        let slot = cfg.slot_bytes.max(4096).next_multiple_of(64);
        let map = attach_group(name, rank, world, cfg, 2 * (world + 1) * slot)?;
        Ok(Self {
            rank,
            world,
            slot,
            map,
            timeout: cfg.timeout,
            state: Mutex::new(State::default()),
        })
    }

    /// Maps `path` if it is a live group made with our token and world size; `None` while
    /// it is absent or stale (its creator is gone).
    pub(crate) fn try_attach(
        path: &PathBuf,
        world: usize,
        my_tag: &[u8; 32],
    ) -> Result<Option<MmapMut>> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(Error::Io {
                    path: path.clone(),
                    source,
                })
            }
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0) as usize;
        if len < HEADER {
            return Ok(None);
        }
        // SAFETY: the file is a shardwise group file (checked below before any use).
        let map = unsafe { MmapMut::map_mut(&file) }.map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let u32_at = |o: usize| u32::from_le_bytes([map[o], map[o + 1], map[o + 2], map[o + 3]]);
        let magic =
            u64::from_le_bytes(map[OFF_MAGIC..OFF_MAGIC + 8].try_into().unwrap_or_default());
        if magic != MAGIC || !pid_alive(u32_at(OFF_CREATOR)) {
            return Ok(None);
        }
        let bad = |reason: String| Error::BadFile {
            file: path.clone(),
            reason,
        };
        if u32_at(OFF_VERSION) != VERSION {
            return Err(bad(format!(
                "group file version {} (this is {VERSION})",
                u32_at(OFF_VERSION)
            )));
        }
        if u32_at(OFF_WORLD) as usize != world {
            return Err(bad(format!(
                "group of {} ranks, this rank expects {world}",
                u32_at(OFF_WORLD)
            )));
        }
        if &map[OFF_TAG..OFF_TAG + 32] != my_tag {
            return Err(bad("created with another cluster token: refused".into()));
        }
        Ok(Some(map))
    }

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        // SAFETY: `off` is a 4-aligned offset inside the header of a page-aligned mapping that
        // lives as long as `self`; all cross-process access to it is atomic.
        unsafe { &*(self.map.as_ptr().add(off) as *const AtomicU32) }
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        // SAFETY: as `u32_at`, 8-aligned.
        unsafe { &*(self.map.as_ptr().add(off) as *const AtomicU64) }
    }

    fn err(&self, op: &'static str, reason: String) -> Error {
        Error::Comm {
            rank: self.rank,
            op,
            reason,
        }
    }

    /// Byte offset of rank `r`'s slot (`r == world` is the result area) in buffer set `set`.
    fn slot_off(&self, set: usize, r: usize) -> usize {
        HEADER + (set * (self.world + 1) + r) * self.slot
    }

    fn slot_ptr(&self, set: usize, r: usize) -> *mut u8 {
        // SAFETY: the offset is inside the mapping (size computed from the same formula).
        unsafe { self.map.as_ptr().add(self.slot_off(set, r)) as *mut u8 }
    }

    fn check_abort(&self, op: &'static str) -> Result<()> {
        let a = self.u32_at(OFF_ABORT).load(Ordering::Acquire);
        if a != 0 {
            let reason = &self.map[OFF_REASON..OFF_REASON + REASON_LEN];
            let end = reason.iter().position(|&b| b == 0).unwrap_or(REASON_LEN);
            return Err(self.err(
                op,
                format!(
                    "rank {} aborted: {}",
                    a - 1,
                    String::from_utf8_lossy(&reason[..end])
                ),
            ));
        }
        Ok(())
    }

    fn dead_peer(&self) -> Option<(usize, u32)> {
        (0..self.world).filter(|&r| r != self.rank).find_map(|r| {
            let pid = self.u32_at(OFF_PIDS + 4 * r).load(Ordering::Relaxed);
            (pid != 0 && !pid_alive(pid)).then_some((r, pid))
        })
    }

    /// Waits until every rank has arrived; spins briefly, then sleeps on the futex.
    fn barrier_wait(&self, op: &'static str) -> Result<()> {
        let arrive = self.u32_at(OFF_ARRIVE);
        let gen_word = self.u32_at(OFF_GEN);
        let gen = gen_word.load(Ordering::Acquire);
        if arrive.fetch_add(1, Ordering::AcqRel) + 1 == self.world as u32 {
            arrive.store(0, Ordering::Relaxed);
            gen_word.fetch_add(1, Ordering::Release);
            futex_wake(gen_word);
            return Ok(());
        }
        for _ in 0..2000 {
            if gen_word.load(Ordering::Acquire) != gen {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            futex_wait(gen_word, gen, Duration::from_millis(50));
            if gen_word.load(Ordering::Acquire) != gen {
                return Ok(());
            }
            self.check_abort(op)?;
            if let Some((r, pid)) = self.dead_peer() {
                return Err(self.err(op, format!("rank {r} (pid {pid}) exited")));
            }
            if Instant::now() >= deadline {
                return Err(self.err(
                    op,
                    format!("timed out after {:?} at a barrier", self.timeout),
                ));
            }
        }
    }

    /// Numbers the collective, refuses if the group is broken, and on failure records the
    /// reason in the shared header so every peer stops at its next wait.
    fn run<T>(&self, op: &'static str, f: impl FnOnce(&mut u64) -> Result<T>) -> Result<T> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = &st.poisoned {
            return Err(self.err(op, format!("group is broken by an earlier error: {p}")));
        }
        self.check_abort(op)?;
        let out = f(&mut st.phase);
        if let Err(e) = &out {
            let reason = e.to_string();
            st.poisoned = Some(reason.clone());
            let abort = self.u32_at(OFF_ABORT);
            if abort
                .compare_exchange(0, self.rank as u32 + 1, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                let bytes = reason.as_bytes();
                let n = bytes.len().min(REASON_LEN - 1);
                // SAFETY: the reason area lies inside the header; only the rank that won the
                // compare-exchange writes it.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        self.map.as_ptr().add(OFF_REASON) as *mut u8,
                        n,
                    )
                };
            }
            futex_wake(self.u32_at(OFF_GEN));
        }
        out
    }

    /// `meta` (element count and dtype) is checked against every rank's at the first
    /// barrier: a mismatch would otherwise corrupt the slots.
    fn all_reduce_typed<T: WireElem>(
        &self,
        phase: &mut u64,
        input: &[T],
        meta: u64,
    ) -> Result<Vec<T>> {
        let w = self.world;
        if w == 1 {
            return Ok(input.to_vec());
        }
        let mut output = crate::mem::huge_vec::<T>(input.len());
        self.u64_at(OFF_LENS + 8 * self.rank)
            .store(meta, Ordering::Release);
        let mut checked = false;
        let per = self.slot / T::SIZE;
        let mut start = 0;
        loop {
            let m = per.min(input.len() - start);
            let set = (*phase % 2) as usize;
            *phase += 1;
            let chunk = &input[start..start + m];
            // SAFETY: our slot holds `slot` bytes >= m * T::SIZE; no other rank writes it.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    chunk.as_ptr() as *const u8,
                    self.slot_ptr(set, self.rank),
                    m * T::SIZE,
                )
            };
            self.barrier_wait("all_reduce_sum")?;
            if !checked {
                checked = true;
                if let Some(r) =
                    (0..w).find(|&r| self.u64_at(OFF_LENS + 8 * r).load(Ordering::Acquire) != meta)
                {
                    return Err(self.err(
                        "all_reduce_sum",
                        format!(
                            "rank {r} has another element count or dtype than rank {}",
                            self.rank
                        ),
                    ));
                }
            }
            let (base, extra) = (m / w, m % w);
            let a = self.rank * base + self.rank.min(extra);
            let len = base + usize::from(self.rank < extra);
            let parts: Vec<&[u8]> = (0..w)
                .map(|q| {
                    // SAFETY: rank q finished writing its slot before the barrier; it is only
                    // read until the next barrier, and rewritten two chunks later.
                    unsafe {
                        std::slice::from_raw_parts(
                            self.slot_ptr(set, q).add(a * T::SIZE),
                            len * T::SIZE,
                        )
                    }
                })
                .collect();
            // SAFETY: our portion of the result area is written only by us, and is aligned
            // (slot offsets are multiples of 64, `a * T::SIZE` a multiple of T::SIZE).
            let out = unsafe {
                std::slice::from_raw_parts_mut((self.slot_ptr(set, w) as *mut T).add(a), len)
            };
            T::sum_parts(out, &parts);
            self.barrier_wait("all_reduce_sum")?;
            // SAFETY: the whole result chunk was written before the barrier, and the result
            // area is aligned for `T`.
            let result =
                unsafe { std::slice::from_raw_parts(self.slot_ptr(set, w) as *const T, m) };
            output.extend_from_slice(result);
            start += m;
            if start >= input.len() {
                break;
            }
        }
        Ok(output)
    }

    /// Every rank's byte blob (any lengths), through the slots in rounds.
    fn exchange(&self, phase: &mut u64, op: &'static str, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.u64_at(OFF_LENS + 8 * self.rank)
            .store(mine.len() as u64, Ordering::Release);
        self.barrier_wait(op)?;
        let lens: Vec<usize> = (0..self.world)
            .map(|r| self.u64_at(OFF_LENS + 8 * r).load(Ordering::Acquire) as usize)
            .collect();
        let longest = lens.iter().copied().max().unwrap_or(0);
        let mut out: Vec<Vec<u8>> = lens.iter().map(|&l| Vec::with_capacity(l)).collect();
        let rounds = longest.div_ceil(self.slot).max(1);
        for k in 0..rounds {
            let set = (*phase % 2) as usize;
            *phase += 1;
            let lo = (k * self.slot).min(mine.len());
            let hi = ((k + 1) * self.slot).min(mine.len());
            // SAFETY: our slot, at most `slot` bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    mine[lo..hi].as_ptr(),
                    self.slot_ptr(set, self.rank),
                    hi - lo,
                )
            };
            self.barrier_wait(op)?;
            for (r, o) in out.iter_mut().enumerate() {
                let lo = (k * self.slot).min(lens[r]);
                let hi = ((k + 1) * self.slot).min(lens[r]);
                // SAFETY: rank r wrote these bytes before the barrier.
                o.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(self.slot_ptr(set, r), hi - lo)
                });
            }
        }
        Ok(out)
    }
}

/// Creates (rank 0) or attaches to (other ranks) the group file `name`: a header followed by
/// `data_bytes` of data, mode 0600, published by rename, tagged with the token. Records this
/// process's pid, waits until all `world` members have attached, then rank 0 unlinks the
/// file (every member has it mapped by then).
///
/// # Errors
/// Bad rank, world size, name or token; I/O errors naming the file; a file made with another
/// token or world size; members that do not attach before the deadline (named).
pub(crate) fn attach_group(
    name: &str,
    rank: usize,
    world: usize,
    cfg: &ShmConfig,
    data_bytes: usize,
) -> Result<MmapMut> {
    let bad = |field: &str, reason: String| Error::Config {
        field: field.into(),
        reason,
    };
    if world == 0 || world > MAX_WORLD || rank >= world {
        return Err(bad(
            "world_size",
            format!("rank {rank} of {world} (at most {MAX_WORLD})"),
        ));
    }
    if cfg.token.is_empty() {
        return Err(bad("token", "empty; set SHARDWISE_TOKEN".into()));
    }
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(bad(
            "shm name",
            format!("`{name}`: use letters, digits, - _ ."),
        ));
    }
    let size = HEADER + data_bytes;
    let path = cfg.dir.join(format!("shardwise-{name}"));
    let io = |p: &PathBuf| {
        let p = p.clone();
        move |source| Error::Io { path: p, source }
    };
    let my_tag = tag(&cfg.token, name, world);
    let deadline = Instant::now() + cfg.connect_timeout;
    let pid = std::process::id();
    let comm_err = |reason: String| Error::Comm {
        rank,
        op: "connect",
        reason,
    };
    let map = if rank == 0 {
        let tmp = cfg.dir.join(format!(".shardwise-{name}.{pid}.tmp"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        file.set_len(size as u64).map_err(io(&tmp))?;
        // SAFETY: a fresh private file of the right size; other processes map it only
        // after the rename below publishes it.
        let mut map = unsafe { MmapMut::map_mut(&file) }.map_err(io(&tmp))?;
        map[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&VERSION.to_le_bytes());
        map[OFF_WORLD..OFF_WORLD + 4].copy_from_slice(&(world as u32).to_le_bytes());
        map[OFF_SLOT..OFF_SLOT + 8].copy_from_slice(&(data_bytes as u64).to_le_bytes());
        map[OFF_CREATOR..OFF_CREATOR + 4].copy_from_slice(&pid.to_le_bytes());
        map[OFF_TAG..OFF_TAG + 32].copy_from_slice(&my_tag);
        map[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAGIC.to_le_bytes());
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        map
    } else {
        loop {
            match ShmComm::try_attach(&path, world, &my_tag)? {
                Some(map) => break map,
                None if Instant::now() >= deadline => {
                    return Err(comm_err(format!(
                        "rank 0 did not create {} within {:?}",
                        path.display(),
                        cfg.connect_timeout
                    )))
                }
                None => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    };
    let pid_at = |r: usize| {
        // SAFETY: 4-aligned offset inside the header of the live mapping.
        unsafe { &*(map.as_ptr().add(OFF_PIDS + 4 * r) as *const AtomicU32) }
    };
    pid_at(rank).store(pid, Ordering::SeqCst);
    loop {
        let missing: Vec<usize> = (0..world)
            .filter(|&r| pid_at(r).load(Ordering::SeqCst) == 0)
            .collect();
        if missing.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            if rank == 0 {
                let _ = std::fs::remove_file(&path);
            }
            return Err(comm_err(format!(
                "rank(s) {missing:?} did not attach within {:?}",
                cfg.connect_timeout
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // Every member has mapped the file (a pid is written after mapping): drop the name.
    if rank == 0 {
        let _ = std::fs::remove_file(&path);
    }
    Ok(map)
}

/// Pid of member `r` of a group mapping.
pub(crate) fn member_pid(map: &MmapMut, r: usize) -> u32 {
    // SAFETY: 4-aligned offset inside the header of the live mapping.
    unsafe { &*(map.as_ptr().add(OFF_PIDS + 4 * r) as *const AtomicU32) }.load(Ordering::Relaxed)
}

/// Offset of the data area in a group mapping.
pub(crate) const DATA_OFFSET: usize = HEADER;

/// A tensor as a blob: `[ndims][dims…][dtype code]` as u64 little-endian, then the data.
fn encode(t: &Tensor) -> Result<Vec<u8>> {
    let code = wire::dtype_code(t.dtype()).ok_or_else(|| Error::Config {
        field: "dtype".into(),
        reason: format!("{:?} cannot be sent", t.dtype()),
    })?;
    let mut v = Vec::new();
    v.extend_from_slice(&(t.rank() as u64).to_le_bytes());
    for &d in t.dims() {
        v.extend_from_slice(&(d as u64).to_le_bytes());
    }
    v.extend_from_slice(&u64::from(code).to_le_bytes());
    v.extend_from_slice(&wire::tensor_to_bytes(t)?);
    Ok(v)
}

fn decode(b: &[u8]) -> Result<Tensor> {
    let bad = || Error::Config {
        field: "shm blob".into(),
        reason: "malformed tensor".into(),
    };
    let word = |i: usize| -> Result<usize> {
        Ok(u64::from_le_bytes(
            b.get(8 * i..8 * i + 8)
                .ok_or_else(bad)?
                .try_into()
                .map_err(|_| bad())?,
        ) as usize)
    };
    let nd = word(0)?;
    if nd > 16 {
        return Err(bad());
    }
    let dims = (0..nd).map(|i| word(1 + i)).collect::<Result<Vec<_>>>()?;
    let dtype = wire::code_dtype(word(1 + nd)? as u32).ok_or_else(bad)?;
    wire::bytes_to_tensor(&b[8 * (nd + 2)..], dtype, &dims)
}

/// One all-reduce, for [`wire::map_elems`].
struct Reduce<'a> {
    comm: &'a ShmComm,
    phase: &'a mut u64,
    meta: u64,
}

impl wire::ElemFn for Reduce<'_> {
    fn call<T: WireElem>(self, x: &[T]) -> Result<Vec<T>> {
        self.comm.all_reduce_typed(self.phase, x, self.meta)
    }
}

impl Communicator for ShmComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let op = "all_reduce_sum";
        self.run(op, |phase| {
            let code = wire::dtype_code(t.dtype()).unwrap_or(3);
            let meta = ((t.elem_count() as u64) << 2) | u64::from(code);
            wire::map_elems(
                t,
                Reduce {
                    comm: self,
                    phase,
                    meta,
                },
            )
        })
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        let op = "all_gather";
        if dim >= t.rank() {
            return Err(self.err(op, format!("dim {dim} out of range for {:?}", t.dims())));
        }
        self.run(op, |phase| {
            let blobs = self.exchange(phase, op, &encode(t)?)?;
            let pieces = blobs
                .iter()
                .map(|b| decode(b))
                .collect::<Result<Vec<_>>>()?;
            for (r, p) in pieces.iter().enumerate() {
                if let Some(m) = super::mismatch(p, t, Some(dim)) {
                    return Err(self.err(op, format!("rank {r} {m}")));
                }
            }
            Ok(Tensor::cat(&pieces, dim)?)
        })
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let op = "broadcast";
        if root >= self.world {
            return Err(self.err(op, format!("root {root} out of range")));
        }
        self.run(op, |phase| {
            let mine = if self.rank == root {
                encode(t)?
            } else {
                Vec::new()
            };
            let blobs = self.exchange(phase, op, &mine)?;
            let got = decode(&blobs[root])?;
            if let Some(m) = super::mismatch(&got, t, None) {
                return Err(self.err(op, format!("rank {root} {m}")));
            }
            Ok(got)
        })
    }

    fn barrier(&self) -> Result<()> {
        self.run("barrier", |_| self.barrier_wait("barrier"))
    }
}
