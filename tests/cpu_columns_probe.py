"""Run by test_cpu_columns.py in a fresh process: hashes of the CPU route's outputs.

PROBE_CPUS (comma-separated CPU ids) restricts the process to those CPUs before jax starts, which
sets the size of XLA's intra-op thread pool (and so of the native handlers' task pool).
DEFT_CPU_ISA caps the instruction-set build of the kernels. Prints "name sha256" per output of
the native sampler (cols_*) and col2im (col2im_*), of the CPU fused forward where its BLAS loads
(fused_*) and of the whole op (op_*), the thread and
instruction-set counts, and the float64 error against the reference (max_rel_err_f64).
"""

import hashlib
import os

if os.environ.get("PROBE_CPUS"):
    os.sched_setaffinity(0, {int(c) for c in os.environ["PROBE_CPUS"].split(",")})

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import deft_jax  # noqa: E402
from deft_jax import _ffi  # noqa: E402

jax.config.update("jax_enable_x64", True)
rng = np.random.default_rng(0)
N, H, W, C, CO, G = 3, 19, 21, 48, 40, 2
x0 = rng.normal(size=(N, H, W, C))
off0 = rng.normal(size=(N, H, W, G * 18)) * 2
mask0 = rng.uniform(size=(N, H, W, G * 9))
kernel0 = rng.normal(size=(3, 3, C, CO)) / np.sqrt(9 * C)
dy0 = rng.normal(size=(N, H, W, CO))
dcols0 = rng.normal(size=(N, H, W, 9, C))
attrs = {k: np.int64(v) for k, v in dict(kh=3, kw=3, stride_h=1, stride_w=1, pad_top=1,
                                          pad_bottom=1, pad_left=1, pad_right=1, dil_h=1, dil_w=1,
                                          offset_groups=G, with_mask=1, deterministic=0).items()}


def digest(a) -> str:
    return hashlib.sha256(np.asarray(a).tobytes()).hexdigest()


def op(impl=None):
    def f(x, off, kernel, mask):
        return deft_jax.deform_conv2d(x, off, kernel, mask, padding=1, implementation=impl)
    return f


print("threads", len(os.sched_getaffinity(0)))
print("isa", _ffi._deft_cpu.cpu_isa())
for name, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
    x, off, mask, kernel, dy = (jnp.asarray(a, dtype) for a in (x0, off0, mask0, kernel0, dy0))
    cols = jax.jit(lambda x, o, m: _ffi.sample_columns(x, o, m, 0, (N, off0.shape[1]), attrs, "cpu"))(x, off, mask)
    print(f"cols_{name}", digest(cols))
    grads = jax.jit(lambda x, o, m, d: _ffi.col2im(x, o, m, 0, d, attrs, "cpu"))(
        x, off, mask, jnp.asarray(dcols0, jnp.float32))
    for g_name, g in zip(("dx", "doffset", "dmask"), grads):
        print(f"col2im_{g_name}_{name}", digest(g))
    # One image: 2 (group) tasks, so dx is split into row bands by thread count (1 band on one
    # thread, 2 on two): the same bits either way.
    one = jax.jit(lambda x, o, m, d: _ffi.col2im(x, o, m, 1, d, attrs, "cpu"))(
        x, off, mask, jnp.asarray(dcols0[1:2], jnp.float32))
    print(f"col2im_one_image_dx_{name}", digest(one[0]))
    # A run of rows that crosses images (rows 35 .. 41 of 3 x 19, image 1 into image 2): the bits
    # of those rows of the whole-batch columns.
    run = jax.jit(lambda x, o, m: _ffi.sample_columns(x, o, m, 5, (1, 7), attrs, "cpu"))(x, off, mask)
    flat = cols.reshape(-1, *cols.shape[2:])
    assert bool(jnp.all(run[0] == flat[35:42])), "row run differs from the whole-batch columns"
    y, vjp = jax.vjp(op(), x, off, kernel, mask)
    for o_name, o in zip(("y", "dx", "doffset", "dkernel", "dmask"), (y, *vjp(dy))):
        print(f"op_{o_name}_{name}", digest(o))
    if _ffi.load_blas() == "":  # the CPU fused forward: its own tiles and GEMMs, no XLA dot
        print(f"fused_y_{name}", digest(jax.jit(op("fused"))(x, off, kernel, mask)))

args = tuple(jnp.asarray(a) for a in (x0, off0, kernel0, mask0))
worst = 0.0
outs = {}
for impl in (None, "xla"):
    y, vjp = jax.vjp(op(impl), *args)
    outs[impl] = (y, *vjp(jnp.asarray(dy0)))
for a, b in zip(outs[None], outs["xla"]):
    worst = max(worst, float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))))
print("max_rel_err_f64", worst)
