"""Sweep of GPU tile configurations over the benchmark suite (forward device time per config).

Produces the measurements behind deft_jax.tiling._gpu_tiling: for each suite shape and dtype,
the forward time of every instantiated tile configuration, plus lax.conv of the same shape.
Device time: R iterations inside one jitted fori_loop with a data dependency, (t(2R)-t(R))/R,
median of 5.
  python benchmarks/gpu_tile_sweep.py --out out/sweep.json [--shapes S2,S5] [--dtypes bfloat16]
"""
import argparse
import json
import time
from statistics import median

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import deft_jax
from deft_jax import tiling

SUITE = {
    "S1": (8, 64, 64, 64, 64, 1), "S2": (32, 64, 64, 64, 64, 1), "S3": (32, 28, 28, 128, 128, 1),
    "S4": (32, 14, 14, 256, 256, 1), "S5": (32, 7, 7, 512, 512, 1), "S6": (32, 56, 56, 64, 128, 2),
}
CONFIGS = [  # (tile_h, tile_w, tile_n, tile_k, warps, stages)
    (8, 8, 64, 32, 4, 1), (8, 8, 64, 32, 4, 2), (4, 16, 64, 32, 4, 2), (8, 16, 64, 32, 4, 2),
    (16, 8, 64, 32, 4, 2), (8, 16, 128, 32, 8, 2), (16, 8, 128, 32, 8, 2),
    (8, 16, 128, 32, 16, 2), (16, 8, 128, 32, 16, 2),
    (8, 8, 64, 128, 4, 2), (8, 8, 64, 256, 4, 2), (8, 8, 64, 512, 4, 2),  # split forward
]


def device_time(step, args, r=20):
    def loop(n):
        def body(_, a):
            out = step(*a)
            eps = (jnp.sum(out.reshape(-1)[:8]).astype(jnp.float32) * 1e-30).astype(a[0].dtype)
            return (a[0] + eps,) + tuple(a[1:])
        return jax.jit(lambda *a: lax.fori_loop(0, n, body, a)[0])
    f1, f2 = loop(r), loop(2 * r)
    jax.block_until_ready(f1(*args)); jax.block_until_ready(f2(*args))
    ts = []
    for _ in range(5):
        t0 = time.perf_counter(); jax.block_until_ready(f1(*args)); t1 = time.perf_counter()
        jax.block_until_ready(f2(*args)); t2 = time.perf_counter()
        ts.append(((t2 - t1) - (t1 - t0)) / r)
    return median(ts) * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SUITE))
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--bwd", action="store_true", help="also time fwd+bwd with the chosen config")
    ap.add_argument("--per-config-bwd", action="store_true",
                    help="also time fwd+bwd for every config (the backward follows the tile's stages)")
    ap.add_argument("--configs", help="';'-separated TileConfig fields, e.g. '8,8,64,32,4,2;8,16,64,32,8,2' "
                    "(a 7th field sets bwd_tile_n, the weight pass's width: time it with --per-config-bwd; "
                    "an 8th k_splits, the warp-specialized forward's blocks per tile)")
    ap.add_argument("--out")
    a = ap.parse_args()
    rows = []
    orig = tiling.choose_tiling
    for name in a.shapes.split(","):
        n, h, w, c, co, s = SUITE[name]
        ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
        for dt in a.dtypes.split(","):
            dtype = jnp.dtype(dt)
            k = jax.random.split(jax.random.PRNGKey(0), 4)
            x = jax.random.normal(k[0], (n, h, w, c), dtype)
            off = (2 * jax.random.normal(k[1], (n, ho, wo, 18))).astype(dtype)
            m = jax.random.uniform(k[2], (n, ho, wo, 9)).astype(dtype)
            kern = (jax.random.normal(k[3], (3, 3, c, co)) / np.sqrt(9 * c)).astype(dtype)
            conv = lambda x, off, kern, m: lax.conv_general_dilated(
                x, kern, (s, s), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
            t_conv = device_time(conv, (x, off, kern, m))
            res = {"shape": name, "dtype": dt, "conv_us": t_conv, "fwd_us": {}, "cfg_fwdbwd_us": {}}
            configs = CONFIGS if not a.configs else [
                tuple(int(v) for v in c.split(",")) for c in a.configs.split(";")]
            for cfg in configs:
                tc = tiling.TileConfig(*cfg)
                tiling.choose_tiling = lambda *args, tc=tc, **kw: tc
                f = lambda x, off, kern, m: deft_jax.deform_conv2d(x, off, kern, m, strides=s, padding=1)
                try:
                    res["fwd_us"][str(cfg)] = device_time(f, (x, off, kern, m))
                except Exception as e:  # noqa: BLE001 - a config the kernels reject
                    res["fwd_us"][str(cfg)] = f"error: {str(e)[:80]}"
                if a.per_config_bwd and isinstance(res["fwd_us"][str(cfg)], float):
                    def fbc(x, off, kern, m):
                        y, vjp = jax.vjp(lambda *q: deft_jax.deform_conv2d(*q, strides=s, padding=1),
                                         x, off, kern, m)
                        return vjp(y)[0]
                    res["cfg_fwdbwd_us"][str(cfg)] = device_time(fbc, (x, off, kern, m), r=5)
            tiling.choose_tiling = orig
            if a.bwd:
                def fb(x, off, kern, m):
                    y, vjp = jax.vjp(lambda *q: deft_jax.deform_conv2d(*q, strides=s, padding=1), x, off, kern, m)
                    return vjp(y)[0]
                res["fwdbwd_us"] = device_time(fb, (x, off, kern, m), r=5)
            best = min((v, k) for k, v in res["fwd_us"].items() if isinstance(v, float))
            print(f"{name} {dt:9s} conv {t_conv:8.1f} us | " + " ".join(
                f"{k}:{v:.0f}" if isinstance(v, float) else f"{k}:ERR" for k, v in res["fwd_us"].items())
                + f" | best {best[1]} {best[0]:.1f} us ({best[0] / t_conv:.2f}x conv)"
                + (f" | fwdbwd {res['fwdbwd_us']:.0f} us" if a.bwd else "")
                + "".join(f" | fwdbwd {k}:{v:.0f}" for k, v in res["cfg_fwdbwd_us"].items()), flush=True)
            rows.append(res)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"device": str(jax.devices()[0]), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
