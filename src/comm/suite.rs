//! Transport-generic checks every [`Communicator`] implementation must pass.
//!
//! A transport supplies a factory that makes one communicator per rank for a given world
//! size; [`run_all`] drives each rank on its own thread with fresh random inputs and
//! compares the results against a float64 reference computed here, independently of any
//! transport. Used by the in-process transport's tests and by every later transport.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rand::Rng;

use super::Communicator;
use crate::error::{Error, Result};

/// Makes the communicators of one group: element `r` is rank `r`.
pub trait CommFactory: Fn(usize) -> Result<Vec<Arc<dyn Communicator>>> + Sync {}
impl<F: Fn(usize) -> Result<Vec<Arc<dyn Communicator>>> + Sync> CommFactory for F {}

fn fail(msg: String) -> Error {
    Error::Comm {
        rank: usize::MAX,
        op: "suite",
        reason: msg,
    }
}

/// Runs `f(rank, comm)` on one thread per rank and returns the per-rank results.
///
/// # Errors
/// The first rank error, or a panic reported as an error.
pub fn on_ranks<T: Send>(
    comms: &[Arc<dyn Communicator>],
    f: impl Fn(usize, &dyn Communicator) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    super::each_rank(comms.iter().collect(), |r, c| f(r, c.as_ref()))
}

fn random_vec(n: usize) -> Vec<f32> {
    let mut rng = rand::rng();
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Tolerance of a sum of `world` values of magnitude <= 1 in `dtype`, against float64.
fn tolerance(dtype: DType, world: usize) -> f64 {
    let eps = match dtype {
        DType::F32 => 1e-6,
        DType::BF16 => 1.0 / 128.0,
        _ => 1.0 / 1024.0,
    };
    eps * world as f64 * 2.0
}

/// All-reduces fresh random inputs of shape `dims` in `dtype` on every rank and checks the
/// results: the input dtype and shape, identical bytes on every rank, and within `tol`
/// (relative) of a float64 sum of the inputs as the ranks sent them.
fn reduce_and_check(
    comms: &[Arc<dyn Communicator>],
    dims: &[usize],
    dtype: DType,
    tol: f64,
    label: &str,
) -> Result<()> {
    let n: usize = dims.iter().product();
    // Inputs rounded to the wire dtype first, so the reference sees what ranks send.
    let inputs: Vec<Tensor> = (0..comms.len())
        .map(|_| {
            Tensor::from_vec(random_vec(n), dims, &Device::Cpu)?
                .to_dtype(dtype)
                .map_err(Error::from)
        })
        .collect::<Result<_>>()?;
    let flat64 = |t: &Tensor| -> Result<Vec<f64>> {
        Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
    };
    let mut reference = vec![0f64; n];
    for t in &inputs {
        reference
            .iter_mut()
            .zip(flat64(t)?)
            .for_each(|(a, b)| *a += b);
    }
    let outs = on_ranks(comms, |r, c| c.all_reduce_sum(&inputs[r]))?;
    let first = flat64(&outs[0])?;
    for (r, o) in outs.iter().enumerate() {
        if o.dtype() != dtype || o.dims() != dims {
            return Err(fail(format!(
                "{label}: rank {r} got {:?} {:?}",
                o.dtype(),
                o.dims()
            )));
        }
        if flat64(o)? != first {
            return Err(fail(format!("{label}: rank {r} differs from rank 0")));
        }
    }
    for (i, (a, b)) in first.iter().zip(&reference).enumerate() {
        if (a - b).abs() > tol * (1.0 + b.abs()) {
            return Err(fail(format!("{label}: element {i} = {a}, reference {b}")));
        }
    }
    Ok(())
}

/// All-reduce of random f32/bf16/f16 tensors of random shapes, against a float64 sum;
/// every rank must receive identical bytes.
///
/// # Errors
/// A mismatch or a transport error.
pub fn check_all_reduce(make: &dyn CommFactory, world: usize) -> Result<()> {
    let comms = make(world)?;
    let mut rng = rand::rng();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for _ in 0..3 {
            let dims = [rng.random_range(1..9usize), rng.random_range(1..700usize)];
            let label = format!("all_reduce {dtype:?} world {world} {dims:?}");
            reduce_and_check(&comms, &dims, dtype, tolerance(dtype, world), &label)?;
        }
    }
    Ok(())
}

fn is_prime(n: usize) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

/// All-reduce of awkward lengths: 0, 1, 2, a prime not divisible by the world size, and a
/// random length up to 10^6, in every dtype, against float64; identical bytes on all ranks.
///
/// # Errors
/// A mismatch or a transport error.
pub fn check_lengths(make: &dyn CommFactory, world: usize) -> Result<()> {
    let comms = make(world)?;
    let mut rng = rand::rng();
    let prime = loop {
        let p = rng.random_range(1000..20000usize);
        if is_prime(p) {
            break p;
        }
    };
    let big = rng.random_range(100_000..=1_000_000usize);
    for n in [0usize, 1, 2, prime, big] {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            // Partial sums may be rounded to the dtype at every hop of a ring.
            let tol = tolerance(dtype, world) * world as f64;
            let label = format!("length {n} {dtype:?} world {world}");
            reduce_and_check(&comms, &[n], dtype, tol, &label)?;
        }
    }
    Ok(())
}

/// All-gather of uneven random pieces along dim 0 and dim 1, against concatenation.
///
/// # Errors
/// A mismatch or a transport error.
pub fn check_all_gather(make: &dyn CommFactory, world: usize) -> Result<()> {
    let comms = make(world)?;
    let mut rng = rand::rng();
    for dim in [0usize, 1] {
        let other = rng.random_range(1..50usize);
        let pieces: Vec<Vec<f32>> = (0..world)
            .map(|_| random_vec(rng.random_range(1..40usize) * other))
            .collect();
        let tensors: Vec<Tensor> = pieces
            .iter()
            .map(|p| {
                let len = p.len() / other;
                let t = Tensor::from_vec(p.clone(), (len, other), &Device::Cpu)?;
                Ok(if dim == 0 { t } else { t.t()?.contiguous()? })
            })
            .collect::<Result<_>>()?;
        let outs = on_ranks(&comms, |r, c| c.all_gather(&tensors[r], dim))?;
        let expected: Vec<f32> = if dim == 0 {
            pieces.concat()
        } else {
            // Column blocks: row i of the result is row i of every piece, in rank order.
            let mut v = Vec::new();
            for i in 0..other {
                for t in &tensors {
                    v.extend(t.get(i)?.to_vec1::<f32>()?);
                }
            }
            v
        };
        for (r, o) in outs.iter().enumerate() {
            let got = o.flatten_all()?.to_vec1::<f32>()?;
            if got != expected {
                return Err(fail(format!("all_gather dim {dim}: rank {r} wrong")));
            }
        }
    }
    Ok(())
}

/// Broadcast from every root; barrier ordering; mismatched shapes give an error, not a hang.
///
/// # Errors
/// A mismatch or a transport error.
pub fn check_broadcast_barrier_errors(make: &dyn CommFactory, world: usize) -> Result<()> {
    let comms = make(world)?;
    let n = rand::rng().random_range(1..5000usize);
    let inputs: Vec<Vec<f32>> = (0..world).map(|_| random_vec(n)).collect();
    for root in 0..world {
        let outs = on_ranks(&comms, |r, c| {
            c.broadcast(&Tensor::from_vec(inputs[r].clone(), n, &Device::Cpu)?, root)
        })?;
        for (r, o) in outs.iter().enumerate() {
            if o.to_vec1::<f32>()? != inputs[root] {
                return Err(fail(format!("broadcast root {root}: rank {r} wrong")));
            }
        }
    }
    let arrived = AtomicUsize::new(0);
    let seen = on_ranks(&comms, |_, c| {
        arrived.fetch_add(1, Ordering::SeqCst);
        c.barrier()?;
        Ok(arrived.load(Ordering::SeqCst))
    })?;
    if seen.iter().any(|&s| s != world) {
        return Err(fail(format!("barrier let a rank through early: {seen:?}")));
    }
    if world > 1 {
        let comms = make(world)?;
        let outs = on_ranks(&comms, |r, c| {
            let t = Tensor::zeros(3 + usize::from(r == world - 1), DType::F32, &Device::Cpu)?;
            Ok(c.all_reduce_sum(&t).is_err())
        })?;
        if !outs.iter().any(|&e| e) {
            return Err(fail("mismatched all_reduce shapes were accepted".into()));
        }
    }
    Ok(())
}

/// Runs every check for world sizes 1 through 6.
///
/// # Errors
/// The first failing check, naming the world size.
pub fn run_all(make: impl CommFactory) -> Result<()> {
    for world in 1..=6 {
        check_all_reduce(&make, world)?;
        check_lengths(&make, world)?;
        check_all_gather(&make, world)?;
        check_broadcast_barrier_errors(&make, world)?;
    }
    Ok(())
}
