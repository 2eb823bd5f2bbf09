"""Synthetic glyph classification data, generated on the fly (numpy only, no downloads).

Ten classes of digit-like glyphs drawn as anti-aliased strokes, each under a random affine map
(rotation, anisotropic scale, shear, translation) and a smooth random elastic warp, with random
stroke width, colours and pixel noise. The class is the glyph's topology, not its position or
pose, so a network benefits from sampling where the stroke actually went — what a deformable
convolution learns. Everything is a pure function of the seed: every model of a comparison sees
the same images. Example code to copy: it needs numpy only.

Example:
  >>> ds = make_dataset(2048, 512, image_size=32, channels=1, seed=0)
  >>> ds.train_images.shape, ds.train_images.dtype, ds.train_labels[:4]
  ((2048, 32, 32, 1), dtype('float32'), array([...], dtype=int32))
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

NUM_CLASSES = 10

__all__ = ["NUM_CLASSES", "Dataset", "Distortion", "generate", "make_dataset", "glyph_segments"]


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 12) -> list[tuple[float, float]]:
    t = np.linspace(0.0, 2.0 * np.pi, n + 1)
    return [(cx + rx * np.sin(a), cy - ry * np.cos(a)) for a in t]


def _rot180(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(1.0 - x, 1.0 - y) for x, y in points]


_SIX = [(0.72, 0.12), (0.45, 0.16), (0.3, 0.38), (0.25, 0.66), (0.34, 0.86), (0.54, 0.92),
        (0.73, 0.82), (0.76, 0.62), (0.58, 0.49), (0.38, 0.52), (0.26, 0.64)]

# Polylines per class in glyph coordinates: x to the right, y downwards, both in [0, 1].
_GLYPHS: tuple[tuple[list[tuple[float, float]], ...], ...] = (
    (_ellipse(0.5, 0.5, 0.28, 0.4),),
    ([(0.33, 0.26), (0.52, 0.1), (0.52, 0.9)], [(0.32, 0.9), (0.72, 0.9)]),
    ([(0.24, 0.3), (0.32, 0.15), (0.5, 0.1), (0.69, 0.15), (0.77, 0.3), (0.7, 0.47), (0.22, 0.9),
      (0.8, 0.9)],),
    ([(0.22, 0.16), (0.5, 0.1), (0.74, 0.19), (0.75, 0.37), (0.46, 0.5), (0.78, 0.62),
      (0.78, 0.8), (0.52, 0.92), (0.22, 0.85)],),
    ([(0.66, 0.9), (0.66, 0.1), (0.2, 0.65), (0.82, 0.65)],),
    ([(0.78, 0.1), (0.3, 0.1), (0.26, 0.45), (0.55, 0.4), (0.77, 0.54), (0.78, 0.78),
      (0.55, 0.92), (0.22, 0.85)],),
    (_SIX,),
    ([(0.2, 0.1), (0.8, 0.1), (0.42, 0.9)],),
    (_ellipse(0.5, 0.29, 0.21, 0.19), _ellipse(0.5, 0.7, 0.26, 0.22)),
    (_rot180(_SIX),),
)


def glyph_segments() -> list[np.ndarray]:
    """Stroke segments of the ten glyphs: float32 [n_seg_k, 2, 2] per class k, segment s from
    [s, 0] to [s, 1], points as (x, y) in [0, 1]."""
    return [np.asarray([(p, q) for line in polylines for p, q in zip(line[:-1], line[1:])],
                       np.float32)
            for polylines in _GLYPHS]


@dataclasses.dataclass(frozen=True)
class Distortion:
    """Ranges of the random distortions (uniform unless said otherwise).

    Attributes:
      max_rotation: degrees, both directions.
      scale: (min, max) glyph size relative to the canvas, drawn per axis.
      max_shear: shear factor, both directions.
      max_shift: translation as a fraction of the canvas, both directions and axes.
      elastic: standard deviation of the elastic displacement, as a fraction of the canvas.
      elastic_grid: the elastic field is Gaussian noise on this many control points per axis,
        bilinearly upsampled (smooth, large-scale warps).
      stroke: (min, max) stroke half-width as a fraction of the glyph box.
      clutter: up to this many distracting stroke fragments (0.2 to 0.6 of the canvas long,
        anywhere on it) drawn with the glyph's ink.
      noise: standard deviation of additive pixel noise.
    """
    max_rotation: float = 35.0
    scale: tuple[float, float] = (0.55, 0.95)
    max_shear: float = 0.4
    max_shift: float = 0.12
    elastic: float = 0.05
    elastic_grid: int = 4
    stroke: tuple[float, float] = (0.05, 0.09)
    clutter: int = 3
    noise: float = 0.08


class Dataset(NamedTuple):
    """Train/test split. Images float32 [N, H, W, C] in [0, 1]; labels int32 [N] in [0, 10)."""
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] linear-interpolation matrix, endpoints aligned."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] = 1.0 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def _render(labels: np.ndarray, image_size: int, channels: int, dist: Distortion,
            rng: np.random.Generator) -> np.ndarray:
    """Images float32 [B, S, S, C] of the glyphs `labels` [B]."""
    b, s = labels.shape[0], image_size
    segments = glyph_segments()
    # Canvas coordinates of the pixel centres in [-1, 1]: u [S], grid (x, y) [S, S, 2].
    u = (np.arange(s) + 0.5) / s * 2.0 - 1.0
    grid = np.stack(np.meshgrid(u, u, indexing="xy"), axis=-1)

    # Elastic warp: a smooth displacement field [B, S, S, 2] added to the canvas coordinates.
    up = _upsample_matrix(dist.elastic_grid, s)
    coarse = rng.normal(0.0, 2.0 * dist.elastic, (b, dist.elastic_grid, dist.elastic_grid, 2))
    pts = grid[None] + np.einsum("yi,xj,bijc->byxc", up, up, coarse, optimize=True)

    # Inverse affine canvas -> glyph box: p_glyph = A^-1 (p - t) / 2 + 0.5, A = R(theta) Sh S.
    theta = np.deg2rad(rng.uniform(-dist.max_rotation, dist.max_rotation, b))
    scale = rng.uniform(*dist.scale, (b, 2))
    shear = rng.uniform(-dist.max_shear, dist.max_shear, b)
    shift = rng.uniform(-dist.max_shift, dist.max_shift, (b, 2)) * 2.0
    cos, sin = np.cos(theta), np.sin(theta)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)      # [B, 2, 2]
    shr = np.zeros((b, 2, 2))
    shr[:, 0, 0] = shr[:, 1, 1] = 1.0
    shr[:, 0, 1] = shear
    affine = rot @ shr @ (scale[:, :, None] * np.eye(2))                            # [B, 2, 2]
    inv = np.linalg.inv(affine)
    p = np.einsum("bij,byxj->byxi", inv, pts - shift[:, None, None]) / 2.0 + 0.5   # [B, S, S, 2]

    # Distance of every pixel to the nearest stroke of its glyph, class by class: [B, S, S].
    px, py = p[..., 0].astype(np.float32), p[..., 1].astype(np.float32)
    dist_sq = np.empty((b, s, s), np.float32)
    for k in np.unique(labels):
        sel = labels == k
        qx, qy = px[sel][..., None], py[sel][..., None]             # [B_k, S, S, 1]
        (ax, ay), (bx, by) = segments[k].transpose(1, 2, 0)          # each [n_seg]
        dx, dy = bx - ax, by - ay
        t = ((qx - ax) * dx + (qy - ay) * dy) / np.maximum(dx * dx + dy * dy, 1e-12)
        t = np.clip(t, 0.0, 1.0)                                     # [B_k, S, S, n_seg]
        dist_sq[sel] = np.min((qx - ax - t * dx) ** 2 + (qy - ay - t * dy) ** 2, axis=-1)
    dist_seg = np.sqrt(dist_sq)

    # Clutter: fragments [B, F, 2 ends, (x, y)] on the undistorted canvas, F random per image.
    starts = rng.uniform(-0.9, 0.9, (b, dist.clutter, 2))
    angle = rng.uniform(0.0, 2.0 * np.pi, (b, dist.clutter))
    length = rng.uniform(0.2, 0.6, (b, dist.clutter, 1))
    ends = starts + length * np.stack([np.cos(angle), np.sin(angle)], -1)
    present = np.arange(dist.clutter) < rng.integers(0, dist.clutter + 1, (b, 1))   # [B, F]
    q = grid[None, :, :, None, :]                                                  # [1, S, S, 1, 2]
    a, d = starts[:, None, None], (ends - starts)[:, None, None]                   # [B, 1, 1, F, 2]
    t = np.clip(((q - a) * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-12), 0.0, 1.0)
    clutter_dist = np.linalg.norm(q - a - t[..., None] * d, axis=-1)               # [B, S, S, F]
    clutter_dist = np.where(present[:, None, None], clutter_dist, np.inf).min(-1, initial=np.inf)

    # Anti-aliased stroke: coverage ramps over one pixel, measured in glyph units.
    pixel = 1.0 / (s * scale.mean(-1))[:, None, None]
    width = rng.uniform(*dist.stroke, b)[:, None, None]
    ink = np.clip((width - dist_seg) / pixel + 0.5, 0.0, 1.0)[..., None]          # [B, S, S, 1]
    # Clutter strokes in canvas units ([-1, 1]: a pixel is 2 / S), half the glyph's width.
    clutter_width = (width * scale.mean(-1)[:, None, None]) * 0.5 * 2.0
    clutter_ink = np.clip((clutter_width - clutter_dist) * s / 2.0 + 0.5, 0.0, 1.0)[..., None]
    ink = np.maximum(ink, clutter_ink)

    if channels == 1:
        fg = rng.uniform(0.7, 1.0, (b, 1, 1, 1))
        bg = rng.uniform(0.0, 0.25, (b, 1, 1, 1))
    else:
        fg = rng.uniform(0.45, 1.0, (b, 1, 1, channels))
        bg = rng.uniform(0.0, 0.3, (b, 1, 1, channels)) + np.einsum(
            "yxi,bic->byxc", grid, rng.uniform(-0.1, 0.1, (b, 2, channels)), optimize=True)
    img = bg + ink * (fg - bg) + rng.normal(0.0, dist.noise, (b, s, s, channels))
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def generate(num_examples: int, *, image_size: int = 32, channels: int = 1, seed: int = 0,
             distortion: Distortion = Distortion()) -> tuple[np.ndarray, np.ndarray]:
    """Draws `num_examples` glyph images, classes balanced and shuffled.

    Args:
      num_examples: number of images.
      image_size: side S of the square images.
      channels: 1 (grey) or 3 (random foreground and background colours).
      seed: the images are a deterministic function of (num_examples, image_size, channels, seed,
        distortion).
      distortion: ranges of the random distortions.

    Returns:
      images: float32 [num_examples, S, S, channels] in [0, 1].
      labels: int32 [num_examples] in [0, NUM_CLASSES).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_examples) % NUM_CLASSES).astype(np.int32)
    chunk = max(1, 2 ** 18 // (image_size * image_size))  # bounds the [B, S, S, n_seg] temporaries
    images = np.empty((num_examples, image_size, image_size, channels), np.float32)
    for start in range(0, num_examples, chunk):
        stop = min(start + chunk, num_examples)
        images[start:stop] = _render(labels[start:stop], image_size, channels, distortion, rng)
    return images, labels


def make_dataset(num_train: int, num_test: int, *, image_size: int = 32, channels: int = 1,
                 seed: int = 0, distortion: Distortion = Distortion()) -> Dataset:
    """Train and test splits drawn from independent streams of `seed`.

    The test split does not depend on `num_train` (and vice versa), so runs with different training
    lengths are evaluated on the same images.
    """
    train_seed, test_seed = np.random.SeedSequence(seed).spawn(2)
    kwargs = dict(image_size=image_size, channels=channels, distortion=distortion)
    train = generate(num_train, seed=train_seed.generate_state(1)[0], **kwargs)
    test = generate(num_test, seed=test_seed.generate_state(1)[0], **kwargs)
    return Dataset(*train, *test)
