"""Shape-driven tile configurations: the one place where tiling decisions live.

``choose_tiling`` is a pure, memoised function of the layer's shape, dtype and device; its result
is passed to the native handlers as FFI attributes, so the choice is visible in the HLO,
deterministic at trace time and exportable. The measurements behind each rule are in
benchmarks/NOTES.md.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """A tile choice. GPU: a block computes tile_h x tile_w output pixels x tile_n output channels,
    reducing over input channels tile_k at a time, with ``warps`` warps and ``stages`` pipeline
    stages. CPU: one task processes tile_h x tile_w output pixels (the rest is unused)."""

    tile_h: int
    tile_w: int
    tile_n: int
    tile_k: int
    warps: int
    stages: int

    def as_attrs(self) -> dict[str, np.int64]:
        return {f.name: np.int64(getattr(self, f.name)) for f in dataclasses.fields(self)}


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


# Per-task working set the CPU handler keeps hot: the sampled columns of the task's pixels
# (pixels x taps x C_in accumulators). 256 KiB stays within a typical L2 slice.
_CPU_COLUMN_BYTES = 256 * 1024


def _cpu_tiling(s: LayerShape) -> TileConfig:
    acc_bytes = 8 if s.dtype == "float64" else 4
    per_pixel = max(1, s.taps * s.c_in * acc_bytes)
    pixels = int(np.clip(_CPU_COLUMN_BYTES // per_pixel, 4, 64))
    pixels = min(pixels, s.h_out * s.w_out)
    return TileConfig(tile_h=1, tile_w=pixels, tile_n=s.c_out, tile_k=s.c_in, warps=1, stages=1)


def _gpu_tiling(s: LayerShape, sm_count: int) -> TileConfig:
    """GPU rules (owned by the CUDA kernels; see benchmarks/NOTES.md for the measurements)."""
    del sm_count
    return TileConfig(tile_h=8, tile_w=8, tile_n=64, tile_k=32, warps=4, stages=2)


@functools.lru_cache(maxsize=4096)
def choose_tiling(platform: str, shape: LayerShape, sm_count: int = 0) -> TileConfig:
    """Tile configuration for ``shape`` on ``platform`` ("cpu" or "cuda")."""
    if platform == "cpu":
        return _cpu_tiling(shape)
    if platform == "cuda":
        return _gpu_tiling(shape, sm_count)
    raise ValueError(f"no tiling rules for platform {platform!r}")
