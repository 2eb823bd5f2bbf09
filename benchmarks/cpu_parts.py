"""Where the CPU route's time goes: each piece of deft_jax/_columns.py timed alone, per suite shape.

For each shape (CPU-sized batch, bench_layers.CPU_BATCH) and dtype: the native sampler, the forward
dot, the kernel-gradient dot (as the route writes it, and alternative forms), the column-gradient
dot, the native col2im, the whole op forward (at several forward column budgets, and the CPU fused
forward at several tiles where its BLAS loads) and forward + backward (at several images per
backward chunk, and CPU backward row runs),
and the dense conv forward and forward + backward. Wall time of one jitted call: min and median of
--reps calls after a warm-up, and the min CPU time of the process per call (a breakdown, not the
benchmark's protocol; use bench_layers.py for the headline numbers).

  python benchmarks/cpu_parts.py --shapes S1,S3 --dtypes float32 --chunks 1,4 --fwd-budgets 0,1,8 \
      --bwd-rows 0,8,-1
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import sys
import time
from statistics import median

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import deft_jax
from deft_jax import _columns, _ffi, tiling

_spec = importlib.util.spec_from_file_location(
    "bench_layers", os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_layers.py"))
bench_layers = importlib.util.module_from_spec(_spec)
sys.modules["bench_layers"] = bench_layers
_spec.loader.exec_module(bench_layers)


def timed(f, args, reps: int) -> tuple[float, float, float]:
    """(min, median) wall ms and min CPU ms (all threads of the process) of one call of
    jit(f)(*args). On a machine shared with other jobs the CPU time is the steadier figure: it
    leaves out the time spent waiting for a core (though not what the neighbours do to caches)."""
    f = jax.jit(f)
    jax.block_until_ready(f(*args))
    walls, cpus = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(f(*args))
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return min(walls) * 1e3, median(walls) * 1e3, min(cpus) * 1e3


class _Call:
    precision = None


def pieces(layer, dtype, reps: int, chunks: list[int], fwd_budgets: list[float],
           bwd_rows: list[int], fused_tiles: tuple[int, ...] = (0,)) -> dict[str, tuple[float, float, float]]:
    inputs = bench_layers.make_inputs(layer, dtype, np.random.default_rng(0))
    x, off, mask, kernel, dy = (inputs[k] for k in ("x", "offset", "mask", "kernel", "cotangent"))
    s, p = layer.stride, layer.pad
    attrs = {k: np.int64(v) for k, v in dict(
        kh=layer.kh, kw=layer.kw, stride_h=s, stride_w=s, pad_top=p, pad_bottom=p, pad_left=p,
        pad_right=p, dil_h=1, dil_w=1, offset_groups=1, with_mask=1, deterministic=0).items()}
    acc = _ffi.accumulation_dtype(dtype)
    k = layer.kh * layer.kw
    wk = kernel.reshape(1, k, layer.cin, 1, layer.cout)
    n, ho = layer.n, off.shape[1]

    def sample_images(x, o, m, images):  # cols [images, Ho, Wo, K, C]
        return _ffi.sample_columns(x, o, m, 0, (images, ho), attrs, "cpu")
    sample = jax.jit(lambda x, o, m: sample_images(x, o, m, n)[None])
    cols = sample(x, off, mask)
    dcols = _columns._dcols_dot(dy[None], wk, _Call, acc)
    m_rows = cols.shape[1] * cols.shape[2] * cols.shape[3]
    c2, dy2 = cols.reshape(m_rows, k * layer.cin), dy.reshape(m_rows, layer.cout)

    def fwd_as_conv(c, w):
        c4 = c[0].reshape(*c.shape[1:4], -1)
        return lax.conv_general_dilated(c4, w.reshape(1, 1, k * layer.cin, layer.cout), (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        preferred_element_type=acc)

    def dk_blocked(c2, dy2, rows=1024):
        nb = -(-m_rows // rows)
        pad = nb * rows - m_rows
        cb = jnp.pad(c2, ((0, pad), (0, 0))).reshape(nb, rows, -1)
        db = jnp.pad(dy2, ((0, pad), (0, 0))).reshape(nb, rows, -1)
        part = lax.dot_general(cb, db, (((1,), (1,)), ((0,), (0,))), preferred_element_type=acc)
        return part.sum(0)

    out = {
        "sampler": timed(lambda x, o, m: sample_images(x, o, m, n), (x, off, mask), reps),
        "fwd dot": timed(lambda c, w: _columns._forward_dot(c, w, _Call, acc), (cols, wk), reps),
        # The same GEMM as a 1x1 convolution over [n, Ho, Wo, K C]: whether XLA:CPU's convolution
        # path (which runs the dense 3x3 conv near the matmul rate) beats its dot at this shape.
        "fwd dot as 1x1 conv": timed(fwd_as_conv, (cols, wk), reps),
        # One image's share (the route's chunk where an image's columns exceed the budget): n x
        # these against the whole-batch rows above show what chunking costs the sampler and the dot.
        "sampler, 1 image": timed(lambda x, o, m: sample_images(x, o, m, 1), (x, off, mask), reps),
        "fwd dot, 1 image": timed(lambda c, w: _columns._forward_dot(c, w, _Call, acc), (cols[:, :1], wk),
                                  reps),
        "dk dot (route)": timed(lambda c, d: _columns._dkernel_dot(c, d[None], 1, _Call, acc),
                                (cols, dy), reps),
        "dk dot 2D TN": timed(lambda c, d: lax.dot_general(c, d, (((0,), (0,)), ((), ())),
                                                           preferred_element_type=acc), (c2, dy2), reps),
        "dk dot blocked 1024": timed(dk_blocked, (c2, dy2), reps),
        "dcols dot": timed(lambda d, w: _columns._dcols_dot(d[None], w, _Call, acc), (dy, wk), reps),
        "col2im": timed(lambda x, o, m, d: _ffi.col2im(x, o, m, 0, d[0], attrs, "cpu"), (x, off, mask, dcols),
                         reps),
        # The backward's pieces on one image (its chunk where an image's columns exceed the
        # budget; the whole-batch rows above also pay page faults on their large outputs).
        "dk dot, 1 image": timed(lambda c, d: _columns._dkernel_dot(c, d[None], 1, _Call, acc),
                                 (cols[:, :1], dy[:1]), reps),
        "dcols dot, 1 image": timed(lambda d, w: _columns._dcols_dot(d[None], w, _Call, acc), (dy[:1], wk),
                                    reps),
        "col2im, 1 image": timed(lambda x, o, m, d: _ffi.col2im(x, o, m, 0, d[0], attrs, "cpu"),
                                 (x, off, mask, dcols[:, :1]), reps),
    }

    def op(x, o, m, kern):
        return deft_jax.deform_conv2d(x, o, kern, m, strides=s, padding=p)

    def conv(x, kern):
        return lax.conv_general_dilated(x, kern, (s, s), ((p, p), (p, p)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def with_grads(f):
        def g(*a):
            y, vjp = jax.vjp(f, *a[:-1])
            return y, vjp(a[-1])
        return g

    grad_args = (x, off, mask, kernel, dy)
    for c in chunks:
        with _tiling_set("cpu_chunk_images", (lambda shape, c=c: c) if c else None):
            out[f"op fwd+bwd, chunk {c or 'default'}"] = timed(with_grads(op), grad_args, reps)
    for r in bwd_rows:
        tag = ("whole images" if r == 0 else f"runs of {r} rows") if r >= 0 else "default"
        with _tiling_set("cpu_backward_chunk_rows", (lambda shape, r=r: r) if r >= 0 else None):
            out[f"op fwd+bwd, bwd {tag}"] = timed(with_grads(op), grad_args, reps)
    for mib in fwd_budgets:
        with _tiling_set("CPU_FORWARD_COLUMN_BUDGET_BYTES", int(mib * 2**20) if mib else None):
            rows = tiling.cpu_forward_chunk_rows(_shape(layer, dtype))
            out[f"op fwd, {f'{mib:g} MiB' if mib else 'default'} ({rows} rows)"] = timed(
                op, (x, off, mask, kernel), reps)
    if _ffi.load_blas() == "":  # the CPU fused forward (sampler + OpenBLAS GEMM per tile)
        fused = lambda x, o, m, kern: deft_jax.deform_conv2d(x, o, kern, m, strides=s, padding=p,
                                                             implementation="fused")
        for t in fused_tiles:
            with _tiling_set("cpu_tile_pixels", (lambda shape, t=t: t) if t else None):
                pixels = tiling.cpu_tile_pixels(_shape(layer, dtype))
                out[f"op fwd, fused ({pixels} px tiles)"] = timed(fused, (x, off, mask, kernel),
                                                                  reps)
    out["conv fwd"] = timed(conv, (x, kernel), reps)
    out["conv fwd+bwd"] = timed(with_grads(conv), (x, kernel, dy), reps)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(bench_layers.SUITE))
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--chunks", default="0",
                   help="images per backward chunk to try (0: the route's rule)")
    p.add_argument("--fwd-budgets", default="0",
                   help="forward column budgets to try, MiB (0: tiling.CPU_FORWARD_COLUMN_BUDGET_BYTES)")
    p.add_argument("--bwd-rows", default="",
                   help="CPU backward row runs to try where an image exceeds the budget (0: whole "
                        "images, -1: tiling.cpu_backward_chunk_rows)")
    p.add_argument("--fused-tiles", default="0",
                   help="CPU fused forward: pixels per tile to try (0: tiling.cpu_tile_pixels)")
    args = p.parse_args(argv)
    chunks = [int(c) for c in args.chunks.split(",")]
    bwd_rows = [int(r) for r in args.bwd_rows.split(",") if r]
    fwd_budgets = [float(b) for b in args.fwd_budgets.split(",")]
    print(f"{jax.devices()[0].device_kind}, {len(os.sched_getaffinity(0))} CPUs allowed, "
          f"kernels {_ffi._deft_cpu.cpu_isa()}, jax {jax.__version__}; ms per call: wall min, "
          "wall median, CPU min")
    for name in args.shapes.split(","):
        layer = bench_layers.SUITE[name]
        layer = dataclasses.replace(layer, n=bench_layers.CPU_BATCH[name])
        for dt in args.dtypes.split(","):
            res = pieces(layer, jnp.dtype(dt), args.reps, chunks, fwd_budgets, bwd_rows,
                         tuple(int(t) for t in args.fused_tiles.split(",")))
            print(f"{name} {layer.label()} {dt} (default chunks: backward "
                  f"{tiling.cpu_chunk_images(_shape(layer, dt))} images, forward "
                  f"{tiling.cpu_forward_chunk_rows(_shape(layer, dt))} rows, backward runs "
                  f"{tiling.cpu_backward_chunk_rows(_shape(layer, dt))} rows)")
            for k, (lo, med, cpu) in res.items():
                print(f"  {k:34s} {lo:9.2f} {med:9.2f} {cpu:9.2f}")
            sys.stdout.flush()


@contextlib.contextmanager
def _tiling_set(name: str, value):
    """tiling.<name> = value (None: left as it is) inside the block. The chunking is chosen at
    trace time, so JAX's caches are cleared on entry and exit (no trace of another setting is
    reused)."""
    default = getattr(tiling, name)
    if value is not None:
        setattr(tiling, name, value)
    jax.clear_caches()
    try:
        yield
    finally:
        setattr(tiling, name, default)
        jax.clear_caches()


def _shape(layer, dt):
    ho, wo = layer.out_hw
    return tiling.LayerShape(layer.n, ho, wo, layer.cin, layer.cout, layer.kh * layer.kw, 1, 1,
                             jnp.dtype(dt).name)


if __name__ == "__main__":
    main()
