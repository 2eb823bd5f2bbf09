"""Every malformed call raises a ValueError naming the argument, before any native call."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import deft_jax
from deft_jax import _ffi


def Z(*shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


def good(**over):
    a = dict(x=jnp.zeros((2, 8, 8, 4), jnp.float32), offset=jnp.zeros((2, 8, 8, 18), jnp.float32),
             kernel=jnp.zeros((3, 3, 4, 6), jnp.float32), mask=jnp.zeros((2, 8, 8, 9), jnp.float32))
    kw = dict(padding=1)
    for k, v in over.items():
        (a if k in a else kw)[k] = v
    return a, kw


@pytest.fixture(autouse=True)
def no_native_call(monkeypatch):
    # Validation must fail before anything reaches the FFI layer.
    def boom(*a, **k):
        raise AssertionError("native call reached")
    monkeypatch.setattr(_ffi, "forward", boom)  # CUDA
    monkeypatch.setattr(_ffi, "sample_columns", boom)  # CPU


BAD = {
    "x rank": (dict(x=Z(8, 8, 4)), "x", r"rank 4"),
    "offset rank": (dict(offset=Z(2, 8, 8, 2, 9)), "offset", r"rank 4"),
    "kernel rank": (dict(kernel=Z(3, 3, 4)), "kernel", r"rank 4"),
    "mask rank": (dict(mask=Z(2, 8, 8)), "mask", r"rank 4"),
    "offset channels": (dict(offset=Z(2, 8, 8, 17)), "offset", r"G\*18"),
    "offset spatial": (dict(offset=Z(2, 7, 8, 18)), "offset", r"\(2, 8, 8, G\*18\)"),
    "offset batch": (dict(offset=Z(3, 8, 8, 18)), "offset", r"\(2, 8, 8"),
    "offset groups do not divide C_in": (dict(offset=Z(2, 8, 8, 54)), "offset", "divide C_in"),
    "mask channels": (dict(mask=Z(2, 8, 8, 18)), "mask", r"\(2, 8, 8, 9\)"),
    "mask spatial": (dict(mask=Z(2, 4, 4, 9)), "mask", r"\(2, 8, 8, 9\)"),
    "kernel C_in": (dict(kernel=Z(3, 3, 5, 6)), "kernel", r"\(3, 3, 4, C_out\)"),
    "feature groups do not divide C_in": (dict(feature_group_count=3, kernel=Z(3, 3, 1, 6)),
                                          "feature_group_count", "divide"),
    "feature groups do not divide C_out": (dict(feature_group_count=2, kernel=Z(3, 3, 2, 5)),
                                           "feature_group_count", "divide"),
    "zero stride": (dict(strides=0), "strides", "positive"),
    "negative dilation": (dict(kernel_dilation=(1, -1)), "kernel_dilation", "positive"),
    "bad strides type": (dict(strides=(1, 2, 3)), "strides", "pair"),
    "bad padding string": (dict(padding="FULL"), "padding", "SAME"),
    "negative padding": (dict(padding=-1), "padding", "non-negative"),
    "empty output": (dict(x=Z(2, 2, 2, 4), padding=0), "x", "empty output"),
    "zero batch": (dict(x=Z(0, 8, 8, 4)), "x", "zero-size"),
    "integer x": (dict(x=jnp.zeros((2, 8, 8, 4), jnp.int32)), "x", "floating"),
    "mixed dtypes": (dict(kernel=jnp.zeros((3, 3, 4, 6), jnp.bfloat16)), "kernel", "differs"),
    "bad implementation": (dict(implementation="cuda"), "implementation", "expected one of"),
    "deterministic not a bool": (dict(deterministic=1), "deterministic", "expected a bool"),
    "deterministic with the reference": (dict(deterministic=True, implementation="xla"), "deterministic",
                                         "native implementation"),
    "not an array": (dict(x=[[1.0]]), "x", "array"),
}
# Backend-dependent: "fused" on a CPU backend needs OpenBLAS (test_cpu_fused.py checks the error
# with the BLAS made unavailable).
if jax.default_backend() == "cpu" and deft_jax._ffi.load_blas() != "":
    BAD["fused on CPU without BLAS"] = (dict(implementation="fused"), "implementation", "OpenBLAS")


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(name):
    over, arg, pattern = BAD[name]
    a, kw = good(**over)
    with pytest.raises(ValueError, match=pattern) as e:
        deft_jax.deform_conv2d(a["x"], a["offset"], a["kernel"], a["mask"], **kw)
    assert str(e.value).startswith(arg), str(e.value)


def test_good_input_passes_validation():
    a, kw = good()
    with pytest.raises(AssertionError, match="native call reached"):
        deft_jax.deform_conv2d(a["x"], a["offset"], a["kernel"], a["mask"], **kw)


# The CPU handlers' own checks, each call made with inconsistent buffers or attributes on purpose
# (bypassing the Python validation); run in a child process (below), one line per step.
_NATIVE_CHECKS = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from deft_jax import _ffi
    try:  # for a crash report: which C++ runtime the process holds
        print("libstdc++:", sorted({l.split()[-1] for l in open("/proc/self/maps") if "libstdc++" in l}))
    except OSError:
        pass
    with jax.default_device(jax.devices("cpu")[0]):
        sample, col2im = _ffi.target_names("cpu")
        x = jnp.zeros((1, 4, 4, 2), jnp.float32)
        cols = jax.ShapeDtypeStruct((1, 4, 4, 9, 2), jnp.float32)
        attrs = dict(kh=3, kw=3, stride_h=1, stride_w=1, pad_top=1, pad_bottom=1, pad_left=1,
                     pad_right=1, dil_h=1, dil_w=1, offset_groups=1, with_mask=0, deterministic=0)
        attrs = {k: np.int64(v) for k, v in attrs.items()}
        no_mask, zero = jnp.zeros((0,), jnp.float32), jnp.int32(0)
        offset = jnp.zeros((1, 4, 4, 18), jnp.float32)
        call = jax.ffi.ffi_call(sample, cols)
        grads = (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(offset.shape, jnp.float32),
                 jax.ShapeDtypeStruct((0,), jnp.float32))
        back = jax.ffi.ffi_call(col2im, grads)
        dx0 = jnp.zeros(x.shape, jnp.float32)  # the CPU col2im adds its scatter to this dx

        def expect(step, pattern, thunk):
            print("step", step, flush=True)  # a crash names the step it died in
            try:
                jax.block_until_ready(thunk())
            except Exception as e:
                assert pattern in str(e), (step, str(e))
                return
            raise AssertionError(f"{step}: no error")

        expect("offset channels", "offset",  # 17 channels, 18 expected
               lambda: call(x, jnp.zeros((1, 4, 4, 17), jnp.float32), no_mask, zero, **attrs))
        expect("offset groups", "offset_groups",  # 3 groups do not divide C = 2
               lambda: call(x, jnp.zeros((1, 4, 4, 54), jnp.float32), no_mask, zero,
                            **(attrs | dict(offset_groups=np.int64(3)))))
        expect("mask without with_mask", "non-empty mask",
               lambda: call(x, offset, jnp.zeros((1, 4, 4, 9), jnp.float32), zero, **attrs))
        expect("kernel size", "columns",  # 9 taps, but a 5 x 5 kernel has 25
               lambda: call(x, offset, no_mask, zero, **(attrs | dict(kh=np.int64(5), kw=np.int64(5)))))
        expect("chunk start", "output rows",  # rows [1, 5) of x's 4 output rows
               lambda: call(x, offset, no_mask, jnp.int32(1), **attrs))
        expect("chunk rows", "output rows",  # 2 x 4 rows, x has 4
               lambda: jax.ffi.ffi_call(sample, jax.ShapeDtypeStruct((2, 4, 4, 9, 2), jnp.float32))(
                   x, offset, no_mask, zero, **attrs))
        expect("col2im chunk start", "output rows",  # rows [4, 8) of x's 4
               lambda: back(x, offset, no_mask, jnp.int32(1), jnp.zeros(cols.shape, jnp.float32), dx0,
                            **attrs)[0])
        expect("deterministic flag", "deterministic must be 0 or 1",
               lambda: call(x, offset, no_mask, zero, **(attrs | dict(deterministic=np.int64(2)))))
        expect("start shape", "int32 scalar",
               lambda: call(x, offset, no_mask, jnp.zeros((2,), jnp.int32), **attrs))
        expect("cotangent dtype", "float32",  # the column cotangent is float32, not float64
               lambda: back(x, offset, no_mask, zero, jnp.zeros(cols.shape, jnp.float64), dx0, **attrs)[0])
        expect("cotangent shape", "columns",
               lambda: back(x, offset, no_mask, zero, jnp.zeros((1, 4, 4, 9, 3), jnp.float32), dx0, **attrs)[0])
        expect("dx_in shape", "dx_in",  # 2 images of dx for a run inside image 0
               lambda: back(x, offset, no_mask, zero, jnp.zeros(cols.shape, jnp.float32),
                            jnp.zeros((2, 4, 4, 2), jnp.float32), **attrs)[0])
        print("step well-formed calls", flush=True)
        call(x, offset, no_mask, zero, **attrs).block_until_ready()
        back(x, offset, no_mask, zero, jnp.zeros(cols.shape, jnp.float32), dx0, **attrs)[0].block_until_ready()
        print("ALL CHECKED")
""")


def test_native_rejects_inconsistent_attributes(tmp_path):
    """The C++ handlers re-check and return an error instead of reading out of bounds. In a child
    process with the GPU visible (as a user's): there, on jax 0.11.2, the first such call once
    ended the process with SIGSEGV (test session of 2026-12-07), which must fail this test, not
    take the session down; the child's last "step" line names the call."""
    env = dict(os.environ, JAX_ENABLE_X64="1", PYTHONFAULTHANDLER="1")
    # cwd away from the source tree: `python -c` puts the cwd first on sys.path, and the tree's
    # deft_jax/ has no compiled module where the package was installed without -e.
    r = subprocess.run([sys.executable, "-c", _NATIVE_CHECKS], env=env, capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and "ALL CHECKED" in r.stdout, (r.returncode, r.stdout[-2000:], r.stderr[-4000:])
