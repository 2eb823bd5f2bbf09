"""Where the GPU's doffset leaves the float64 reference (S2 shape, reduced batch): for each element
off by more than 1% of max|doffset|, the sampling coordinate in float64 and as float32 computes it,
and its distance to the integer grid. A bilinear sample's gradient jumps at integer coordinates, so
float32 rounding that moves a coordinate across an integer changes doffset by O(max|doffset|).
Also reports the error with offsets kept >= 0.1 px off the grid (tests' off_grid=True).
Usage: python benchmarks/kink_probe.py [--seeds 4] [--dtype float32]"""
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
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    dt = jnp.dtype(a.dtype)
    case = Case(n=3, h=64, w=64, c_in=64, c_out=64, strides=(1, 1), padding=1)
    for seed in range(a.seeds):
        for off_grid in (False, True):
            rng = np.random.default_rng(seed)
            x, off, k, m = make_inputs(case, rng, np.float64, off_grid=off_grid)
            dy = rng.normal(size=(case.n, 64, 64, 64))
            low = [jnp.asarray(v).astype(dt) for v in (x, off, k, m, dy)]
            got = grads(case, low[:4], low[4], None, GPU)
            want = grads(case, [v.astype(jnp.float64) for v in low[:4]], low[4].astype(jnp.float64), "xla", CPU)
            err = {n: float(np.max(np.abs(g - w)) / np.max(np.abs(w)))
                   for n, g, w in zip(["y", "dx", "doffset", "dkernel", "dmask"], got, want)}
            print(f"seed {seed} off_grid={off_grid} {a.dtype}: " + ", ".join(f"{n} {e:.2e}" for n, e in err.items()))
            if off_grid:
                continue
            d = np.abs(got[2] - want[2])
            bad = np.argwhere(d > 1e-2 * np.max(np.abs(want[2])))
            offv = np.asarray(low[1].astype(jnp.float64))
            for n, i, j, c in bad[:8]:
                tap, axis = divmod(int(c), 2)
                base = (i if axis == 0 else j) - 1 + (tap // 3 if axis == 0 else tap % 3)
                pos64 = base + offv[n, i, j, c]
                pos32 = float(np.float32(base) + np.float32(offv[n, i, j, c]))
                print(f"  doffset[{n},{i},{j},{c}] got {got[2][n, i, j, c]:+.4f} want {want[2][n, i, j, c]:+.4f}: "
                      f"coordinate f64 {pos64!r} f32 {pos32!r}, floor {np.floor(pos64):.0f}/{np.floor(pos32):.0f}, "
                      f"distance to grid {abs(pos64 - round(pos64)):.2e}")
            print(f"  {len(bad)} elements off by > 1% of max|doffset|")


if __name__ == "__main__":
    main()
