"""Run by test_sharding.py in a fresh process with 4 virtual CPU devices.

Checks that a batch-sharded jit of the op and its gradient equals the one-device result and
that the compiled HLO moves no activation between devices (no all-gather / all-to-all; the
kernel cotangent's all-reduce is expected). SHARDING_IMPL="fused" runs the CPU fused forward
(its backward is the column route's). Prints "OK" on success.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import deft_jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
assert len(jax.devices()) == 4, jax.devices()
IMPL = os.environ.get("SHARDING_IMPL") or None

rng = np.random.default_rng(0)
N, H, W, C, CO, G = 8, 6, 5, 4, 6, 2
x = jnp.asarray(rng.normal(size=(N, H, W, C)))
off = jnp.asarray(rng.normal(size=(N, H, W, G * 18)) * 2)
mask = jnp.asarray(rng.uniform(size=(N, H, W, G * 9)))
kernel = jnp.asarray(rng.normal(size=(3, 3, C, CO)))


def loss(x, off, kernel, mask):
    return jnp.sum(jnp.tanh(deft_jax.deform_conv2d(x, off, kernel, mask, padding=1, implementation=IMPL)))


step = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))
ref_v, ref_g = jax.jit(step)(x, off, kernel, mask)

mesh = Mesh(np.array(jax.devices()), ("data",))
batch = NamedSharding(mesh, P("data"))
repl = NamedSharding(mesh, P())
args = (jax.device_put(x, batch), jax.device_put(off, batch), jax.device_put(kernel, repl),
        jax.device_put(mask, batch))
sharded = jax.jit(step, in_shardings=(batch, batch, repl, batch))
v, g = sharded(*args)
assert abs(float(v - ref_v)) < 1e-9 * max(1.0, abs(float(ref_v))), (v, ref_v)
for a, b in zip(g, ref_g):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-10)
assert g[0].sharding.spec[0] == "data", g[0].sharding  # dx stays batch-sharded

fwd = jax.jit(lambda *a: deft_jax.deform_conv2d(*a, padding=1, implementation=IMPL),
              in_shardings=(batch, batch, repl, batch))
np.testing.assert_allclose(np.asarray(fwd(*args)),
                           np.asarray(deft_jax.deform_conv2d(x, off, kernel, mask, padding=1)), rtol=1e-12)

for name, f in (("forward", fwd), ("grad", sharded)):
    hlo = f.lower(*args).compile().as_text()
    for bad in ("all-gather", "all-to-all", "collective-permute"):
        assert bad not in hlo, f"{name}: {bad} in the compiled HLO"
    forward_target = deft_jax._ffi.target_names("cpu", "fused" if IMPL == "fused" else "columns")[0]
    assert forward_target in hlo, f"{name}: the custom call is missing"
    # The per-device custom call sees a quarter of the images.
    assert f"f64[{N // 4},{H},{W},{C}]" in hlo, name
print("OK")
