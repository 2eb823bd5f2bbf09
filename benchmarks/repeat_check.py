"""Race detector by repetition: the same layer, the same inputs, many launches.

A shared-memory race or an uninitialised read shows up as an occasional wrong launch, which a
layer test that runs once can miss. For every layer of a fully deformable ResNet-18 at the bf16
training bug's size (width 64, 64 px, batch 64) and the benchmark suite, in bfloat16 and float32:
the forward and all four gradients (cotangent fixed) run --reps times on the default route (and
each forced route) and every launch is compared with the gather reference of the same inputs.
Prints, per case, the worst error over the launches relative to the first launch's, and how many
distinct forward outputs the launches gave (1 unless the route sums with atomics). Exits 1 when a
launch's error exceeds --factor x the first launch's error plus the dtype's bound.
Run: python benchmarks/repeat_check.py [--reps 50] [--routes default,fused,columns] [--out f.json]
"""
import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

import deft_jax

# (name, N, H, W, C, C_out, stride): ResNet-18 width 64 at 64 px (stem to 16 px), then the suite.
LAYERS = [
    ("r18-l1", 64, 16, 16, 64, 64, 1), ("r18-l2s", 64, 16, 16, 64, 128, 2), ("r18-l2", 64, 8, 8, 128, 128, 1),
    ("r18-l3s", 64, 8, 8, 128, 256, 2), ("r18-l3", 64, 4, 4, 256, 256, 1), ("r18-l4s", 64, 4, 4, 256, 512, 2),
    ("r18-l4", 64, 2, 2, 512, 512, 1),
    ("S1", 8, 64, 64, 64, 64, 1), ("S3", 32, 28, 28, 128, 128, 1), ("S4", 32, 14, 14, 256, 256, 1),
    ("S5", 32, 7, 7, 512, 512, 1), ("S6", 32, 56, 56, 64, 128, 2),
]
# Absolute error bound on outputs of unit scale, per dtype, beside the first launch's own error.
BOUND = {"bfloat16": 0.05, "float32": 2e-3}


def case(name, n, h, w, c, co, stride, dtype, route, reps, factor, key):
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    ks = jax.random.split(key, 5)
    x = jax.random.normal(ks[0], (n, h, w, c), dtype)
    off = (2.0 * jax.random.normal(ks[1], (n, ho, wo, 18))).astype(dtype)
    k = (jax.random.normal(ks[2], (3, 3, c, co)) / np.sqrt(9 * c)).astype(dtype)
    m = jax.random.uniform(ks[3], (n, ho, wo, 9), dtype)
    ct = jax.random.normal(ks[4], (n, ho, wo, co), dtype)
    impl = None if route == "default" else route

    def fwd_bwd(implementation):
        def run(x, off, k, m):
            f = lambda *a: deft_jax.deform_conv2d(*a, strides=stride, padding=1, implementation=implementation)
            y, vjp = jax.vjp(f, x, off, k, m)
            return (y, *vjp(ct.astype(y.dtype)))
        return jax.jit(run)

    ref = [o.astype(jnp.float32) for o in fwd_bwd("xla")(x.astype(jnp.float32), off.astype(jnp.float32),
                                                         k.astype(jnp.float32), m.astype(jnp.float32))]
    scale = [jnp.maximum(jnp.max(jnp.abs(r)), 1e-6) for r in ref]

    @jax.jit
    def errors(outs):  # max |out - ref| / max|ref|, per output
        return jnp.stack([jnp.max(jnp.abs(o.astype(jnp.float32) - r)) / s for o, r, s in zip(outs, ref, scale)])

    f = fwd_bwd(impl)
    errs, first_y, distinct = [], None, 1
    for i in range(reps):
        outs = f(x, off, k, m)
        errs.append(np.asarray(errors(outs)))
        if i == 0:
            first_y = outs[0]
        elif distinct == 1 and not bool(jnp.array_equal(outs[0], first_y)):
            distinct = 2
    errs = np.stack(errs)
    worst, base = errs.max(0), errs[0]
    ok = bool(np.all(worst <= factor * base + BOUND[jnp.dtype(dtype).name]) and np.all(np.isfinite(errs)))
    return {"layer": name, "dtype": jnp.dtype(dtype).name, "route": route, "reps": reps,
            "first_err": base.tolist(), "worst_err": worst.tolist(), "y_bitwise_repeatable": distinct == 1, "ok": ok}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--routes", default="default,fused,columns")
    ap.add_argument("--layers", default=",".join(l[0] for l in LAYERS))
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if jax.default_backend() != "gpu":
        sys.exit("repeat_check.py needs a GPU (the column route is the only CPU route and has no races)")
    names = args.layers.split(",")
    results, key = [], jax.random.PRNGKey(0)
    for layer in [l for l in LAYERS if l[0] in names]:
        for dtype in args.dtypes.split(","):
            for route in args.routes.split(","):
                key, sub = jax.random.split(key)
                r = case(*layer, jnp.dtype(dtype), route, args.reps, args.factor, sub)
                results.append(r)
                print(f"{r['layer']:8s} {r['dtype']:9s} {r['route']:8s} "
                      f"err y,dx,doff,dk,dm first {' '.join(f'{e:.1e}' for e in r['first_err'])} "
                      f"worst {' '.join(f'{e:.1e}' for e in r['worst_err'])} "
                      f"y repeatable {r['y_bitwise_repeatable']} {'ok' if r['ok'] else 'FAIL'}", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
    bad = [r for r in results if not r["ok"]]
    print(f"{len(results)} cases x {args.reps} launches: {len(bad)} failed")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
