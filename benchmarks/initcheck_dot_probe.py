"""Does compute-sanitizer's initcheck see XLA's bf16 GEMM output as initialised?

initcheck on benchmarks/nonfinite_sanitize.py (H100, 2026-12-07) reported 20,592 reads of
"uninitialised" memory, all in the column route's col2im for bfloat16, all at addresses of its
float32 column cotangent (dcols = dy . kernel^T, XLA's dot of two bf16 operands into float32),
none for float32. Either col2im reads past what the dot wrote, or initcheck does not count the
GEMM's stores (e.g. Hopper TMA stores) as writes. Here that dot, at that layer's shape (2 images
of 11x13 pixels, 136 output channels, 9 taps x 64 channels in 2 offset groups), is one jitted
program whose output buffer two later programs read: (a) XLA's own reduction, (b) deft's col2im.
Reports in both mean initcheck does not see the GEMM's writes; reports in (b) only point at
col2im. Autotuning is off (its candidate comparisons read unwritten buffers by design and are
slow under the sanitizer). Each step prints its name before it runs, so the log places every
report. Run: compute-sanitizer --tool initcheck python benchmarks/initcheck_dot_probe.py
"""
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from deft_jax import _ffi  # noqa: E402

N, H, W, C, COUT, G, K = 2, 11, 13, 64, 136, 2, 9
rng = np.random.default_rng(0)
dy = jnp.asarray(rng.normal(size=(1, N * H * W, COUT)), jnp.bfloat16)
wk = jnp.asarray(rng.normal(size=(1, K * C, COUT)), jnp.bfloat16)
x = jnp.asarray(rng.normal(size=(N, H, W, C)), jnp.bfloat16)
offset = jnp.asarray(rng.normal(size=(N, H, W, G * K * 2)), jnp.bfloat16)
mask = jnp.asarray(rng.uniform(size=(N, H, W, G * K)), jnp.bfloat16)
attrs = {k: np.int64(v) for k, v in dict(
    kh=3, kw=3, stride_h=1, stride_w=1, pad_top=1, pad_bottom=1, pad_left=1, pad_right=1, dil_h=1,
    dil_w=1, offset_groups=G, with_mask=1, deterministic=0).items()}


def step(name, f, *args):
    print(f"step {name}: launching", flush=True)
    out = jax.block_until_ready(f(*args))
    print(f"step {name}: done", flush=True)
    return out


dot = jax.jit(lambda a, b: lax.dot_general(a, b, (((2,), (2,)), ((0,), (0,))),
                                           preferred_element_type=jnp.float32))
for line in dot.lower(dy, wk).compile().as_text().splitlines():  # which GEMM runs
    if "custom_call_target" in line or "kind=" in line:
        print("  hlo:", line.strip()[:200])
dcols = step("dot (bf16 x bf16 -> f32)", dot, dy, wk)
step("xla reduction reads the dot's output", jax.jit(lambda d: jnp.sum(jnp.abs(d), axis=1)), dcols)
step("col2im reads the dot's output",
     jax.jit(lambda x, o, m, d: _ffi.col2im(x, o, m, 0, d.reshape(N, H, W, K, C), attrs, "cuda")),
     x, offset, mask, dcols)
host = jnp.asarray(np.asarray(dcols))  # the same values, written by a host-to-device copy
step("col2im reads a copied buffer",
     jax.jit(lambda x, o, m, d: _ffi.col2im(x, o, m, 0, d.reshape(N, H, W, K, C), attrs, "cuda")),
     x, offset, mask, host)
print("dot probe done", flush=True)
