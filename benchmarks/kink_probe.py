"""Where the GPU's doffset leaves the float64 reference (S2 shape, reduced batch): for each element
off by more than 1% of max|doffset|, the sampling coordinate in float64 and as float32 computes it,
and its distance to the integer grid. A bilinear sample's gradient jumps at integer coordinates, so
float32 rounding that moves a coordinate across an integer changes doffset by O(max|doffset|).
Also reports the error with offsets kept >= 0.1 px off the grid (tests' off_grid=True).
Usage: python benchmarks/kink_probe.py [--seeds 4] [--dtypes float32,bfloat16] [--shapes S2,S3]"""
import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import deft_jax  # noqa: E402
from helpers import Case, make_inputs  # noqa: E402

CPU = jax.devices("cpu")[0]
GPU = jax.devices("gpu")[0]


def grads(case, args, dy, impl, device):
    def f(x, off, k, m):
        return deft_jax.deform_conv2d(x, off, k, m, implementation=impl, **case.kwargs())
    args, dy = jax.device_put((args, dy), device)
    y, vjp = jax.vjp(jax.jit(f), *args)
    return [np.asarray(o, np.float64) for o in (y, *vjp(dy))]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--shapes", default="S2,S3")
    a = p.parse_args()
    for shape in a.shapes.split(","):
        for dtype in a.dtypes.split(","):
            for seed in range(a.seeds):
                probe(SHAPES[shape], jnp.dtype(dtype), seed, f"{shape} {dtype}")


# test_gpu_deterministic.ACCURACY's S2 and S3 (reduced batch; 3x3, stride 1, padding 1).
SHAPES = {"S2": Case(n=3, h=64, w=64, c_in=64, c_out=64, padding=1),
          "S3": Case(n=4, h=28, w=28, c_in=128, c_out=128, padding=1)}


# test_gpu.TOL: an element off by more than this fraction of max|doffset| is reported.
TOL = {"float32": 1e-2, "bfloat16": 5e-2, "float16": 1e-2}


def probe(case, dt, seed, label):
    for off_grid in (False, True):
        rng = np.random.default_rng(seed)
        x, off, k, m = make_inputs(case, rng, np.float64, off_grid=off_grid)
        dy = rng.normal(size=(case.n, case.h, case.w, case.c_out))
        low = [jnp.asarray(v).astype(dt) for v in (x, off, k, m, dy)]
        got = grads(case, low[:4], low[4], None, GPU)
        want = grads(case, [v.astype(jnp.float64) for v in low[:4]], low[4].astype(jnp.float64), "xla", CPU)
        err = {n: float(np.max(np.abs(g - w)) / np.max(np.abs(w)))
               for n, g, w in zip(["y", "dx", "doffset", "dkernel", "dmask"], got, want)}
        print(f"{label} seed {seed} off_grid={off_grid}: " + ", ".join(f"{n} {e:.2e}" for n, e in err.items()))
        if off_grid:
            continue
        bad = np.argwhere(np.abs(got[2] - want[2]) > TOL[dt.name] * np.max(np.abs(want[2])))
        offv = np.asarray(low[1].astype(jnp.float64))
        for n, i, j, c in bad[:8]:
            tap, axis = divmod(int(c), 2)
            base = (i if axis == 0 else j) - 1 + (tap // 3 if axis == 0 else tap % 3)
            pos64 = base + offv[n, i, j, c]
            pos32 = float(np.float32(base) + np.float32(offv[n, i, j, c]))
            size = case.h if axis == 0 else case.w
            print(f"  doffset[{n},{i},{j},{c}] got {got[2][n, i, j, c]:+.4f} want {want[2][n, i, j, c]:+.4f}: "
                  f"coordinate f64 {pos64!r} f32 {pos32!r}, floor {np.floor(pos64):.0f}/{np.floor(pos32):.0f}, "
                  f"distance to grid {abs(pos64 - round(pos64)):.2e}, image size {size}")
        print(f"  {len(bad)} elements off by > {TOL[dt.name]} x max|doffset|")


if __name__ == "__main__":
    main()
