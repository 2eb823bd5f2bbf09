"""bfloat16 / float16 (and float32) accuracy of the native op on fixed, realistic layers.

Each result -- forward and the four cotangents (x, offset, mask, kernel) -- is compared with the
pure-JAX reference in float64 on the *same* dtype-rounded inputs and cotangent (the oracle runs on
the CPU), elementwise against a bound derived from the number format, not fitted:

    |got - want| <= c_st u(dtype) B + (8 sqrt(n) + 8) u(float32) C + underflow allowance

with u = 2^-8 (bfloat16), 2^-11 (float16), 2^-10 (TF32 operands: 10 mantissa bits, truncated
where tensor cores read unrounded float32), 2^-24 (float32); B = the float64
reference on |x|, |kernel|, |mask| (and the vjp of that problem with |dy|), which is the sum of the
absolute values of the terms of each output element's reduction, because the bilinear weights are
nonnegative; C = the same with every sample point moved onto its four integer corners (bounds the
offset cotangent, whose coefficients are signed); n = the reduction length. c_st counts the roundings
to the dtype on one term's path: 2 for the CPU route (the sampled column in the dtype as the GEMM
operand, then the store) and for the GPU kernels (the sampled column as MMA operand, then the
store; with TF32 the two MMA operands), 3 for the reference (its column, column cotangent and corner cotangents are in the
dtype, then the store), whose dx is moreover a scatter-add in the dtype (the summation term then
uses u(dtype)). Derivation: tests/accuracy.py.

The native tests run for the platform they name: "cpu" where jax's default backend is the CPU (the
C++ handler), "gpu" (marked ``gpu``) where a CUDA GPU and the CUDA module are present; each skips
elsewhere.
"""

import jax
import pytest
from jax import lax

import accuracy as A
from helpers import GPU, HAS_GPU


CPU = jax.devices("cpu")[0]
PLATFORMS = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        jax.default_backend() != "cpu", reason="the C++ handler runs where the CPU is jax's backend")),
    pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not HAS_GPU, reason="needs a CUDA GPU and the deft_jax CUDA module")]),
]
MODEL = {"cpu": "native-cpu", "gpu": "native-gpu"}

# Realistic layers: offsets ~ N(0, 2^2) px, mask ~ U(0, 1) (DESIGN.md's protocol), 3x3, pad 1.
CONFIGS = [
    A.Config(n=2, h=9, w=9, c_in=16, c_out=16, seed=11),
    A.Config(n=2, h=9, w=9, c_in=16, c_out=16, with_mask=False, seed=12),
    A.Config(n=2, h=9, w=9, c_in=16, c_out=16, offset_groups=2, feature_groups=2, seed=13),
    A.Config(n=1, h=14, w=14, c_in=32, c_out=48, strides=(2, 2), padding=((1, 0), (0, 1)), seed=14),
    A.Config(n=2, h=8, w=8, c_in=64, c_out=64, offset_groups=4, seed=15),
    A.Config(n=1, h=12, w=10, c_in=24, c_out=8, kernel_size=(5, 5), padding=((2, 2), (2, 2)),
             dilation=(1, 2), offset_scale=4.0, seed=16),
]


def _ids(c):
    return (f"{c.n}x{c.h}x{c.w}x{c.c_in}-{c.c_out}-k{c.kernel_size[0]}{c.kernel_size[1]}"
            f"-G{c.offset_groups}-fg{c.feature_groups}" + ("" if c.with_mask else "-v1"))


def _verify(cfg, dtype, platform, implementation=None, model=None, precision=None, operand=None):
    inp = A.draw_inputs(cfg, dtype)
    orc = A.oracle(cfg, inp, dtype, device=CPU)
    device = GPU if platform == "gpu" else CPU
    got = A.run_op(cfg, inp, dtype, implementation=implementation, precision=precision,
                   device=device)
    tol = A.tolerances(cfg, orc, dtype, model or MODEL[platform], operand=operand)
    verdicts = A.check(got, orc["want"], tol)
    assert len(verdicts) == (5 if cfg.with_mask else 4)
    bad = [str(v) for v in verdicts if not v.ok]
    assert not bad, f"{dtype} {platform} impl={implementation}\n" + "\n".join(bad)
    return verdicts


@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("platform", PLATFORMS)
def test_half_native(platform, dtype, cfg):
    _verify(cfg, dtype, platform)


@pytest.mark.parametrize("cfg", CONFIGS[::2], ids=_ids)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_float32_native(platform, cfg):
    """float32 without TF32 (precision=HIGHEST; the CPU has no TF32 either)."""
    _verify(cfg, "float32", platform, precision=lax.Precision.HIGHEST)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and the deft_jax CUDA module")
@pytest.mark.parametrize("cfg", CONFIGS[::2], ids=_ids)
def test_float32_tf32_gpu(cfg):
    """float32 at DEFAULT precision: TF32 operands (u = 2^-10), float32 accumulation."""
    _verify(cfg, "float32", "gpu", precision=lax.Precision.DEFAULT, operand="tf32")


@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=_ids)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_reference(dtype, cfg):
    """The same-dtype reference (implementation='xla', on the CPU) under its own rounding model:
    the native op is held to a bound at least as strict as the reference's own error."""
    _verify(cfg, dtype, "cpu", implementation="xla", model="reference")
