"""Does compute-sanitizer's initcheck see XLA's bf16 GEMM output as initialised?

initcheck on benchmarks/nonfinite_sanitize.py (H100, 2026-12-07) reported 20,592 reads of
"uninitialised" memory, all in the column route's col2im for bfloat16, all at addresses of its
float32 column cotangent (dcols = dy . kernel^T, XLA's dot of two bf16 operands into float32),
none for float32. Either col2im reads past what the dot wrote, or initcheck does not count the
GEMM's stores (e.g. Hopper TMA stores) as writes. Here the same dot at that layer's shape
(2 images of 11x13 pixels, 136 output channels, 9 taps x 64 channels) is read by XLA's own
reduction only: an initcheck report here, against XLA's kernel, means the sanitizer does not see
the GEMM's writes. Run: compute-sanitizer --tool initcheck python benchmarks/initcheck_dot_probe.py
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

rng = np.random.default_rng(0)
dy = jnp.asarray(rng.normal(size=(1, 2 * 11 * 13, 136)), jnp.bfloat16)
wk = jnp.asarray(rng.normal(size=(1, 9 * 64, 136)), jnp.bfloat16)


def dcols_sum(a, b):  # [1, pixels, K C] in float32, then a reduction that reads every element
    d = lax.dot_general(a, b, (((2,), (2,)), ((0,), (0,))), preferred_element_type=jnp.float32)
    return jnp.sum(jnp.abs(d), axis=1)


f = jax.jit(dcols_sum)
print("dot probe:", jax.block_until_ready(f(dy, wk)).shape)
for line in f.lower(dy, wk).compile().as_text().splitlines():  # which GEMM ran (cuBLAS or Triton)
    if "custom_call_target" in line or "kind=" in line:
        print("  hlo:", line.strip()[:200])
print("dot probe done")
