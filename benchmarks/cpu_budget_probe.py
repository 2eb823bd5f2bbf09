"""CPU forward column budget: the op's forward at each budget (MiB) beside lax.conv, per suite shape
at the CPU batch, interleaved rounds, medians of wall time (ms). Run with JAX_PLATFORMS=cpu:
python benchmarks/cpu_budget_probe.py [--budgets 16,32] [--dtypes float32,bfloat16] [--shapes S1,S2]
[--rounds 7]."""
import argparse
import dataclasses
import os
import time

import jax
import numpy as np
from jax import lax

import bench_layers
import deft_jax
from deft_jax import tiling


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="16,32")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--shapes", default=",".join(bench_layers.SUITE), help="suite shapes, comma-separated")
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    budgets = [int(b) for b in a.budgets.split(",")]
    print(f"jax {jax.__version__}, {jax.device_count()} device(s), {len(os.sched_getaffinity(0))} CPUs")
    for name in a.shapes.split(","):
        layer = bench_layers.SUITE[name]
        layer = dataclasses.replace(layer, n=bench_layers.CPU_BATCH[name])
        for dt in a.dtypes.split(","):
            inp = bench_layers.make_inputs(layer, dt, np.random.default_rng(0))
            x, off, m, k = (inp[q] for q in ("x", "offset", "mask", "kernel"))
            s, p = layer.stride, layer.pad
            fns = {}
            for b in budgets:
                tiling.CPU_FORWARD_COLUMN_BUDGET_BYTES = b * 2**20
                jax.clear_caches()
                f = jax.jit(lambda x, o, m, k: deft_jax.deform_conv2d(x, o, k, m, strides=s, padding=p))
                f(x, off, m, k).block_until_ready()  # traced and compiled at this budget
                fns[f"{b} MiB"] = (f, (x, off, m, k))
            c = jax.jit(lambda x, k: lax.conv_general_dilated(x, k, (s, s), ((p, p), (p, p)),
                                                              dimension_numbers=("NHWC", "HWIO", "NHWC")))
            c(x, k).block_until_ready()
            fns["conv"] = (c, (x, k))
            times = {q: [] for q in fns}
            for rnd in range(a.rounds + 1):  # round 0 warms every function up, untimed
                for q, (f, args) in fns.items():
                    t = time.perf_counter()
                    f(*args).block_until_ready()
                    if rnd:
                        times[q].append(time.perf_counter() - t)
            med = {q: np.median(v) * 1e3 for q, v in times.items()}
            cells = "  ".join(f"{q} {v:7.2f} ({v / med['conv']:.2f}x)" for q, v in med.items() if q != "conv")
            print(f"{name} n={layer.n} {dt:9s} conv {med['conv']:7.2f}  {cells}", flush=True)


if __name__ == "__main__":
    main()
