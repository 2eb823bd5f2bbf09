"""jax.export of a program using deft_jax: per-platform lowering, serialization, the checks to disable."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deft_jax
from deft_jax import _ffi, tiling


def _layer(x, offset, kernel, mask):
    return deft_jax.deform_conv2d(x, offset, kernel, mask, padding=1)


def _inputs(rng, dtype=np.float32):
    x = rng.normal(size=(2, 7, 6, 4)).astype(dtype)
    off = (rng.normal(size=(2, 7, 6, 18)) * 2).astype(dtype)
    kernel = (rng.normal(size=(3, 3, 4, 5)) / 6).astype(dtype)
    mask = rng.uniform(size=(2, 7, 6, 9)).astype(dtype)
    return x, off, kernel, mask


def test_disabled_checks_name_every_target():
    names = {c.is_custom_call() for c in deft_jax.export.disabled_safety_checks()}
    assert names == set(_ffi.TARGETS)
    assert all(t.rsplit("_", 1)[-1].startswith("v") for t in names)  # versioned names


def test_export_without_the_checks_is_refused_with_the_target_named(rng):
    args = _inputs(rng)
    # The default backend's target is named (deft_sample_columns_cpu_v3 on a CPU, a CUDA one on a GPU).
    with pytest.raises(ValueError, match="|".join(map(re.escape, _ffi.TARGETS))):
        jax.export.export(jax.jit(_layer))(*args)


def test_export_round_trip_equals_the_direct_call(rng):
    args = _inputs(rng)
    exp = jax.export.export(jax.jit(_layer), disabled_checks=deft_jax.export.disabled_safety_checks())(*args)
    restored = jax.export.deserialize(exp.serialize(vjp_order=1))
    np.testing.assert_array_equal(restored.call(*args), jax.jit(_layer)(*args))
    g = jax.grad(lambda *a: jnp.sum(restored.call(*a) ** 2), argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(lambda *a: jnp.sum(_layer(*a) ** 2), argnums=(0, 1, 2, 3))(*args)
    for a, b in zip(g, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _native_target(platform):
    """The forward target of _layer's call on a platform (on CUDA its small shape takes the fused
    route, tiling.route_heuristic; on CPU the route tiling.choose_route picks for float32 with
    this machine's OpenBLAS kernels)."""
    shape = tiling.LayerShape(n=2, h_out=7, w_out=6, c_in=4, c_out=5, taps=9, offset_groups=1,
                              feature_groups=1, dtype="float32")
    route = tiling.choose_route(platform, shape, blas_core=_ffi.blas_core() if platform == "cpu" else "")
    return _ffi.target_names(platform, route)[0]


@pytest.mark.skipif(not _ffi.cuda_available(), reason="needs the CUDA module (built with nvcc)")
def test_one_export_lowers_each_platform_its_own_call(rng):
    """platforms=("cpu", "cuda"): the CPU lowering calls the CPU targets, the CUDA lowering the CUDA
    ones with the CUDA tiling (here, on a CPU host, the default GPU model's); the CPU half runs."""
    args = _inputs(rng)
    exp = jax.export.export(jax.jit(_layer), platforms=("cpu", "cuda"),
                            disabled_checks=deft_jax.export.disabled_safety_checks())(*args)
    text = exp.mlir_module()
    assert _native_target("cpu") in text and _native_target("cuda") in text
    assert "tile_w" in text  # the CUDA call carries its tile choice as attributes
    restored = jax.export.deserialize(exp.serialize())
    assert restored.platforms == ("cpu", "cuda")
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(restored.call(*args), jax.jit(_layer)(*args))
    else:
        np.testing.assert_allclose(restored.call(*args), jax.jit(_layer)(*args), rtol=0, atol=0)


def test_jit_on_one_platform_lowers_only_its_branch(rng):
    args = _inputs(rng)
    text = jax.jit(_layer).lower(*args).as_text()
    here = "cpu" if jax.default_backend() == "cpu" else "cuda"
    other = "cuda" if here == "cpu" else "cpu"
    assert _native_target(here) in text
    assert _native_target(other) not in text


@pytest.mark.skipif(not _ffi.cuda_available(), reason="needs the CUDA module (built with nvcc)")
def test_cuda_column_route_lowers_to_a_chain_of_chunks(rng, monkeypatch):
    """Lowered for CUDA (no GPU needed), the column route's chunks are unrolled, one sampler call
    per chunk in the forward and the backward and one col2im per chunk, with no while loop (XLA
    GPU fails to compile the backward's loop: deft_jax/_columns.py)."""
    from deft_jax import tiling
    monkeypatch.setattr(tiling, "cuda_chunk_images", lambda shape: 2)
    n = 5  # chunks of 2: the remainder, then two full chunks
    x, off, kernel, mask = (np.concatenate([a] * 3)[:n] if a.ndim == 4 and i != 2 else a
                            for i, a in enumerate(_inputs(rng)))

    def loss(*a):
        return jnp.sum(deft_jax.deform_conv2d(*a, padding=1, implementation="columns") ** 2)
    exp = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), platforms=("cuda",),
                            disabled_checks=deft_jax.export.disabled_safety_checks())(x, off, kernel, mask)
    text = exp.mlir_module()
    chunks = -(-n // 2)
    assert text.count('@deft_sample_columns_cuda_v2(') == 2 * chunks  # forward + backward
    assert text.count('@deft_col2im_cuda_v2(') == chunks
    assert "stablehlo.while" not in text


@pytest.mark.skipif(not _ffi.cuda_available(), reason="needs the CUDA module (built with nvcc)")
def test_cuda_routes_per_direction(rng, monkeypatch):
    """A table row may give the forward and the backward different routes: lowered for CUDA, the
    forward calls the fused forward, the backward the column route (sampler + col2im) and no
    fused backward."""
    from deft_jax import tiling
    args = _inputs(rng)
    s = tiling.LayerShape(n=2, h_out=7, w_out=6, c_in=4, c_out=5, taps=9, offset_groups=1,
                          feature_groups=1, dtype="float32")
    key = (s.h_out, s.w_out, s.c_in, s.c_out, s.taps, s.offset_groups, s.feature_groups, s.dtype)
    monkeypatch.setattr(tiling, "route_table", lambda: {key: {"fwd": "fused", "bwd": "columns"}})
    tiling.choose_route.cache_clear()
    try:
        def loss(*a):
            return jnp.sum(deft_jax.deform_conv2d(*a, padding=1) ** 2)
        exp = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), platforms=("cuda",),
                                disabled_checks=deft_jax.export.disabled_safety_checks())(*args)
        text = exp.mlir_module()
    finally:
        tiling.choose_route.cache_clear()
    fused_fwd, fused_bwd = _ffi.target_names("cuda", "fused")
    sample, col2im = _ffi.target_names("cuda", "columns")
    assert f"@{fused_fwd}(" in text and f"@{fused_bwd}(" not in text
    assert f"@{sample}(" in text and f"@{col2im}(" in text


@pytest.mark.skipif(not _ffi.cuda_available(), reason="needs the CUDA module (built with nvcc)")
@pytest.mark.parametrize("hw, c, route", [(7, 512, "columns"), (28, 128, "fused")],
                         ids=["S5-columns", "S3-fused"])
def test_cuda_route_follows_the_table(hw, c, route):
    """Lowered for CUDA (no GPU needed), a suite layer calls the route deft_jax/routes.json gives
    it (bfloat16, batch 1: the batch is not part of the table's key)."""
    from deft_jax import tiling
    s = tiling.LayerShape(n=1, h_out=hw, w_out=hw, c_in=c, c_out=c, taps=9, offset_groups=1,
                          feature_groups=1, dtype="bfloat16")
    assert tiling.choose_route("cuda", s) == route  # the table's row (see test_tiling)
    x = jax.ShapeDtypeStruct((1, hw, hw, c), jnp.bfloat16)
    off = jax.ShapeDtypeStruct((1, hw, hw, 18), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((3, 3, c, c), jnp.bfloat16)
    f = lambda x, o, k: deft_jax.deform_conv2d(x, o, k, padding=1)  # noqa: E731
    text = jax.export.export(jax.jit(f), platforms=("cuda",),
                             disabled_checks=deft_jax.export.disabled_safety_checks())(x, off, k).mlir_module()
    assert f"@{_ffi.target_names('cuda', route)[0]}(" in text


@pytest.mark.skipif(not _ffi.cuda_available(), reason="needs the CUDA module (built with nvcc)")
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_column_route_deterministic_col2im(rng, deterministic):
    """Lowered for CUDA, deterministic=True keeps the column route and hands its col2im the flag
    and a workspace for the fixed-point dx (the CUDA module's own size); without it the workspace
    is empty."""
    import re
    x, off, kernel, mask = _inputs(rng)

    def loss(*a):
        return jnp.sum(deft_jax.deform_conv2d(*a, padding=1, implementation="columns",
                                              deterministic=deterministic) ** 2)
    exp = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), platforms=("cuda",),
                            disabled_checks=deft_jax.export.disabled_safety_checks())(x, off, kernel, mask)
    calls = [ln for ln in exp.mlir_module().splitlines() if "@deft_col2im_cuda_v2(" in ln]
    assert calls
    want = _ffi._deft_cuda.col2im_workspace_bytes(x.size, deterministic=deterministic)
    assert (want > 8 * x.size) == deterministic
    for ln in calls:
        assert re.search(rf"deterministic = {int(deterministic)} : i64", ln), ln
        assert f"tensor<{want}xui8>) loc(" in ln or ln.rstrip().endswith(f"tensor<{want}xui8>)"), ln
    assert "deform_conv2d_bwd_cuda" not in exp.mlir_module()
