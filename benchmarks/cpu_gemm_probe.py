"""The CPU fused forward's GEMM against XLA's dot, on one S2 image's product.

Times [M, K] x [K, N] in float32 (default M = 4096 pixels, K = 9 x 64, N = 64: one 64x64x64 image
of the S2 layer, the column route's forward dot) as XLA's jitted dot and as the OpenBLAS sgemm the
fused forward calls (deft_jax._ffi.load_blas: scipy-openblas32, single-threaded), min and median
ms over --reps calls. Run it on one core (`taskset -c 0`) to compare the kernels alone; the
OpenBLAS kernels are the ones it picks for this CPU unless OPENBLAS_CORETYPE names others when
the library loads (printed; the development VM's environment sets Haswell).

  taskset -c 0 python benchmarks/cpu_gemm_probe.py
  OPENBLAS_CORETYPE=SkylakeX taskset -c 0 python benchmarks/cpu_gemm_probe.py
"""
from __future__ import annotations

import argparse
import ctypes
import os
import time
from statistics import median

import jax
import jax.numpy as jnp
import numpy as np

from deft_jax import _ffi


def _times(f, reps: int) -> tuple[float, float]:
    f()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return min(ts) * 1e3, median(ts) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, default=4096)
    p.add_argument("--k", type=int, default=576)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--reps", type=int, default=21)
    args = p.parse_args()
    why = _ffi.load_blas()
    if why:
        raise SystemExit(why)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(args.m, args.k)).astype(np.float32)
    b = rng.normal(size=(args.k, args.n)).astype(np.float32)
    c = np.empty((args.m, args.n), np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    dot = jax.jit(lambda x, y: x @ y)
    xla = _times(lambda: dot(ja, jb).block_until_ready(), args.reps)

    fp = ctypes.POINTER(ctypes.c_float)
    sgemm = _ffi._blas_lib.scipy_cblas_sgemm  # the library load_blas loaded, as the op calls it
    sgemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, fp, ctypes.c_int, fp, ctypes.c_int,
                                            ctypes.c_float, fp, ctypes.c_int]
    pa, pb, pc = (x.ctypes.data_as(fp) for x in (a, b, c))
    blas = _times(lambda: sgemm(101, 111, 111, args.m, args.n, args.k, 1.0, pa, args.k, pb, args.n,
                                0.0, pc, args.n), args.reps)
    np.testing.assert_allclose(c, np.asarray(dot(ja, jb)), rtol=1e-3, atol=1e-3)
    print(f"[{args.m}, {args.k}] x [{args.k}, {args.n}] float32 on {len(os.sched_getaffinity(0))} "
          f"CPU(s), ms min / median of {args.reps}:")
    print(f"  XLA dot                          {xla[0]:7.3f} {xla[1]:7.3f}")
    print(f"  OpenBLAS sgemm ({_ffi.blas_core():>10} kernels) {blas[0]:7.3f} {blas[1]:7.3f}")


if __name__ == "__main__":
    main()
