#!/usr/bin/env python3
"""Where a decode step's time goes on one GPU, from an Nsight Systems SQLite export.

Takes the kernels of one device (`--device`), keeps the last `--keep` share of them (the timed
steps, after load and warm-up), and prints:
  - the span from the first kept kernel's start to the last one's end, the sum of kernel
    durations, and so the share of the span the GPU ran no kernel;
  - the idle gaps between consecutive kernels by size (a step boundary shows as a few gaps of
    tens of microseconds; launch gaps inside a captured step as many of about a microsecond);
  - per kernel name: launches, mean duration, mean idle gap before it.
"""
import argparse
import collections
import sqlite3
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("sqlite")
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--keep", type=float, default=0.3, help="share of the last kernels kept")
    args = ap.parse_args()
    db = sqlite3.connect(args.sqlite)
    tables = {r[0] for r in db.execute("select name from sqlite_master where type='table'")}
    if "CUPTI_ACTIVITY_KIND_KERNEL" not in tables:
        print("nsys_gaps: no kernel table; tables:", sorted(tables))
        return 1
    rows = db.execute(
        "select k.start, k.end, s.value from CUPTI_ACTIVITY_KIND_KERNEL k "
        "join StringIds s on s.id = k.shortName where k.deviceId = ? order by k.start",
        (args.device,),
    ).fetchall()
    copies = []
    if "CUPTI_ACTIVITY_KIND_MEMCPY" in tables:
        copies = db.execute(
            "select start, end, copyKind, bytes from CUPTI_ACTIVITY_KIND_MEMCPY "
            "where deviceId = ? order by start",
            (args.device,),
        ).fetchall()
    if not rows:
        print(f"nsys_gaps: no kernels on device {args.device}")
        return 1
    rows = rows[int(len(rows) * (1 - args.keep)):]
    t0, t1 = rows[0][0], rows[-1][1]
    busy = sum(e - s for s, e, _ in rows)
    span = t1 - t0
    print(f"device {args.device}: {len(rows)} kernels over {span / 1e3:.0f} us, "
          f"kernels {busy / 1e3:.0f} us, no kernel running {1 - busy / span:.1%} of the span")
    kept = [c for c in copies if t0 <= c[0] <= t1]
    if kept:
        by_kind = collections.defaultdict(lambda: [0, 0, 0])
        for s, e, kind, nbytes in kept:
            k = by_kind[kind]
            k[0] += 1
            k[1] += e - s
            k[2] += nbytes
        for kind, (n, t, b) in sorted(by_kind.items()):
            print(f"  copies of kind {kind}: {n}, {t / 1e3:.0f} us, {b / n:.0f} bytes each")
    bins = [(0, 1e3), (1e3, 2e3), (2e3, 5e3), (5e3, 20e3), (20e3, 1e12)]
    counts = [[0, 0] for _ in bins]
    before = collections.defaultdict(list)
    dur = collections.defaultdict(list)
    for (s0, e0, _), (s1, e1, name) in zip(rows, rows[1:]):
        gap = max(0, s1 - e0)
        for i, (lo, hi) in enumerate(bins):
            if lo <= gap < hi:
                counts[i][0] += 1
                counts[i][1] += gap
        before[name].append(gap)
    for s, e, name in rows:
        dur[name].append(e - s)
    print("  idle gaps between kernels:")
    for (lo, hi), (n, t) in zip(bins, counts):
        label = f"{lo / 1e3:g}-{hi / 1e3:g} us" if hi < 1e12 else f">= {lo / 1e3:g} us"
        print(f"    {label:>12}: {n:6d} gaps, {t / 1e3:8.0f} us")
    print(f"  {'kernel':60} {'launches':>8} {'mean_us':>8} {'gap_before_us':>13}")
    for name, d in sorted(dur.items(), key=lambda kv: -sum(kv[1])):
        g = before.get(name, [0])
        print(f"  {name[:60]:60} {len(d):8d} {sum(d) / len(d) / 1e3:8.2f} "
              f"{sum(g) / len(g) / 1e3:13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
