#!/usr/bin/env python3
"""Per-kernel summary of an Nsight Compute CSV (`ncu --csv --metrics gpu__time_duration.sum`,
optionally with `dram__bytes_read.sum`).

Prints, for each kernel name, its launches, mean time, share of the profiled time and (with the
DRAM metric) the mean bytes read and the bandwidth they took, then the time per decoder layer:
all profiled time over the launches of the attention kernels (`attend*`: one per layer and
step, whether the rotary embedding runs in a kernel of its own or inside the q/k/v product),
so that launches outside whole layers (embedding, head) count in the share but not per layer.
`--last-layers N` keeps only the launches from the N-th last attention on: the last decode
steps, without a prefill or warm-up that the profiled range caught.
"""
import argparse
import collections
import csv
import sys

TIME = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
        "second": 1e6, "s": 1e6}
# The kernel name that marks a decoder layer (one launch per layer and step).
LAYER_MARK = "attend"
BYTES = {"byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3, "MB": 1e6, "GB": 1e9}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("csv")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the model")
    ap.add_argument("--last-layers", type=int, default=0,
                    help="only the launches from the N-th last attention on (0: all)")
    args = ap.parse_args()
    with open(args.csv, newline="") as f:
        lines = [line for line in f if line.startswith('"')]
    # One record per launch (its metrics are rows of their own), in launch order.
    launches = collections.OrderedDict()
    for r in csv.DictReader(lines):
        rec = launches.setdefault(r["ID"], {"name": r["Kernel Name"].split("(")[0][:70]})
        value = float(r["Metric Value"].replace(",", ""))
        if r.get("Metric Name") == "gpu__time_duration.sum":
            rec["us"] = value * TIME.get(r["Metric Unit"], 1.0)
        elif r.get("Metric Name") == "dram__bytes_read.sum":
            rec["bytes"] = value * BYTES.get(r["Metric Unit"], 1.0)
    recs = [r for r in launches.values() if "us" in r]
    if args.last_layers:
        marks = [i for i, r in enumerate(recs) if r["name"].startswith(LAYER_MARK)]
        if len(marks) >= args.last_layers:
            recs = recs[marks[-args.last_layers]:]
    if not recs:
        print("ncu_summary: no kernel times in", args.csv)
        return 1
    by_name = collections.defaultdict(list)
    for r in recs:
        by_name[r["name"]].append(r)
    total = sum(r["us"] for r in recs)
    layers = sum(1 for r in recs if r["name"].startswith(LAYER_MARK))
    print(f"{'kernel':70} {'launches':>8} {'mean_us':>8} {'share':>6} {'MB':>8} {'TB/s':>6}")
    for name, rs in sorted(by_name.items(), key=lambda kv: -sum(r["us"] for r in kv[1])):
        us = sum(r["us"] for r in rs) / len(rs)
        mb = sum(r.get("bytes", 0.0) for r in rs) / len(rs) / 1e6
        tbs = f"{mb / us:6.2f}" if mb and us else ""
        share = sum(r["us"] for r in rs) / total
        print(f"{name:70} {len(rs):8d} {us:8.2f} {share:6.1%} {mb:8.1f} {tbs:>6}")
    print(f"profiled {len(recs)} launches, {total:.0f} us")
    if layers:
        print(f"per layer (over {layers} attention launches): {total / layers:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
