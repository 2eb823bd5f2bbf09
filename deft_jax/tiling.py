"""Shape-driven tile configurations: the one place where tiling decisions live.

``choose_route`` picks the implementation family per shape (the column route or the fused
kernels; a measured table, deft_jax/routes.json, then a short rule), ``choose_tiling`` the fused
kernels' tiles and ``*_chunk_images`` the column route's chunk. All are pure, memoised functions
of the layer's shape, dtype and device; their results are static attributes of the custom calls,
so the choice is visible in the HLO, deterministic at trace time and exportable. The measurements behind each rule are in
docs/kernels.md.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib

# The forward kernel families a tile can name (the `family` FFI attribute is the index; C++
# deft::TileFamily): the streaming kernel, the split forward, the warp-specialized ring.
FAMILIES = ("streaming", "split", "ring")


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """A tile choice. GPU: a block computes tile_h x tile_w output pixels x tile_n output channels,
    reducing over input channels tile_k at a time, with ``warps`` warps and ``stages`` pipeline
    stages (tile_k > 32: the split forward, where a block keeps tile_k sampled input channels of
    one tap resident and walks all output channels). tile_h = 1 makes the streaming forward's
    tile flat: tile_w consecutive output pixels in (n, h_out, w_out) order, across rows and
    images (the split forward and the backward passes then take 8 x 8 tiles). ``bwd_tile_n``:
    output channels per block of the backward weight pass (64, or 128 on its pipelined
    tensor-core path). ``k_splits``: the warp-specialized forward's blocks per output tile (1, or
    2 / 4 on devices with thread-block clusters, compute capability 9.0+): a cluster of that many
    blocks splits the tile's reduction over (tap, channel chunk) and sums the partial tiles in
    distributed shared memory. ``family``: the forward kernel the tile is for (FAMILIES), which
    the CUDA launchers dispatch on and check the other fields against; the rules below always
    name it. Left out (a hand-made tile), it is read off the fields: tile_k > 32 the split
    forward, stages = 3 the ring, else streaming. (The CPU route has no tiles: ``cpu_chunk_images``.)"""

    tile_h: int
    tile_w: int
    tile_n: int
    tile_k: int
    warps: int
    stages: int
    bwd_tile_n: int = 64
    k_splits: int = 1
    family: str = ""

    def __post_init__(self):
        if not self.family:
            family = "split" if self.tile_k > 32 else "ring" if self.stages == 3 else "streaming"
            object.__setattr__(self, "family", family)
        if self.family not in FAMILIES:
            raise ValueError(f"TileConfig family: expected one of {FAMILIES}, got {self.family!r}")

    def as_attrs(self) -> dict[str, int]:
        """The FFI attributes (family as its index in FAMILIES)."""
        return {f.name: FAMILIES.index(self.family) if f.name == "family" else int(getattr(self, f.name))
                for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """What the tiling depends on (one problem; vmapped copies share it)."""

    n: int
    h_out: int
    w_out: int
    c_in: int
    c_out: int
    taps: int
    offset_groups: int
    feature_groups: int
    dtype: str  # numpy dtype name


# Column memory of the CPU route (deft_jax/_columns.py) per chunk of images: the sampled columns in
# x's dtype plus, in the backward, their cotangent in the accumulation type. Small enough that the
# program's temporaries stay well under 32 MiB: XLA:CPU allocates them as one block per execution,
# and glibc maps a block over its largest mmap threshold (32 MiB) afresh every time, so each call
# page-faults it in. Measured (2-core VM, 4x28x28x128 fp32 fwd+bwd, per call): 32 MiB budget ->
# temp 41 MB, 10.6k page faults, 8 ms system time, 28.5 ms CPU; 8 MiB -> temp 9 MB, no faults,
# 20.7 ms. 8 MiB was as fast as 16 MiB or faster at S3-S6 fp32/bf16 and S2 bf16; 4 and 2 MiB lost
# at S5 (more, smaller GEMMs; bf16 fwd+bwd 6.4 -> 11.3 / 19.1 ms CPU). An image larger than the
# budget is one chunk (S1/S2 fp32: 19 MB of columns each).
CPU_COLUMN_BUDGET_BYTES = 8 * 2**20


# Column memory of the GPU's column route per chunk (columns in x's dtype + their float32
# cotangent): larger chunks make larger GEMMs for cuBLAS, and the bound on extra device
# memory is max(64 MiB, 1.5x the dense conv's); 48 MiB leaves room for the chunk's dx.
CUDA_COLUMN_BUDGET_BYTES = 48 * 2**20


def _itemsize(dtype: str) -> int:
    return {"float64": 8, "float32": 4}.get(dtype, 2)


def _column_bytes_per_image(s: LayerShape) -> int:
    """Columns in x's dtype plus their cotangent in the accumulation dtype."""
    acc = 8 if s.dtype == "float64" else 4
    return max(1, s.h_out * s.w_out * s.taps * s.c_in * (_itemsize(s.dtype) + acc))


def cpu_chunk_images(s: LayerShape) -> int:
    """Images per chunk of the CPU column route: as many as the column budget holds (at least
    one), so the route's extra memory is bounded independently of the batch. Not capped at
    ``s.n``: under vmap the chunk is shared by the stacked problems (deft_jax/_columns.py)."""
    return int(max(1, CPU_COLUMN_BUDGET_BYTES // _column_bytes_per_image(s)))


# The CPU forward's chunk, in output rows: whole images while they fit, else runs of rows (across
# images where they are small) of at most this many bytes of columns. Each chunk is a loop step,
# so few large chunks win: min ms, fp32, budget 2 / 8 / 32 MiB (docs/kernels.md): 16 cores S2
# 4.04 / 2.39 / 2.51, S1 1.14 / 0.86 / 0.51 (one chunk); 2 cores S2 (1 / 2 / 4 / 8 / 16 MiB)
# 5.11 / 5.14 / 4.72 / 4.44 / 4.51, S1 1.39 / 1.11 / 1.54 / 1.05 / 0.89. 16 MiB keeps a 64x64x64
# fp32 image (9.4 MB) whole and the program's temporaries under glibc's 32 MiB mmap threshold.
CPU_FORWARD_COLUMN_BUDGET_BYTES = 16 * 2**20


def cpu_forward_chunk_rows(s: LayerShape) -> int:
    """Output rows per chunk of the CPU forward (rows counted over the batch's N * Ho, a chunk may
    cross images): as many as CPU_FORWARD_COLUMN_BUDGET_BYTES of columns in x's dtype hold."""
    per_row = max(1, s.w_out * s.taps * s.c_in * _itemsize(s.dtype))
    return int(max(1, CPU_FORWARD_COLUMN_BUDGET_BYTES // per_row))


# The CPU backward runs an image in runs of rows only where its columns and their float32
# cotangent exceed this: beyond glibc's largest mmap threshold (32 MiB) every call page-faults its
# temporaries in. Below it whole images were faster on 16 cores (fwd+bwd fp32, min ms, whole
# images / runs of 22-32 rows: S2 15.90 / 20.18, S1 2.89 / 4.32) though not on 2 (S2 24.1 /
# 19.4, S1 6.25 / 4.73): each run is a loop step with two dots and a col2im.
CPU_BACKWARD_RUN_THRESHOLD_BYTES = 32 * 2**20


def cpu_backward_chunk_rows(s: LayerShape) -> int:
    """Output rows per run of the CPU backward where one image's columns and their float32
    cotangent exceed CPU_BACKWARD_RUN_THRESHOLD_BYTES (runs of CPU_COLUMN_BUDGET_BYTES), else 0
    (whole images, cpu_chunk_images)."""
    per_image = _column_bytes_per_image(s)
    if per_image <= CPU_BACKWARD_RUN_THRESHOLD_BYTES or s.h_out <= 1:
        return 0
    return int(max(1, CPU_COLUMN_BUDGET_BYTES // max(1, per_image // s.h_out)))


# The CPU fused forward's tile (csrc/cpu/forward.h): a task samples this many bytes of columns in
# the GEMM's type into its thread's scratch and multiplies them at once, so they are read from the
# core's cache (512 KiB: within a 1-2 MiB L2 beside the GEMM's packed panels). The tile is a
# function of the shape alone, so the bits do not depend on the thread count. On one core of the
# 2-core VM (S2 fp32, 4 images, min ms; `OPENBLAS_CORETYPE=SkylakeX taskset -c 0 python
# benchmarks/cpu_parts.py --shapes S2 --dtypes float32 --fused-tiles 32,64,128,224,512`): 32 / 64 /
# 128 / 224 (this rule) / 512 pixels 10.69 / 9.21 / 8.85 / 9.06 / 8.71 (column route 8.30).
# At least CPU_FUSED_MIN_PIXELS: every tile's GEMM packs the whole kernel again, which at wide
# layers outweighs the cache (2-core VM, fp32, `OPENBLAS_CORETYPE=SkylakeX python
# benchmarks/cpu_parts.py --shapes S5,S4 --dtypes float32 --fused-tiles 0,64,128,256`, min ms:
# S5 24 / 64 / 128 / 256 px 6.54 / 3.57 / 3.30 / 4.74; S4 56 / 64 / 128 / 256 px 3.12 / 2.92 /
# 2.63 / 3.15).
# And at most 1/CPU_FUSED_MIN_TASKS of the problem's pixels (down to that floor), so that a small
# problem still spreads over many threads (16-core host, fp32, S1 = 1 image of 64x64: 224 px tiles,
# 19 tasks, 0.91-2.90 ms; 128 px, 32 tasks, 0.50; column route 0.70; conv 0.41. S6 224 / 128 px
# 0.76 / 0.71). Both rules read only the shape, never the thread count.
CPU_FUSED_TILE_BYTES = 512 * 2**10
CPU_FUSED_MIN_PIXELS = 128
CPU_FUSED_MIN_TASKS = 32
# The CPU forward's default route (implementation=None): the fused forward for float32 layers whose
# kernel fits CPU_FUSED_MAX_KERNEL_BYTES (re-read by every tile from the core's cache) where
# OpenBLAS runs AVX-512 kernels, else the column route. Measured, forward us, column route / fused
# / conv (`python benchmarks/bench_layers.py --no-torch --dtypes float32`, benchmarks/RESULTS.md):
# the H100 host's 16 Xeon cores (SkylakeX kernels) S2 3,056 / 1,666 / 1,265; the 2-core Zen 5 VM
# (SkylakeX) within +-10% of the column route at S1, S2, S3, S6 and slower at S4, S5 (kernels of
# 2.4 and 9.4 MB); with OpenBLAS's Haswell (AVX2) kernels the fused forward took 1.1-2.7x the
# column route's time there, so AVX2-only machines keep the column route.
CPU_FUSED_MAX_KERNEL_BYTES = 2**20
CPU_FUSED_BLAS_CORES = frozenset({"skylakex", "cooperlake", "sapphirerapids"})


def cpu_tile_pixels(s: LayerShape) -> int:
    """Output pixels per task of the CPU fused forward: CPU_FUSED_TILE_BYTES of columns in the
    GEMM's type (float64 for float64, else float32), at most 1/CPU_FUSED_MIN_TASKS of the pixels,
    a multiple of 8 in [CPU_FUSED_MIN_PIXELS, 1024]."""
    per_pixel = s.taps * s.c_in * (8 if s.dtype == "float64" else 4)
    fit = CPU_FUSED_TILE_BYTES // max(1, per_pixel) // 8 * 8
    share = math.ceil(s.n * s.h_out * s.w_out / CPU_FUSED_MIN_TASKS / 8) * 8
    return int(min(1024, max(CPU_FUSED_MIN_PIXELS, min(fit, share))))


def cpu_fused_by_default(s: LayerShape, blas_core: str) -> bool:
    """Whether the CPU forward of ``s`` takes the fused forward when no route is asked for, with
    OpenBLAS running ``blas_core``'s kernels ("" where it is not loaded)."""
    kernel_bytes = s.taps * s.c_in * s.c_out // max(1, s.feature_groups) * 4
    return (s.dtype == "float32" and blas_core.lower() in CPU_FUSED_BLAS_CORES
            and kernel_bytes <= CPU_FUSED_MAX_KERNEL_BYTES)


def cuda_chunk_images(s: LayerShape) -> int:
    """Images per chunk of the GPU column route (as ``cpu_chunk_images``, with the GPU budget)."""
    return int(max(1, CUDA_COLUMN_BUDGET_BYTES // _column_bytes_per_image(s)))


def _gpu_tiling(s: LayerShape, sm_count: int, cc_major: int = 0,
                deterministic: bool = False) -> TileConfig:
    """The forward's tile (below), its k-split and the weight pass's output-channel tile."""
    tile = _gpu_forward_tile(s, sm_count, deterministic)
    if _ws_half_tile(s, tile, sm_count):
        tile = dataclasses.replace(tile, tile_w=tile.tile_w // 2)  # flat 1 x 128 -> 1 x 64, 8 x 16 -> 8 x 8
    elif tile.stages == 3 and tile.tile_h * tile.tile_w == 128 and cc_major >= 9:
        tile = dataclasses.replace(tile, k_splits=_ws_k_splits(s, tile, sm_count))
    # The weight pass re-samples its (tap, channel chunk) once per bwd_tile_n output channels: from
    # C_out = 128 on, the 64 x 128 tile halves that (2x -> 1x at S3/S6, 8x -> 4x at S5).
    # Measured (H200, docs/kernels.md): ktime weight pass fp32 S4 194 -> 160 us, S5
    # 199 -> 176; gpu_tile_sweep fwd+bwd 64 -> 128: fp32 S3 679 -> 639, S6 401 -> 394, bf16 S3
    # 450 -> 435, S6 280 -> 272.
    if (s.dtype != "float64" and s.c_out // s.feature_groups >= 128 and _vector_channels(s)
            and tile.stages >= 2):
        tile = dataclasses.replace(tile, bwd_tile_n=128)
    return tile


def _gpu_forward_tile(s: LayerShape, sm_count: int, deterministic: bool = False) -> TileConfig:
    """The forward tile: the rectangle below, made flat where it would overhang the image, on the
    warp-specialized ring where it was measured faster."""
    tile = _gpu_forward_flat(s, sm_count, deterministic)
    # Streaming tiles -> the warp-specialized forward of the same tile: 4 producer warps gather and
    # blend into a 3-slot shared-memory ring while 4 consumer warps run the MMA (docs/kernels.md
    # "Warp-specialized forward"). Measured (H200, fwd us, streaming -> ring):
    # - float32, per kernel (ktime): S1 67.0 -> 57.1, S2 245.0 -> 217.0, S3 138.3 -> 120.8,
    #   S4 125.3 -> 112.9, S6 78.7 -> 73.7; end to end (bench --quick, before and after) S1
    #   79.0 -> 74.7, S2 267.2 -> 235.7, S3 154.4 -> 138.6, S4 143.5 -> 131.5, S6 98.1 -> 89.6.
    #   S5 stays on the split forward (130 against 204 on the ring).
    # - 16-bit types on the flat 128 x 128 tile: per kernel (ktime) bf16 S3 93.5 -> 82.2,
    #   S6 57.4 -> 53.2, S4 75.8 against the split forward's 87.2 + 4.6 (_SPLIT_MAX_PIXELS); end to
    #   end (tile sweep, one process) S3 96 -> 82, S6 65 -> 59, S4 75 against the split's
    #   90. Not on the 64 x 64 tile (S1/S2: 19-24% slower than 4 blocks of 4 warps per SM)
    #   nor the 16-warp 8 x 16 tile (not measured).
    # At Precision.HIGHEST the same tile runs the streaming kernel (the CUDA launcher's fallback).
    key = (tile.tile_h * tile.tile_w, tile.tile_n, tile.warps, tile.stages)
    ring = ((128, 128, 8, 2), (64, 64, 4, 2)) if s.dtype == "float32" else ((128, 128, 8, 2),)
    if s.dtype != "float64" and tile.tile_k == 32 and key in ring:
        tile = dataclasses.replace(tile, warps=8, stages=3, family="ring")
    return tile


# Blocks per SM of the warp-specialized tiles by (pixels, tile_n) (their register allocation: 1 for
# the 128 x 128 tile, 2 for the 64-pixel ones; dispatch.cuh's WsCfg).
_WS_BLOCKS_PER_SM = {(128, 128): 1, (64, 64): 2, (64, 128): 2}
# A ring block's fixed cost (records, first gather, ring fill, epilogue), in (tap, chunk) steps:
# fitted to the k-split measurements below (fp32 ~7, bf16 ~11 steps; ~7-10 us).
_WS_FIXED_STEPS = 9


def _ws_steps_per_tile(s: LayerShape) -> int:
    """(tap, 32-channel chunk) steps of one output tile: ChunkWalk::count() in forward.cuh (a
    feature group's channels, cut at the offset-group boundaries, in chunks of 32 per tap)."""
    cg, cpog = s.c_in // s.feature_groups, s.c_in // s.offset_groups
    per_tap, c = 0, 0
    while c < cg:
        e = min((c // cpog + 1) * cpog, cg)
        per_tap += -(-(e - c) // 32)
        c = e
    return s.taps * per_tap


def _ws_blocks(s: LayerShape, tile: TileConfig) -> int:
    pixels = tile.tile_h * tile.tile_w
    return (-(-s.n * s.h_out * s.w_out // pixels) * s.feature_groups
            * -(-(s.c_out // s.feature_groups) // tile.tile_n))


def _ws_half_tile(s: LayerShape, tile: TileConfig, sm_count: int) -> bool:
    """float32 on the 128 x 128 ring -> the 64 x 128 ring (2 blocks per SM, twice the blocks) where
    the 128 x 128 grid runs past one wave and each tile walks 32 or more (tap, chunk) steps.

    Two co-resident blocks hide each other's gather latency, which the one 8-warp block per SM of
    the 128 x 128 tile cannot. Measured (H200, fwd us, ktime / tile sweep in one call;
    docs/kernels.md), 128 x 128 -> 64 x 128: fp32 S3 (196 blocks, 36 steps) 122.7 / 123 ->
    95.9 / 97 (also ahead of 2 blocks per tile: 106.6 / 113); S4 (98 blocks) 113.8 / 104 -> 105.9 /
    108 and S6 (18 steps) 73.5 / 76 -> 67.9 / 78: per kernel ahead, end to end not, so they stay.
    bf16: S3 82.4 / 86 -> 81.6 / 82 against 76.9 / 71 for 2 blocks per tile; S4 74.4 / 76 -> 71.0 /
    79; S6 52.9 / 57 -> 51.3 / 58: 16-bit types stay on the 128 x 128 tile.
    """
    if s.dtype != "float32" or sm_count <= 0 or tile.stages != 3:
        return False
    if (tile.tile_h * tile.tile_w, tile.tile_n) != (128, 128) or tile.tile_h not in (1, 8):
        return False
    return _ws_blocks(s, tile) > sm_count and _ws_steps_per_tile(s) >= 32


def _ws_k_splits(s: LayerShape, tile: TileConfig, sm_count: int) -> int:
    """Blocks per output tile of the warp-specialized forward: 1, or 2 where the model says so.

    A ring block's time is its chain of (tap, chunk) steps plus a fixed cost (latency-bound: the
    padding rows that flat tiles turned into real pixels cost nothing, docs/kernels.md), so a grid ending in a half-empty wave can run faster as 2 blocks per tile, each half
    of the chain: time ~ ceil(k * blocks / resident) * (steps / k + fixed). Measured per kernel
    (H200, ktime fwd us, k = 1 / 2 / 4; docs/kernels.md): S3 fp32 120.8 / 106.0 /
    141.7, bf16 82.0 / 76.7 / 123.3; S6 fp32 72.4 / 69.1 / 104.4, bf16 52.1 / 53.6 / 98.1; S4 fp32
    113.7 / 123.1 / 135.4, bf16 75.1 / 82.7 / 104.3; end to end (tile sweep, same call) S3 fp32 125
    -> 105, bf16 85 -> 76, S6 fp32 84 -> 85, bf16 55 -> 65, S4 fp32 121 -> 121, bf16 73 -> 90.
    With the fitted fixed cost the model picks 2 at S3 only (S6: 54 vs 54 step-units, S4: 81 vs
    90); fp32 S3 then takes the 64 x 128 tile instead (_ws_half_tile), so the split applies to
    16-bit S3. Fitted on the 128 x 128 tile only, and applied only there. k = 4 is never picked:
    slower everywhere (clusters of 4 blocks of 1 per SM fit fewer SMs per GPC, and the fixed cost
    is paid 4 times).
    """
    if sm_count <= 0:
        return 1
    pixels = tile.tile_h * tile.tile_w
    blocks = _ws_blocks(s, tile)
    resident = sm_count * _WS_BLOCKS_PER_SM[(pixels, tile.tile_n)]
    steps = _ws_steps_per_tile(s)
    cost = {k: -(-k * blocks // resident) * (steps / k + _WS_FIXED_STEPS) for k in (1, 2)}
    return 2 if cost[2] < cost[1] else 1


def _gpu_forward_flat(s: LayerShape, sm_count: int, deterministic: bool = False) -> TileConfig:
    """The rectangle below, made flat where it would overhang the image."""
    tile = _gpu_forward_rect(s, sm_count, deterministic)
    # A rectangle that does not divide the output image runs MMA rows on padding (a 14 x 14 or
    # 28 x 28 image in 8 x 16 tiles: 23%) and needs more blocks for the same work (S4: 128 blocks
    # against 98; S3/S6: 256 against 196, two waves of 1 block per SM either way). The split
    # forward keeps its 8 x 8 tiles (its blocks meet per pixel in atomics; a flat tile buys it
    # nothing there).
    # Measured per kernel in one process (H200, ktime, fwd us, 8x16 -> flat): fp32 S3
    # 141.1 -> 137.1, S4 128.3 -> 124.7, S6 82.0 -> 79.3; bf16 (16 warps) S3 95.1 -> 94.5, S6
    # 58.8 -> 58.4. Predicted S4 ~70: the forward is not wave-bound (docs/kernels.md).
    # Flat 128 x 128 tiles run 8 warps for every dtype: bf16 S3 94.5 -> 93.3, S6 58.4 -> 57.9 us
    # (16 -> 8 warps, same process; tile sweep S3 98 -> 94, S6 63 -> 54).
    overhangs = s.h_out % tile.tile_h != 0 or s.w_out % tile.tile_w != 0
    if overhangs and tile.tile_k == 32:
        warps = 8 if (tile.tile_h * tile.tile_w, tile.tile_n) == (128, 128) else tile.warps
        tile = dataclasses.replace(tile, tile_h=1, tile_w=tile.tile_h * tile.tile_w, warps=warps)
    return tile


def _gpu_forward_rect(s: LayerShape, sm_count: int, deterministic: bool = False) -> TileConfig:
    """GPU rules (owned by the CUDA kernels; measurements in docs/kernels.md, "tile sweep").

    Instantiated forward tiles (csrc/cuda/dispatch.cuh): (pixels, tile_n, warps) in
    {(64, 64, 4), (128, 64, 4), (128, 128, 8), (128, 128, 16)}, pixels = tile_h * tile_w,
    tile_k = 32, stages 1 or 2 (2 = register prefetch + double-buffered shared memory on the
    tensor-core path); float64
    (exact SIMT path): (64, 64, 4) only. Split forward (not float64): (64, 64, 4), stages 2,
    tile_k in {128, 256, 512}. The backward passes use the spatial tile when it has 64
    pixels, else 8 x 8, and follow ``stages`` too: 2 = the pipelined data pass (3 cp.async stages)
    and weight pass (double-buffered) on the tensor-core vector path (docs/kernels.md).
    The pipelined forward and weight loops keep 32-bit element offsets into x: for an x of 2^31
    or more elements the CUDA launcher runs their simple loops whatever ``stages`` says.
    ``deterministic``: never the split forward (its partial sums over taps meet in float atomics);
    such a layer takes the rule below it (every other forward reduces each output in one block, or
    one cluster in rank order, so it is bitwise reproducible). Not measured against each other.
    """
    del sm_count  # the suite's grids already fill 132 SMs with these tiles; see docs/kernels.md
    pixels_per_image = s.h_out * s.w_out
    c_out_per_group = s.c_out // s.feature_groups
    if s.dtype == "float64":
        return TileConfig(tile_h=8, tile_w=8, tile_n=64, tile_k=32, warps=4, stages=2, family="streaming")
    if (c_out_per_group >= 256 and pixels_per_image <= _SPLIT_MAX_PIXELS
            and _vector_channels(s) and not deterministic):
        # S5: few pixels per image, many output channels. The streaming
        # kernel re-samples x once per output-channel block (8x at S5 with 64-wide blocks, 2x at S4
        # with the 8x16 x 128 tile, whose 128 blocks are one wave at 1 block/SM); the split forward
        # samples each (pixel, tap, channel) once and meets over taps in fp32 atomics.
        # Measured (H200, gpu_tile_sweep, fwd us, streaming best -> split): S5 bf16
        # 159 -> 87, fp32 240 -> 137 (tile_k 256 / 128); S4 bf16 99 -> 88, fp32 161 -> 158 (a
        # tie, so fp32 keeps the deterministic streaming kernel there).
        return TileConfig(tile_h=8, tile_w=8, tile_n=64, tile_k=_SPLIT_K.get(s.dtype, 256), warps=4,
                          stages=2, family="split")
    if pixels_per_image >= 128 and c_out_per_group > 64:
        # S3/S4/S6: a 128x128 tile halves the re-sampling of x per output channel (every
        # channel block re-samples its pixels). Measured bf16 S3 218 -> 145 us, S4 243 -> 128,
        # S6 138 -> 90; fp32 S3 367 -> 287, S4 347 -> 262, S6 219 -> 176 (vs 8x8x64).
        # Warps and orientation, re-measured after the 32-bit corner offsets (H200,
        # gpu_tile_sweep fwd us; docs/kernels.md):
        # - fp32: 8 warps (236 registers, no spill) beat 16 (128-register cap, spills, x's pointer
        #   reloaded per corner): 8x16 S3 144 vs 169, S4 133 vs 145, S6 87 vs 113 (16x8 x 16
        #   warps: 158 / 151 / 93); confirmed per kernel (ktime): S3 153.8 -> 140.3,
        #   S4 141.9 -> 126.9, S6 89.0 -> 81.2. Before those changes 16 warps were 0-4% faster.
        # - 16-bit types keep 16 warps on 8x16: 8 warps were 1-4% slower (S3 99.1 vs 96.0, S6
        #   60.0 vs 59.2; sweep, mixed: S3 101 vs 99, S6 75 vs
        #   79). A 16x8 tile was no faster per kernel (ktime after vs before: S3 94.9 vs 94.9,
        #   S6 58.8 vs 58.1; the sweep's S6 64 vs 79 did not reproduce). The suite's 28 x 28 and
        #   14 x 14 images take flat 8-warp tiles instead (_gpu_forward_tile).
        if s.dtype == "float32":
            return TileConfig(tile_h=8, tile_w=16, tile_n=128, tile_k=32, warps=8, stages=2,
                              family="streaming")
        return TileConfig(tile_h=8, tile_w=16, tile_n=128, tile_k=32, warps=16, stages=2,
                          family="streaming")
    # Everything else (S1, S2, S5: <= 64 output channels, or 7x7 outputs where a 128-pixel tile
    # would be 62% padding): 8x8 x 64. For 16-bit types this tile runs 4 blocks of 4 warps per SM
    # (128-register cap), which beat the 128-pixel tile at S1/S2 (bf16 S2 184 vs 191 us, S5 175 vs
    # 264; docs/kernels.md); fp32's 128-pixel tile spills (437 -> 525 us at S2).
    # stages=2 vs 1: S5 bf16 420 -> 211 us, S2 bf16 379 -> 250, fp32 S2 547 -> 437.
    return TileConfig(tile_h=8, tile_w=8, tile_n=64, tile_k=32, warps=4, stages=2, family="streaming")


# (pixels, tile_n, warps) the CUDA forward instantiates (csrc/cuda/dispatch.cuh, with_fwd_cfg);
# tile_k is 32 and stages 1 or 2 for all; float64 has the first only.
_GPU_TILES = ((64, 64, 4), (128, 64, 4), (128, 128, 8), (128, 128, 16))
# The warp-specialized forward (csrc/cuda/forward_ws.cuh, not float64): tile_k = 32,
# (pixels, tile_n, warps, stages = shared-memory ring slots) below; 4 consumer + 4 producer warps.
_GPU_WS_TILES = ((128, 128, 8, 3), (64, 64, 8, 3), (64, 128, 8, 3))
# Blocks per tile (one cluster) of the warp-specialized forward (forward_ws.cuh).
_GPU_WS_K_SPLITS = (1, 2, 4)
# Output channels per block of the weight pass (backward.cuh, WeightCfg / WeightCfgWide; 128 not
# for float64, and on the pipelined path only: the simple loop has the 64-wide tile).
_GPU_BWD_TILE_N = (64, 128)
# The split forward (forward.cuh, deform_fwd_split_kernel; not float64): 64 pixels x 64 output
# channels, 4 warps, stages 2, tile_k = input channels resident per block.
_SPLIT_TILE_K = (128, 256, 512)
# tile_k of the split forward: a 32 KiB resident segment, 256 channels of 16-bit types (.get
# default) or 128 of float32 (256 fp32 channels, 64 KiB, measured slower at S5: 319 vs 264 us).
_SPLIT_K = {"float32": 128}
# Largest output image (pixels) for which the split forward wins: 64 (S5). 16-bit S4 (196) was
# on the split too while its alternative was the streaming kernel (end to end 93.5-99.5 us against
# 102.5, docs/kernels.md); the warp-specialized ring beats it per kernel (75.8 us
# against 87.2 + 4.6, ktime) and end to end (docs/kernels.md).
_SPLIT_MAX_PIXELS = 64


def _vector_channels(s: LayerShape) -> bool:
    """Every channel count is a multiple of the 16-byte vector (the split loader's requirement;
    mirrors make_geo's `vec` in dispatch.cuh)."""
    v = 16 // _itemsize(s.dtype)
    cg, cog, cpog = s.c_in // s.feature_groups, s.c_out // s.feature_groups, s.c_in // s.offset_groups
    return all(c % v == 0 for c in (s.c_in, cg, cpog, s.c_out, cog))


def check_gpu_tile(tile: TileConfig, dtype: str, cc_major: int = 0, compiled=None) -> None:
    """ValueError unless the CUDA kernels instantiate ``tile`` for ``dtype`` (caught at trace time,
    before any kernel), and, given the device's compute capability (``cc_major`` > 0), unless the
    device can run it. ``compiled``: the CUDA module's own check (``_ffi.compiled_tile_error``:
    the message of the handlers' check, "" when instantiated, None without the module), which is
    then the answer; ``gpu_tile_error`` mirrors it for traces without the module (an export for
    CUDA from a CPU-only install), and tests/test_tiling.py holds the two equal on every candidate
    tile wherever the module is built."""
    why = compiled(tile.as_attrs(), dtype) if compiled is not None else None
    if why is None:
        why = gpu_tile_error(tile, dtype)
    if why:
        raise ValueError(why)
    if tile.k_splits > 1 and 0 < cc_major < 9:
        raise ValueError(f"GPU tile configuration {tile}: k_splits={tile.k_splits} needs "
                         f"thread-block clusters (compute capability 9.0+); this device has "
                         f"{cc_major}.x: use k_splits=1")


def gpu_tile_error(tile: TileConfig, dtype: str) -> str:
    """"" if the CUDA kernels instantiate ``tile`` for ``dtype`` (the rule of the C++
    GpuTileError), else why not."""
    allowed = _GPU_TILES[:1] if dtype == "float64" else _GPU_TILES
    bwd_allowed = (64,) if dtype == "float64" else _GPU_BWD_TILE_N
    if tile.bwd_tile_n not in bwd_allowed:
        return f"GPU tile configuration {tile}: bwd_tile_n must be one of {bwd_allowed} for {dtype}"
    key = (tile.tile_h * tile.tile_w, tile.tile_n, tile.warps)
    half = dtype != "float64"
    good = {
        "streaming": key in allowed and tile.tile_k == 32 and tile.stages in (1, 2) and tile.k_splits == 1,
        "split": (half and key == _GPU_TILES[0] and tile.tile_k in _SPLIT_TILE_K and tile.stages == 2
                  and tile.k_splits == 1),
        "ring": (half and (*key, tile.stages) in _GPU_WS_TILES and tile.tile_k == 32
                 and tile.k_splits in _GPU_WS_K_SPLITS),
    }[tile.family]
    if good:
        return ""
    return (f"GPU tile configuration {tile} is not instantiated for {dtype}; family streaming: "
            f"(tile_h*tile_w, tile_n, warps) in {allowed}, tile_k=32, stages 1 or 2"
            + ("" if dtype == "float64" else
               f"; family split: (64, 64, 4), tile_k in {_SPLIT_TILE_K}, stages 2; family ring "
               f"(the warp-specialized forward): (pixels, tile_n, warps, stages) in {_GPU_WS_TILES}, "
               f"tile_k=32, k_splits in {_GPU_WS_K_SPLITS}")
            + "; k_splits=1 everywhere else")


# --------------------------------------------------------------------------- the route per shape

ROUTES = ("fused", "columns")
DIRECTIONS = ("fwd", "bwd")
# The measured table: which route ran the forward and which the backward faster, per layer shape
# and dtype, on one GPU model (deft_jax/routes.json, written by benchmarks/make_routes.py from a
# bench_layers.py run that timed both routes side by side). The two directions are separate
# custom calls on the same inputs, so a layer may run the forward on one route and the backward
# on the other.
_ROUTE_TABLE = pathlib.Path(__file__).with_name("routes.json")


# The fields of LayerShape (and of a routes.json row) that name a table row: all but the batch.
_ROUTE_KEY_FIELDS = ("h_out", "w_out", "c_in", "c_out", "taps", "offset_groups", "feature_groups",
                     "dtype")


def _route_key(fields) -> tuple:
    """The table key of a LayerShape or a routes.json row (``fields(name)`` reads one field)."""
    return tuple(str(fields(k)) if k == "dtype" else int(fields(k)) for k in _ROUTE_KEY_FIELDS)


@functools.lru_cache(maxsize=1)
def route_table() -> dict[tuple, dict[str, str]]:
    """{shape key: {"fwd": route, "bwd": route}} of deft_jax/routes.json (empty when the file is
    absent)."""
    if not _ROUTE_TABLE.is_file():
        return {}
    rows = json.loads(_ROUTE_TABLE.read_text())["routes"]
    return {_route_key(r.__getitem__): dict(r["route"]) for r in rows}


def route_heuristic(s: LayerShape) -> str:
    """The route of a shape the table has not measured: the column route where the GEMM
    dominates, i.e. many output channels on few pixels. The fused kernels sample each (pixel, tap,
    channel) once per output-channel tile, the column route once, leaving the reduction to cuBLAS;
    but the column route writes and reads its columns through memory, which costs more than the
    fused re-sampling wherever an image has more pixels. Measured (H200, bench_layers, fused ->
    columns, us): S5 (7x7, 512 -> 512) fwd fp32 143 -> 110, bf16 101 -> 46, fwd+bwd bf16 310 ->
    140; S4 (14x14, 256 -> 256) fwd fp32 125 -> 162, bf16 84 -> 114 (fwd+bwd a tie: 446 / 437,
    308 / 297); S1-S3, S6 (<= 128 output channels) fwd 1.6-3.1x slower on columns."""
    pixels = s.h_out * s.w_out
    cout = s.c_out // s.feature_groups
    return "columns" if cout >= ROUTE_COLUMNS_MIN_COUT and pixels <= ROUTE_COLUMNS_MAX_PIXELS else "fused"


# route_heuristic's bounds: C_out per group from which, and pixels per image up to which, unseen
# shapes take the column route (S5 has 512 and 49; S4, 256 and 196, stays fused).
ROUTE_COLUMNS_MIN_COUT = 256
ROUTE_COLUMNS_MAX_PIXELS = 64


@functools.lru_cache(maxsize=4096)
def choose_route(platform: str, shape: LayerShape, deterministic: bool = False,
                 requested: str | None = None, direction: str = "fwd", blas_core: str = "") -> str:
    """"columns" or "fused" for the ``direction`` ("fwd" or "bwd") of ``shape`` on ``platform``.
    CPU: the backward takes the column route (there is no fused CPU backward); the forward the
    ``requested`` one, else the fused forward where cpu_fused_by_default says so for OpenBLAS's
    ``blas_core``, else the column route. GPU: ``requested`` when given
    (implementation="fused" / "columns", both directions), else the measured table, else
    route_heuristic. ``deterministic`` does not change the route: both routes have a
    deterministic mode (the fused kernels' fixed-point backward, the column route's fixed-point
    col2im), each costing a similar fraction of its route's time."""
    del deterministic
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
    if platform == "cpu":
        if direction == "bwd":
            return "columns"
        if requested is not None:
            return requested
        return "fused" if cpu_fused_by_default(shape, blas_core) else "columns"
    if requested is not None:
        return requested
    row = route_table().get(_route_key(lambda k: getattr(shape, k)))
    return row[direction] if row else route_heuristic(shape)


@functools.lru_cache(maxsize=4096)
def choose_tiling(platform: str, shape: LayerShape, sm_count: int = 0, cc_major: int = 0,
                  deterministic: bool = False) -> TileConfig:
    """Tile configuration for ``shape`` on ``platform`` ("cuda"; the CPU route's only choice is
    ``cpu_chunk_images``); the device's SM count and compute capability (major) refine it (0:
    unknown, no rule that needs them), and ``deterministic`` (bitwise reproducible results)
    excludes the split forward."""
    if platform == "cuda":
        return _gpu_tiling(shape, sm_count, cc_major, bool(deterministic))
    raise ValueError(f"no tiling rules for platform {platform!r}")
