"""What deterministic=True costs: device time of the native op, default vs deterministic, per suite
layer and dtype in one process (bench_layers' timing loop and inputs), and how many distinct
results RUNS calls of each give (bitwise, per output: y, dx, doffset, dmask, dkernel).

  python benchmarks/det_cost.py                          # S1-S6, float32 + bfloat16, fwd+bwd
  python benchmarks/det_cost.py --shapes S4,S5 --modes fwd,fwdbwd --out out/det_cost.json

bench_layers.py reports the same time as its "det us" column next to the whole comparison; this
is the short version (no reference, no dense conv).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_layers as bl  # noqa: E402

NAMES = ("y", "dx", "doffset", "dmask", "dkernel")


def distinct(f, args, runs: int) -> list[int]:
    """Distinct bitwise results per output over `runs` calls of jit(f)."""
    g = jax.jit(f)
    seen = None
    for _ in range(runs):
        outs = [np.asarray(o) for o in jax.tree.leaves(g(*args))]
        if seen is None:
            seen = [set() for _ in outs]
        for s, o in zip(seen, outs):
            s.add(hashlib.sha1(o.tobytes()).hexdigest())
    return [len(s) for s in seen]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(bl.SUITE))
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--modes", default="fwdbwd")
    p.add_argument("--runs", type=int, default=10, help="calls for the distinct-results count")
    p.add_argument("--out", help="results JSON")
    a = p.parse_args(argv)
    settings = bl.Settings(runs=3, target_s=0.05)
    rng = np.random.default_rng(0)
    rows = []
    print(f"{jax.devices()[0].device_kind}; distinct results over {a.runs} calls per output "
          f"({', '.join(NAMES)}; fwd: y only)")
    print(f"{'shape':5} {'dtype':9} {'mode':7} {'deft us':>9} {'det us':>9} {'det/deft':>8}  "
          f"{'distinct deft':15} {'distinct det':15}")
    for name in a.shapes.split(","):
        layer = bl.SUITE[name]
        for dtype in a.dtypes.split(","):
            inputs = bl.make_inputs(layer, bl.DTYPES[dtype], rng)
            for mode in a.modes.split(","):
                row = {"shape": name, "dtype": dtype, "mode": mode}
                for impl in ("deft", bl.DET_IMPL):
                    f, names = bl.case_fn(impl, mode, layer)
                    args = tuple(inputs[k] for k in names)
                    _, once_s, _ = bl.single_call(f, args)
                    t = bl.time_loop(f, args, settings, once_s)
                    row[impl] = {"time_us": t["time_s"] * 1e6, "time_min_us": t["time_min_s"] * 1e6,
                                 "distinct": distinct(f, args, a.runs)}
                rows.append(row)
                d, e = row["deft"], row[bl.DET_IMPL]
                print(f"{name:5} {dtype:9} {mode:7} {d['time_us']:9.1f} {e['time_us']:9.1f} "
                      f"{e['time_us'] / d['time_us']:7.2f}x  {str(d['distinct']):15} {str(e['distinct']):15}",
                      flush=True)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "runs": a.runs, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
