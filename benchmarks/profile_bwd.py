"""One backward (or, with a third argument "fwd", one forward) of a suite layer, for Nsight
Compute (per-kernel durations and stall reasons).
  ncu --kernel-name regex:deft --section SpeedOfLight python benchmarks/profile_bwd.py S2 bfloat16
  ncu --kernel-name regex:fwd --section WarpStateStats python benchmarks/profile_bwd.py S5 bfloat16 fwd
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

import deft_jax

SUITE = {"S1": (8, 64, 64, 64, 64, 1), "S2": (32, 64, 64, 64, 64, 1), "S3": (32, 28, 28, 128, 128, 1),
         "S4": (32, 14, 14, 256, 256, 1), "S5": (32, 7, 7, 512, 512, 1), "S6": (32, 56, 56, 64, 128, 2)}
name, dt = sys.argv[1], jnp.dtype(sys.argv[2])
n, h, w, c, co, s = SUITE[name]
ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
k = jax.random.split(jax.random.PRNGKey(0), 5)
x = jax.random.normal(k[0], (n, h, w, c), dt)
off = (2 * jax.random.normal(k[1], (n, ho, wo, 18))).astype(dt)
m = jax.random.uniform(k[2], (n, ho, wo, 9)).astype(dt)
kern = (jax.random.normal(k[3], (3, 3, c, co)) / np.sqrt(9 * c)).astype(dt)
dy = jax.random.normal(k[4], (n, ho, wo, co), dt)
if len(sys.argv) > 3 and sys.argv[3] == "fwd":
    f = jax.jit(lambda *a: deft_jax.deform_conv2d(*a, strides=s, padding=1))
else:
    f = jax.jit(lambda *a: jax.vjp(lambda *q: deft_jax.deform_conv2d(*q, strides=s, padding=1), *a)[1](dy))
jax.block_until_ready(f(x, off, kern, m))
