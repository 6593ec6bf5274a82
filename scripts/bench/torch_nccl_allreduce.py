#!/usr/bin/env python3
"""The peer for `shardwise bench nccl`: torch.distributed NCCL all-reduce on the local GPUs,
one process per GPU, same sizes and timing rule (mean of back-to-back calls after a warm-up,
each timed by a device synchronisation at the end of the batch).

Prints one line per size: `torch-nccl <bytes> <mean_us> <busbw_GBps>` (bus bandwidth as
nccl-tests defines it: 2 (n - 1) / n * bytes / time).

Usage: torch_nccl_allreduce.py [--world N] [--sizes 8K,64K,16M,256M,1G] [--dtype bf16]
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def parse_size(s):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1]] if s[-1] in units else int(s)


def iters_for(nbytes):
    return 200 if nbytes <= (1 << 20) else (50 if nbytes <= (64 << 20) else 10)


def worker(rank, world, sizes, dtype, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    dt = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}[dtype]
    for nbytes in sizes:
        n = nbytes // torch.tensor([], dtype=dt).element_size()
        x = torch.ones(n, dtype=dt, device="cuda")
        for _ in range(5):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        it = iters_for(nbytes)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(it):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        dt_s = (time.perf_counter() - t0) / it
        if rank == 0:
            busbw = 2 * (world - 1) / world * nbytes / dt_s / 1e9
            print(f"torch-nccl {nbytes} {dt_s * 1e6:.2f} {busbw:.1f}", flush=True)
        if nbytes <= (1 << 20):
            # The same calls captured in one CUDA graph and replayed (device time only).
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    dist.all_reduce(x)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(it):
                    dist.all_reduce(x)
            g.replay()
            torch.cuda.synchronize()
            dist.barrier()
            reps = 5
            t0 = time.perf_counter()
            for _ in range(reps):
                g.replay()
            torch.cuda.synchronize()
            dt_s = (time.perf_counter() - t0) / (reps * it)
            if rank == 0:
                busbw = 2 * (world - 1) / world * nbytes / dt_s / 1e9
                print(f"torch-nccl-graph {nbytes} {dt_s * 1e6:.2f} {busbw:.1f}", flush=True)
    torch.cuda.synchronize()
    # Tearing the group down after graph capture can hang in some PyTorch/NCCL versions;
    # everything is printed, so leave without it.
    os._exit(0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=torch.cuda.device_count())
    ap.add_argument("--sizes", default="8K,64K,1M,16M,256M,1G")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--port", type=int, default=29533)
    a = ap.parse_args()
    sizes = [parse_size(s) for s in a.sizes.split(",")]
    mp.spawn(worker, args=(a.world, sizes, a.dtype, a.port), nprocs=a.world, join=True)


if __name__ == "__main__":
    main()
