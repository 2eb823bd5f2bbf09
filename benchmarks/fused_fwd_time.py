"""The fused forward's time per call over suite shapes, for a quick A/B between two builds on one
warm machine (when Nsight Compute's per-kernel pass is not available: the ktime phase's profiled
process crashed on 2026-12-07). Host wall time of `--calls` back-to-back jitted calls, then one
block_until_ready, so the launches queue and the device stays busy: device-bound for layers of
~50 us and more, dispatch included. Prints the median and min over `--rounds` rounds, us.

  python benchmarks/fused_fwd_time.py [--shapes S4,S2,S3,S6] [--dtypes float32,bfloat16]
"""
import argparse
import time

import jax
import numpy as np

import deft_jax
from profile_bwd import suite_inputs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="S4,S2,S3,S6")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--implementation", default="fused", help="fused, columns or xla")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    print(f"deft_jax from {deft_jax.__file__}; {jax.devices()[0].device_kind}", flush=True)
    for dt in a.dtypes.split(","):
        for name in a.shapes.split(","):
            x, off, kern, m, _, s = suite_inputs(name, dt)
            f = jax.jit(lambda *q, s=s: deft_jax.deform_conv2d(*q, strides=s, padding=1,
                                                                implementation=a.implementation))
            f(x, off, kern, m).block_until_ready()
            ts = []
            for _ in range(a.rounds):
                t0 = time.perf_counter()
                for _ in range(a.calls):
                    y = f(x, off, kern, m)
                y.block_until_ready()
                ts.append((time.perf_counter() - t0) / a.calls * 1e6)
            print(f"{name} {dt} {a.implementation} fwd us: median {np.median(ts):.1f} min {min(ts):.1f}", flush=True)


if __name__ == "__main__":
    main()
