#!/usr/bin/env python3
"""Per-kernel summary of an Nsight Compute CSV (`ncu --csv --metrics gpu__time_duration.sum`).

Prints, for each kernel name, its launches, mean time and share of the profiled time, and the
time per decoder layer: all profiled time over the launches of `rope_store` (one per layer), so
that launches outside whole layers (embedding, head) count in the share but not per layer.
"""
import argparse
import collections
import csv
import sys

UNITS = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("csv")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the model")
    args = ap.parse_args()
    with open(args.csv, newline="") as f:
        lines = [line for line in f if line.startswith('"')]
    rows = list(csv.DictReader(lines))
    times = collections.defaultdict(list)
    for r in rows:
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(r["Metric Value"].replace(",", ""))
        name = r["Kernel Name"].split("(")[0][:70]
        times[name].append(value * UNITS.get(r["Metric Unit"], 1.0))
    if not times:
        print("ncu_summary: no kernel times in", args.csv)
        return 1
    total = sum(sum(t) for t in times.values())
    layers = sum(len(t) for n, t in times.items() if "rope_store" in n)
    print(f"{'kernel':70} {'launches':>8} {'mean_us':>8} {'share':>6}")
    for name, t in sorted(times.items(), key=lambda kv: -sum(kv[1])):
        print(f"{name:70} {len(t):8d} {sum(t) / len(t):8.2f} {sum(t) / total:6.1%}")
    print(f"profiled {sum(len(t) for t in times.values())} launches, {total:.0f} us")
    if layers:
        print(f"per layer (over {layers} rope_store launches): {total / layers:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
