"""What a training step adds to a layer test, on GPU: many steps of one compiled program (which XLA
runs as a CUDA graph that it replays), arrays created between the steps, donated state.

Written for the bf16 training divergence reported while every layer test passed, against the
suspected mechanism: a workspace from XLA's scratch allocator, whose address a replayed CUDA
graph would keep after XLA handed the memory to other arrays (sentinels must survive, the losses
must follow the reference). It does not reproduce that divergence: on an H100 and on an H200 the
code from before the workspace change (eb2e2d0) passed it, and trained the issue's reproducer
normally too (benchmarks/RESULTS.md). It guards the mechanism; the divergence's cause is unknown.
Skipped without a GPU or the CUDA module.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deft_jax
from helpers import GPU, needs_gpu


pytestmark = [pytest.mark.gpu, needs_gpu]

DTYPES = ["bfloat16", "float16", "float32"]


def _init(rng, channels=(8, 32, 32, 32), taps=9):
    params = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        params.append({
            "kernel": rng.normal(size=(3, 3, c_in, c_out)).astype(np.float32) / np.sqrt(9 * c_in),
            "offset": rng.normal(size=(3, 3, c_in, 3 * taps)).astype(np.float32) * 0.05,
        })
    params.append({"head": rng.normal(size=(channels[-1], 10)).astype(np.float32) * 0.1})
    return jax.tree.map(jnp.asarray, params)


def _forward(params, images, dtype, implementation):
    """A small DCNv2 network: each layer predicts its offsets and sigmoid mask with a dense conv."""
    h = images.astype(dtype)
    for layer in params[:-1]:
        pred = jax.lax.conv_general_dilated(h, layer["offset"].astype(dtype), (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        offset, mask = pred[..., :18] * 4.0, jax.nn.sigmoid(pred[..., 18:])
        h = deft_jax.deform_conv2d(h, offset, layer["kernel"].astype(dtype), mask, padding=1,
                                   implementation=implementation)
        # A batch norm: the statistics make every output depend on the whole batch.
        mean = h.astype(jnp.float32).mean((0, 1, 2))
        var = h.astype(jnp.float32).var((0, 1, 2))
        h = jax.nn.relu((h.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + 1e-5)).astype(dtype)
    logits = h.astype(jnp.float32).mean((1, 2)) @ params[-1]["head"]
    return logits


def _loss(params, images, labels, dtype, implementation):
    logits = _forward(params, images, dtype, implementation)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


@functools.partial(jax.jit, static_argnums=(3, 4), donate_argnums=0)
def _step(params, images, labels, dtype, implementation):
    loss, grads = jax.value_and_grad(_loss)(params, images, labels, dtype, implementation)
    return jax.tree.map(lambda p, g: p - 0.05 * g, params, grads), loss


def _train(dtype, implementation, steps, seed=0):
    rng = np.random.default_rng(seed)
    params = jax.device_put(_init(np.random.default_rng(1)), GPU)
    losses, sentinels = [], []
    for i in range(steps):
        # A fresh batch every step, as a training loop does: arrays allocated between replays.
        images = jax.device_put(rng.normal(size=(16, 16, 16, 8)).astype(np.float32), GPU)
        labels = jax.device_put(rng.integers(0, 10, size=(16,)), GPU)
        params, loss = _step(params, images, labels, dtype, implementation)
        losses.append(loss)
        sentinels.append(jnp.full((1 << 16,), float(i), jnp.float32, device=GPU))
    losses = np.array(jax.device_get(losses), np.float64)
    for i, s in enumerate(sentinels):
        got = np.asarray(s)
        assert np.all(got == i), f"an array created after step {i} was overwritten " \
                                 f"({np.count_nonzero(got != i)} of {got.size} entries changed)"
    return losses


@pytest.mark.parametrize("dtype", DTYPES)
def test_training_steps_follow_the_reference(dtype):
    """Eight SGD steps: finite losses, arrays created between steps untouched, and the native
    loss curve on the reference's (tolerance from the type: both start from the same parameters;
    16-bit rounding makes the curves drift apart slowly, not jump)."""
    native = _train(dtype, None, steps=8)
    ref = _train(dtype, "xla", steps=8)
    assert np.all(np.isfinite(native)), native
    # float32 runs both sides with TF32 operands (the default precision on GPU: 10-bit
    # mantissas, as float16), rounded in different orders: its curves drift like float16's
    # (measured 8.7e-3 after 8 steps, H200).
    tol = {"float32": 2e-2, "bfloat16": 5e-2, "float16": 2e-2}[dtype]
    np.testing.assert_allclose(native, ref, rtol=tol, atol=tol,
                               err_msg=f"{dtype} native losses {native} vs reference {ref}")
