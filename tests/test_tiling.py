"""deft_jax.tiling: the GPU rules are pure functions of the shape, and every choice is a
configuration the CUDA kernels instantiate (so check_gpu_tile, the trace-time guard, accepts it)."""

import dataclasses
import itertools
import re

import pytest

from deft_jax import _ffi, tiling

SUITE = {  # n, h_out, w_out, c_in, c_out (benchmarks/bench_layers.py)
    "S1": (8, 64, 64, 64, 64), "S2": (32, 64, 64, 64, 64), "S3": (32, 28, 28, 128, 128),
    "S4": (32, 14, 14, 256, 256), "S5": (32, 7, 7, 512, 512), "S6": (32, 28, 28, 64, 128),
}
DTYPES = ("float64", "float32", "bfloat16", "float16")


def _shape(name, dtype, **kw):
    n, h, w, c, co = SUITE[name]
    args = dict(n=n, h_out=h, w_out=w, c_in=c, c_out=co, taps=9, offset_groups=1, feature_groups=1,
                dtype=dtype)
    args.update(kw)
    return tiling.LayerShape(**args)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_choice_is_instantiated(dtype):
    grid = itertools.product((1, 7, 14, 64), (3, 64, 128, 512), (5, 256), (1, 2), (1, 4))
    for hw, c_in, c_out, fg, og in grid:
        if c_in % fg or c_out % fg or c_in % og:
            continue
        s = tiling.LayerShape(2, hw, hw, c_in, c_out, 9, og, fg, dtype)
        tiling.check_gpu_tile(tiling.choose_tiling("cuda", s), dtype)


def test_split_forward_where_output_channels_dominate():
    """S5-like layers (measured; docs/kernels.md, \"Split forward\"; 16-bit S4 left it for the
    warp-specialized ring)."""
    for dt in ("float32", "bfloat16", "float16"):
        split = ("S5",)
        for name in SUITE:
            assert (tiling.choose_tiling("cuda", _shape(name, dt)).tile_k > 32) == (name in split), (name, dt)
    # Not for float64 (no split instantiation) nor channels that are not whole 16-byte vectors.
    assert tiling.choose_tiling("cuda", _shape("S5", "float64")).tile_k == 32
    assert tiling.choose_tiling("cuda", _shape("S5", "bfloat16", c_in=508, offset_groups=2)).tile_k == 32


def test_wide_layers_get_the_128x128_tile():
    """S3/S4/S6-like layers (>= 128 output pixels, > 64 output channels): 128 pixels x 128 output
    channels (8 x 16, or flat on 8 warps where that overhangs the image); fp32 on 8 warps, 16-bit types on 16 (measured; docs/kernels.md,
    "The tiling rules"); not S1/S2 (64 channels)."""
    for dt in ("float32", "bfloat16", "float16"):
        for name in SUITE:
            t = tiling.choose_tiling("cuda", _shape(name, dt))
            # 28 x 28 / 14 x 14: flat tiles on 8 warps
            wide = name in ("S3", "S4", "S6")
            assert ((t.tile_h, t.tile_w, t.tile_n, t.warps) == (1, 128, 128, 8)) == wide, (name, dt, t)
            if wide:
                tiling.check_gpu_tile(t, dt)  # an instantiated configuration
        # 8 x 16 where it divides the image: 8 warps for fp32, 16 for 16-bit types.
        t = tiling.choose_tiling("cuda", _shape("S3", dt, h_out=32, w_out=32))
        assert (t.tile_h, t.tile_w, t.warps) == (8, 16, 8 if dt == "float32" else 16)


def test_flat_tile_where_the_rectangle_overhangs():
    """tile_h = 1 (flat) exactly when the rectangle leaves padding on the output image, for the
    streaming forward only; the split forward keeps 8 x 8 (docs/kernels.md, "The tiling rules")."""
    for dt in DTYPES:
        for name in SUITE:
            for hw in (SUITE[name][1], 16, 28, 30, 64, 7, 1):
                t = tiling.choose_tiling("cuda", _shape(name, dt, h_out=hw, w_out=hw))
                if t.tile_k > 32:
                    assert (t.tile_h, t.tile_w) == (8, 8), (name, dt, hw, t)
                    continue
                rect = tiling._gpu_forward_rect(_shape(name, dt, h_out=hw, w_out=hw), 0)
                overhangs = hw % rect.tile_h != 0 or hw % rect.tile_w != 0
                assert (t.tile_h == 1) == overhangs, (name, dt, hw, t)
                assert t.tile_h * t.tile_w == rect.tile_h * rect.tile_w
                tiling.check_gpu_tile(t, dt)


def test_distinct_shapes_get_distinct_tiles():
    tiles = {tiling.choose_tiling("cuda", _shape(n, "bfloat16")) for n in SUITE}
    assert len(tiles) >= 3


def test_rejects_what_is_not_instantiated():
    bad = [tiling.TileConfig(8, 8, 48, 32, 4, 2), tiling.TileConfig(8, 8, 64, 64, 4, 2),
           tiling.TileConfig(8, 8, 64, 256, 4, 1), tiling.TileConfig(8, 16, 64, 256, 4, 2)]
    for t in bad:
        with pytest.raises(ValueError, match="not instantiated"):
            tiling.check_gpu_tile(t, "bfloat16")
    with pytest.raises(ValueError, match="not instantiated"):
        tiling.check_gpu_tile(tiling.TileConfig(8, 8, 64, 256, 4, 2), "float64")
    tiling.check_gpu_tile(tiling.TileConfig(8, 8, 64, 256, 4, 2), "float32")


def test_weight_pass_tile():
    """The weight pass's 64 x 128 tile where C_out >= 128 (S3-S6), not for float64; only the
    instantiated widths pass the guard."""
    for dt in DTYPES:
        for name in SUITE:
            want = 128 if name in ("S3", "S4", "S5", "S6") and dt != "float64" else 64
            assert tiling.choose_tiling("cuda", _shape(name, dt)).bwd_tile_n == want, (name, dt)
    tiling.check_gpu_tile(tiling.TileConfig(8, 8, 64, 32, 4, 2, 128), "float32")
    for t, dt in [(tiling.TileConfig(8, 8, 64, 32, 4, 2, 96), "bfloat16"),
                  (tiling.TileConfig(8, 8, 64, 32, 4, 2, 128), "float64")]:
        with pytest.raises(ValueError, match="bwd_tile_n"):
            tiling.check_gpu_tile(t, dt)


def test_warp_specialized_forward_where_measured():
    """The producer/consumer ring (stages = 3, 8 warps) on float32's streaming tiles and on the
    flat 128 x 128 tile of 16-bit types; float64, 16-bit S1/S2 and the split forward (S5) stay
    (docs/kernels.md, "Warp-specialized ring"). Only the two ring tiles pass the guard, not for float64."""
    for name in SUITE:
        for dt in DTYPES:
            t = tiling.choose_tiling("cuda", _shape(name, dt))
            ring = t.tile_k == 32 and (dt == "float32" or (dt != "float64" and name in ("S3", "S4", "S6")))
            assert (t.stages == 3) == ring, (name, dt, t)
            if ring:
                assert (t.tile_h * t.tile_w, t.tile_n, t.warps) in ((128, 128, 8), (64, 64, 8))
            tiling.check_gpu_tile(t, dt)
    assert tiling.choose_tiling("cuda", _shape("S5", "float32")).tile_k > 32  # the split forward
    for t in (tiling.TileConfig(1, 128, 128, 32, 16, 3), tiling.TileConfig(8, 8, 64, 32, 4, 3),
              tiling.TileConfig(1, 128, 128, 64, 8, 3)):
        with pytest.raises(ValueError, match="not instantiated"):
            tiling.check_gpu_tile(t, "float32")
    with pytest.raises(ValueError, match="not instantiated"):
        tiling.check_gpu_tile(tiling.TileConfig(1, 128, 128, 32, 8, 3), "float64")


def test_k_splits_where_the_model_says():
    """The ring's k-split (docs/kernels.md, "k-split"): on 132 SMs with clusters, 16-bit S3 (196
    blocks of 36 steps, 1 per SM) takes 2 blocks per tile (fp32 S3 takes the 64 x 128 tile
    instead); S4 (98 blocks: 2 waves of half the steps gain nothing) and S6 (18 steps: the fixed
    cost eats the gain) keep 1, as measured; nothing else splits. Without clusters (compute
    capability 8) or an unknown SM count: 1."""
    for dt in ("float32", "bfloat16", "float16"):
        for name in SUITE:
            want = 2 if name == "S3" and dt != "float32" else 1
            t = tiling.choose_tiling("cuda", _shape(name, dt), 132, 9)
            assert t.k_splits == want, (name, dt, t)
            tiling.check_gpu_tile(t, dt, 9)
            assert tiling.choose_tiling("cuda", _shape(name, dt), 132, 8).k_splits == 1
            assert tiling.choose_tiling("cuda", _shape(name, dt), 0, 9).k_splits == 1
    # A wide grid keeps 1 block per tile: S3 with 8x the batch is 1568 blocks (11.9 waves).
    assert tiling.choose_tiling("cuda", _shape("S3", "bfloat16", n=256), 132, 9).k_splits == 1
    # The step count follows the offset-group segments: 2 groups of 36 channels -> 32 + 4 each.
    assert tiling._ws_steps_per_tile(_shape("S3", "float32", c_in=72, offset_groups=2)) == 9 * 4


def test_k_splits_validation():
    """k_splits > 1 only on the ring tiles, only 2 or 4, only with clusters."""
    ring = tiling.TileConfig(1, 128, 128, 32, 8, 3, 128, 2)
    tiling.check_gpu_tile(ring, "float32")
    tiling.check_gpu_tile(ring, "bfloat16", 9)
    with pytest.raises(ValueError, match="thread-block clusters"):
        tiling.check_gpu_tile(ring, "float32", 8)
    for bad in (dataclasses.replace(ring, k_splits=3), dataclasses.replace(ring, stages=2),
                tiling.TileConfig(8, 8, 64, 256, 4, 2, 64, 2)):
        with pytest.raises(ValueError, match="k_splits"):
            tiling.check_gpu_tile(bad, "float32")
    with pytest.raises(ValueError):
        tiling.check_gpu_tile(ring, "float64")


def test_float32_half_ring_tile_where_measured():
    """float32 S3 (196 blocks of the 128 x 128 ring, 36 steps each) takes the 64 x 128 ring (2
    blocks per SM; docs/kernels.md, "64 x 128 tile"), with or without clusters; S4 (98 blocks) and S6 (18
    steps), 16-bit types and an unknown SM count keep the 128 x 128 tile. A 2D 8 x 16 tile halves to
    8 x 8."""
    for cc in (8, 9):
        t = tiling.choose_tiling("cuda", _shape("S3", "float32"), 132, cc)
        assert (t.tile_h, t.tile_w, t.tile_n, t.warps, t.stages, t.k_splits) == (1, 64, 128, 8, 3, 1)
        tiling.check_gpu_tile(t, "float32", cc)
    for name, dt in (("S4", "float32"), ("S6", "float32"), ("S3", "bfloat16"), ("S3", "float16")):
        t = tiling.choose_tiling("cuda", _shape(name, dt), 132, 9)
        assert (t.tile_h * t.tile_w, t.tile_n) == (128, 128), (name, dt, t)
    assert tiling.choose_tiling("cuda", _shape("S3", "float32"), 0, 9).tile_w == 128
    t = tiling.choose_tiling("cuda", _shape("S3", "float32", h_out=32, w_out=32, n=64), 132, 9)
    assert (t.tile_h, t.tile_w, t.tile_n) == (8, 8, 128), t


def test_route_choice():
    """choose_route: CPU always the column route; an explicit request wins otherwise; then the
    measured table (deft_jax/routes.json), then the heuristic; deterministic changes nothing
    (both routes have a deterministic mode)."""
    s5, s3 = _shape("S5", "bfloat16"), _shape("S3", "float32")
    assert tiling.choose_route("cpu", s3) == "columns"
    assert tiling.choose_route("cpu", s5, deterministic=True) == "columns"
    for d in ("fwd", "bwd"):
        for s in (s5, s3):
            assert (tiling.choose_route("cuda", s, deterministic=True, direction=d)
                    == tiling.choose_route("cuda", s, direction=d))
    assert tiling.choose_route("cuda", s5, deterministic=True, requested="columns") == "columns"
    assert tiling.choose_route("cuda", s3, requested="columns") == "columns"
    assert tiling.choose_route("cuda", s5, requested="fused") == "fused"
    table = tiling.route_table()
    for s in (s5, s3, _shape("S5", "float32"), _shape("S1", "bfloat16"), _shape("S2", "float16")):
        key = (s.h_out, s.w_out, s.c_in, s.c_out, s.taps, s.offset_groups, s.feature_groups, s.dtype)
        for d in ("fwd", "bwd"):
            want = table[key][d] if key in table else tiling.route_heuristic(s)
            assert tiling.choose_route("cuda", s, direction=d) == want
    # The batch is not part of the key: the route is a property of the layer.
    assert tiling.choose_route("cuda", _shape("S5", "bfloat16", n=3)) == tiling.choose_route("cuda", s5)
    with pytest.raises(ValueError, match="direction"):
        tiling.choose_route("cuda", s5, direction="both")


def test_route_table_is_consistent():
    """Every row of routes.json names, per direction, the faster route of its own measurements
    (the backward: forward+backward minus forward; the forward's route where that was not
    measured for both routes)."""
    import json
    rows = json.loads(tiling._ROUTE_TABLE.read_text())["routes"]
    assert rows
    for r in rows:
        assert r["route"]["fwd"] == min(r["fwd_us"], key=r["fwd_us"].get), r
        b = r["bwd_us"]
        assert r["route"]["bwd"] == (min(b, key=b.get) if b else r["route"]["fwd"]), r
        assert set(r["route"].values()) <= set(tiling.ROUTES), r


def test_route_heuristic():
    """Unseen shapes: many output channels on few pixels take the column route."""
    assert tiling.route_heuristic(_shape("S5", "float32", c_in=384, c_out=768)) == "columns"
    assert tiling.route_heuristic(_shape("S4", "float32", c_in=384)) == "fused"
    assert tiling.route_heuristic(_shape("S3", "bfloat16", c_in=96)) == "fused"
    grouped = _shape("S5", "float32", c_out=512, feature_groups=4)  # 128 per group
    assert tiling.route_heuristic(grouped) == "fused"


@pytest.mark.skipif(not _ffi.cuda_available(), reason="needs the CUDA module (built where nvcc is found)")
def test_python_rule_equals_the_compiled_check():
    """tiling.gpu_tile_error (the rule used where the CUDA module is not built) accepts exactly
    the tiles the module's own check accepts, over every candidate of a wide grid and every dtype;
    with the module, check_gpu_tile raises the module's message."""
    grid = itertools.product([(8, 8), (1, 64), (1, 128), (8, 16), (16, 8), (2, 32), (16, 16), (4, 8)],
                             [32, 64, 128, 256], [16, 32, 64, 128, 256, 512], [4, 8, 16],
                             [1, 2, 3, 4], [64, 128], [1, 2, 4], tiling.FAMILIES)
    accepted = 0
    for (th, tw), n, k, warps, stages, bwd_n, ks, family in grid:
        t = tiling.TileConfig(th, tw, n, k, warps, stages, bwd_n, ks, family)
        for dt in ("float32", "float64", "bfloat16", "float16"):
            compiled = _ffi.compiled_tile_error(t.as_attrs(), dt)
            assert (tiling.gpu_tile_error(t, dt) == "") == (compiled == ""), (t, dt, compiled)
            accepted += compiled == ""
    assert accepted > 50  # the grid reaches the instantiated tiles
    bad = tiling.TileConfig(8, 8, 64, 64, 4, 2)
    message = _ffi.compiled_tile_error(bad.as_attrs(), "float32")
    with pytest.raises(ValueError, match=re.escape(message)):
        tiling.check_gpu_tile(bad, "float32", compiled=_ffi.compiled_tile_error)


def test_cpu_fused_forward_route_and_tile():
    """On CPU the fused forward is the forward's default for float32 layers with kernels of at most
    1 MiB where OpenBLAS runs AVX-512 kernels, and whenever asked for; the backward is always the
    column route. The tile holds CPU_FUSED_TILE_BYTES of columns in the GEMM's type, at most
    1/CPU_FUSED_MIN_TASKS of the pixels, a multiple of 8 in [128, 1024], whatever the thread count
    (it is a function of the shape alone)."""
    s2, s5 = _shape("S2", "float32"), _shape("S5", "bfloat16")
    assert tiling.choose_route("cpu", s2) == "columns"  # OpenBLAS not loaded
    assert tiling.choose_route("cpu", s2, blas_core="SkylakeX") == "fused"
    assert tiling.choose_route("cpu", s2, blas_core="SapphireRapids") == "fused"
    assert tiling.choose_route("cpu", s2, blas_core="Haswell") == "columns"  # AVX2: slower there
    assert tiling.choose_route("cpu", s2, blas_core="SkylakeX", direction="bwd") == "columns"
    assert tiling.choose_route("cpu", s2, requested="columns", blas_core="SkylakeX") == "columns"
    for name in ("S1", "S3", "S6"):  # kernels of 147-590 KB
        assert tiling.choose_route("cpu", _shape(name, "float32"), blas_core="SkylakeX") == "fused"
    for name in ("S4", "S5"):  # 2.4 and 9.4 MB: every tile would re-read them from memory
        assert tiling.choose_route("cpu", _shape(name, "float32"), blas_core="SkylakeX") == "columns"
    for dt in ("bfloat16", "float16", "float64"):  # XLA's dot runs these natively (or: unmeasured)
        assert tiling.choose_route("cpu", _shape("S2", dt), blas_core="SkylakeX") == "columns"
    assert tiling.choose_route("cpu", _shape("S4", "float32", feature_groups=4), blas_core="SkylakeX") == "fused"
    assert tiling.choose_route("cpu", s2, requested="fused", direction="fwd") == "fused"
    assert tiling.choose_route("cpu", s2, requested="fused", direction="bwd") == "columns"
    assert tiling.choose_route("cpu", s2, requested="columns", direction="fwd") == "columns"
    assert tiling.cpu_tile_pixels(_shape("S1", "float32", n=1)) == 128  # 4096 px: >= 32 tasks
    assert tiling.cpu_tile_pixels(_shape("S6", "float32", n=4)) == 128  # 3136 px: floor 128
    assert tiling.cpu_tile_pixels(s2) == 224  # 512 KiB / (9 x 64 x 4 B), down to a multiple of 8
    assert tiling.cpu_tile_pixels(s5) == 128  # 24 fit 512 KiB; at least 128 (kernel packing)
    assert tiling.cpu_tile_pixels(_shape("S2", "float64")) == 128
    assert tiling.cpu_tile_pixels(_shape("S2", "float32", c_in=1)) == 1024
    assert tiling.cpu_tile_pixels(_shape("S2", "float32", c_in=100000)) == 128
