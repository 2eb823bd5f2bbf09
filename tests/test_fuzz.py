"""Property-based fuzzing (hypothesis) of the native op against the float64 reference.

The native CPU handler (``implementation=None``) runs in float64, float32, bfloat16 and float16 on
inputs drawn in float64 and rounded to the dtype; the oracle is the pure-JAX reference
(``implementation="xla"``) in float64 on the *same rounded values* (with its sample point moved to
the one the float32 arithmetic of both implementations computes, so that every floor agrees).
Forward and all four cotangents (x, offset, mask, kernel: ``jax.vjp`` with a random cotangent) are
checked elementwise against

    tol = c_st u(dtype) B  +  (8 sqrt(n) + 8) u(acc) C  +  underflow allowance

where ``B`` is the float64 reference evaluated on |x|, |kernel|, |mask| (and the vjp of that
problem with |dy|): the bilinear weights are nonnegative, so ``B`` is exactly the sum of the
absolute values of the terms of each output's reduction, and a rounding of any term (or of the
result) to a format with unit roundoff u moves it by at most ``u B``. ``C`` (>= B) is the same
problem with each sample point moved onto its four integer corners and summed: it bounds the
offset cotangent (whose coefficients d w / d p are signed, |d w / d p| <= 1) and algebraically
equivalent blends (lerp / corner differences). u = 2^-53, 2^-24, 2^-11, 2^-8 for float64, float32,
float16, bfloat16; u(acc) is float32's (float64's for float64). c_st = 2 for the CPU route (the
sampled column is rounded to the dtype as the GEMM's operand, then the store; where jax's backend is
a GPU, as in benchmarks/gpu_check.sh, this file fuzzes the CUDA kernels instead, float32 at
precision=HIGHEST, with c_st = 2: column rounded to the MMA type, then the store); n = the reduction length of the output
(probabilistic summation bound of Higham & Mary 2019 with lambda = 8). The full derivation is in
tests/accuracy.py's docstring. In float64 the results must also agree with the reference to 1e-10
relative (max |a - b| / max |b|).

Config space: strides 1-3, dilations 1-3, explicit asymmetric paddings 0-3, 'SAME' and 'VALID';
kernels 1x1, 1x2, 1x3, 3x1, 2x2, 2x3, 3x3, 5x5 (rarely); C_in in {1, 2, 3, 5, 6, 9} with every offset
group and feature group count that divides it, C_out = fg * {1, 2, 3, 5, 7}; DCNv1 and DCNv2 (mask
U(0,1), U(-0.5,1.5) or {0, 0.5, 1}); offsets mixed per entry from: exactly 0, N(0, s^2), integers
(points on pixels), integers +- 2^-(4..21), points at/next to the image borders, +-50..1e4 px.
Non-finite values are kept out (they are tested elsewhere).

Reproducible and CI-sized: derandomized, no example database; ``DEFT_FUZZ_PROFILE=deft-fuzz-long``
runs 10x the examples. On failure the message gives the config as a constructor call
(``accuracy.Config(...)``: ``check_native(Config(...), dtype)`` reproduces it) and the worst element
of each failing output (err / tol, |err|, tol, oracle and native values, index).
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import accuracy as A
from helpers import rel_err

settings.register_profile(
    "deft-fuzz-ci", max_examples=32, deadline=None, derandomize=True, database=None,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("deft-fuzz-long", parent=settings.get_profile("deft-fuzz-ci"),
                          max_examples=320)
PROFILE = settings.get_profile(os.environ.get("DEFT_FUZZ_PROFILE", "deft-fuzz-ci"))
DTYPES = ("float64", "float32", "bfloat16", "float16")

# 5x5 once in ten: it multiplies the output work by ~3.
KERNELS = [(3, 3), (1, 1), (1, 3), (3, 1), (2, 2), (2, 3), (1, 2), (3, 3), (3, 2), (5, 5)]
CHANNELS = [1, 2, 3, 5, 6, 9]


@st.composite
def geometries(draw, max_hw_extra=5):
    kernel_size = draw(st.sampled_from(KERNELS))
    strides = draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
    dilation = draw(st.tuples(st.integers(1, 3), st.integers(1, 3)))
    pad = st.tuples(st.integers(0, 3), st.integers(0, 3))
    padding = draw(st.one_of(st.tuples(pad, pad), st.sampled_from(["SAME", "VALID"])))
    c_in = draw(st.sampled_from(CHANNELS))
    feature_groups = draw(st.sampled_from(A.divisors(c_in)))
    offset_groups = draw(st.sampled_from(A.divisors(c_in)))
    c_out = feature_groups * draw(st.sampled_from([1, 3, 5, 2, 7]))
    hw = []
    for axis in range(2):
        lo, hi = (0, 0) if isinstance(padding, str) else padding[axis]
        m = 1 if padding == "SAME" else A.min_extent(kernel_size[axis], dilation[axis], lo, hi)
        hw.append(draw(st.integers(m, m + max_hw_extra)))
    return A.Config(n=draw(st.integers(1, 2)), h=hw[0], w=hw[1], c_in=c_in, c_out=c_out,
                    kernel_size=kernel_size, strides=strides, padding=padding, dilation=dilation,
                    offset_groups=offset_groups, feature_groups=feature_groups,
                    with_mask=draw(st.booleans()))


@st.composite
def data_params(draw):
    """The data half of a config (no recompilation): offset mixture, mask kind, seed."""
    mode = draw(st.sampled_from(("mixed",) + A.OFFSET_KINDS))
    if mode == "mixed":
        weights = draw(st.lists(st.integers(0, 3), min_size=len(A.OFFSET_KINDS),
                                max_size=len(A.OFFSET_KINDS)).filter(any))
    else:
        weights = [int(k == mode) for k in A.OFFSET_KINDS]
    return dict(offset_mix=tuple(float(v) for v in weights),
                offset_scale=draw(st.sampled_from([1.0, 0.25, 2.0, 4.0])),
                mask_kind=draw(st.sampled_from(["unit", "wide", "binary"])),
                seed=draw(st.integers(0, 2**32 - 1)))


def check_native(cfg: A.Config, dtype: str) -> list[str]:
    """Failures (empty if none) of the native CPU handler against the oracle for one config."""
    inp = A.draw_inputs(cfg, dtype)
    orc = A.oracle(cfg, inp, dtype)
    # On a GPU machine (tests/ runs there too) this fuzzes the CUDA kernels, float32 without TF32.
    got = A.run_op(cfg, inp, dtype, implementation=None, precision=A.exact_precision())
    tol = A.tolerances(cfg, orc, dtype, A.native_model())
    bad = [f"{dtype} {v}" for v in A.check(got, orc["want"], tol) if not v.ok]
    if dtype == "float64":
        for name, want in orc["want"].items():
            if rel_err(got[name], want) > 1e-10:
                bad.append(f"float64 {name}: rel_err {rel_err(got[name], want):.3g} > 1e-10")
    return bad


@settings(PROFILE)
@given(geometry=geometries(), data=data_params())
def test_fuzz_native_vs_reference(geometry, data):
    """Every dtype, forward + 4 cotangents, over the whole config space."""
    # Each example compiles new programs, and XLA:CPU's compiled code stays mapped while cached
    # (~190 mappings per example): without this, a run of ~300 examples in one process hit
    # vm.max_map_count (65530) and crashed inside XLA's compiler.
    jax.clear_caches()
    cfg = dataclasses.replace(geometry, **data)
    note(repr(cfg))
    bad = [msg for dtype in DTYPES for msg in check_native(cfg, dtype)]
    assert not bad, repr(cfg) + "\n" + "\n".join(bad)


# A few fixed geometries (compiled once) under many offset / mask draws: the data space densely.
FIXED = [
    A.Config(n=2, h=6, w=7, c_in=6, c_out=9, offset_groups=3, feature_groups=3),
    A.Config(n=1, h=5, w=5, c_in=5, c_out=5, kernel_size=(1, 3), strides=(2, 1),
             padding=((0, 3), (2, 1)), dilation=(1, 2), offset_groups=5, with_mask=False),
    A.Config(n=2, h=4, w=6, c_in=2, c_out=3, kernel_size=(2, 2), padding="SAME", strides=(1, 3)),
    A.Config(n=1, h=7, w=4, c_in=9, c_out=3, kernel_size=(3, 1), padding="VALID", dilation=(3, 1),
             offset_groups=3, feature_groups=3),
]


@settings(PROFILE, max_examples=PROFILE.max_examples * 3)
@given(geometry=st.sampled_from(FIXED), data=data_params(), dtype=st.sampled_from(DTYPES))
def test_fuzz_offsets_and_masks(geometry, data, dtype):
    cfg = dataclasses.replace(geometry, **data)
    note(repr(cfg))
    bad = check_native(cfg, dtype)
    assert not bad, repr(cfg) + "\n" + "\n".join(bad)


@pytest.mark.parametrize("kind", A.OFFSET_KINDS)
def test_each_offset_kind(kind):
    """Each offset kind alone, every dtype, on one DCNv2 geometry with groups (deterministic)."""
    cfg = dataclasses.replace(FIXED[0], offset_mix=tuple(float(k == kind) for k in A.OFFSET_KINDS),
                              seed=A.OFFSET_KINDS.index(kind))
    bad = [msg for dtype in DTYPES for msg in check_native(cfg, dtype)]
    assert not bad, repr(cfg) + "\n" + "\n".join(bad)


def test_bounds_are_not_vacuous():
    """The tolerance is a small multiple of u(dtype) times the terms' magnitude, and the native
    bfloat16 error really is of that order (the bound would catch a dropped term)."""
    c_st = A.MODELS[A.native_model()].c_st
    cfg = A.Config(n=2, h=9, w=9, c_in=16, c_out=16, seed=3)
    inp = A.draw_inputs(cfg, "bfloat16")
    orc = A.oracle(cfg, inp, "bfloat16")
    tol = A.tolerances(cfg, orc, "bfloat16", A.native_model())
    got = A.run_op(cfg, inp, "bfloat16")
    for v in A.check(got, orc["want"], tol):
        assert v.ok, v
        assert v.max_ratio > 1e-3, v  # the error is not negligible against the bound
    for name in ("y", "dx", "dkernel", "dmask"):
        scale = np.abs(orc["want"][name]).max()
        # and the bound is tight enough to matter: a few percent of the output's scale
        assert np.max(tol[name]) < 0.05 * c_st * scale, name


def test_fuzz_script_batched_equals_one_by_one(tmp_path):
    """benchmarks/fuzz_gpu.py on the CPU handler: configs of a geometry evaluated in batches of 8
    (one call each) give the same checks and worst ratios as one call per config."""
    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_gpu.py"
    out = {}
    for b in (1, 8):
        path = tmp_path / f"b{b}.json"
        r = subprocess.run([sys.executable, str(script), "--platform", "cpu", "--configs", "20",
                            "--geometries", "2", "--batch", str(b), "--runs", "float64,bfloat16",
                            "--out", str(path)], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        out[b] = json.loads(path.read_text())
    assert out[1]["configs"] == out[8]["configs"] == 20
    assert out[1]["runs_passed"] == out[8]["runs_passed"] == 40
    for run, worst in out[1]["worst_err_over_tol"].items():
        for name, v in worst.items():
            assert abs(out[8]["worst_err_over_tol"][run][name] - v) <= 1e-9 * max(v, 1.0), (run, name)
