"""``nearid-make-synthetic``: a procedural NearID world written in the NearID dataset schema.

Identities are objects with a shape (and aspect), two colours in a pattern, a fine texture and an attached part of a
third colour. Each identity is shown in several views (its own busy background, position, scale, slight rotation
and lighting). For every view and every difficulty level there is a near-identity distractor: a similar but
different object placed on exactly the same background, at the same place, scale, rotation and lighting. The
levels differ in what the distractor changes:

* ``colour``: the primary colour's hue (everything else identical);
* ``pattern``: the colour pattern (same colours, shape and part);
* ``part``: the attached part (type or side) or a shape detail (a neighbouring shape).

Everything is drawn with numpy (analytic masks, supersampled and box-filtered) and encoded with PIL; the output is
deterministic for a given seed. It is written as a positives table (``id``, ``img1..3`` or ``images1..3``) and one
distractor table per level (``id``, ``nimg1..3``) as parquet files with ``datasets`` image features, plus seeded
held-out splits by identity, so the trainer and ``nearid-eval`` read it like the real NearID data.
"""

from __future__ import annotations

import argparse
import colorsys
import io
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nearid_reward.cli.entry_points import add_debug_flag, entry_point
from nearid_reward.files import atomic_write, remove_stale_temporaries, write_json_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "LEVELS",
    "SHAPES",
    "PATTERNS",
    "PARTS",
    "SynthObject",
    "SynthContext",
    "SyntheticConfig",
    "sample_object",
    "sample_context",
    "make_distractor",
    "background",
    "render",
    "generate_synthetic",
    "generate_synthetic_mtg",
    "write_image_table",
    "png_bytes",
    "main",
]

LEVELS = ("colour", "pattern", "part")
SHAPES = ("circle", "square", "diamond", "triangle", "hexagon", "pentagon", "star", "cross", "blob")
# Shapes that look alike: a "shape detail" distractor swaps to one of these.
SHAPE_NEIGHBOURS = {
    "circle": ("blob", "hexagon"), "square": ("diamond", "cross"), "diamond": ("square", "triangle"),
    "triangle": ("diamond", "pentagon"), "hexagon": ("pentagon", "circle"), "pentagon": ("hexagon", "triangle"),
    "star": ("cross", "blob"), "cross": ("star", "square"), "blob": ("circle", "star"),
}
PATTERNS = ("solid", "hstripes", "vstripes", "checker", "dots", "halves", "rings", "diagonal")
PARTS = ("antenna", "ears", "hat", "ball", "handle", "spikes")
SIDES = ("top", "right", "bottom", "left")


@dataclass(frozen=True)
class SynthObject:
    """One object identity (colours are RGB in [0, 1]; ``freq`` is the pattern frequency)."""

    shape: str
    aspect: float
    primary: tuple[float, float, float]
    secondary: tuple[float, float, float]
    part_colour: tuple[float, float, float]
    pattern: str
    freq: float
    texture_amp: float
    texture_freq: float
    texture_angle: float
    part: str
    part_side: str

    def describe(self) -> str:
        def name(c: tuple[float, float, float]) -> str:
            hue = colorsys.rgb_to_hsv(*c)[0] * 360
            names = ["red", "orange", "yellow", "lime", "green", "teal", "cyan", "azure", "blue", "violet", "magenta",
                     "pink"]
            return names[int(((hue + 15) % 360) // 30)]

        return (f"a {name(self.primary)} and {name(self.secondary)} {self.pattern} {self.shape} with a "
                f"{name(self.part_colour)} {self.part} on the {self.part_side}")


@dataclass(frozen=True)
class SynthContext:
    """One view's scene: background, placement (relative units), rotation (radians) and lighting."""

    background_seed: int
    bg_a: tuple[float, float, float]
    bg_b: tuple[float, float, float]
    bg_angle: float
    clutter: int
    cx: float
    cy: float
    radius: float
    rotation: float
    brightness: float


@dataclass
class SyntheticConfig:
    """Options of :func:`generate_synthetic` (and the ``nearid-make-synthetic`` flags of the same names).

    Attributes:
        num_identities: number of identities (rows).
        image_size: square image size in pixels.
        views: views per identity (1..3; the NearID schema has three view columns).
        levels: distractor levels written, each as its own distractor table.
        seed: everything is derived from it.
        val_fraction, test_fraction: held-out identities for validation and test (saved as index files).
        view_prefix: ``"img"`` (dataset-card naming) or ``"images"`` (official-code naming) for view columns.
        supersample: rendering supersampling factor (anti-aliasing).
        missing_view_rate: fraction of identities whose last view is left empty (exercises the masks).
    """

    num_identities: int = 64
    image_size: int = 64
    views: int = 3
    levels: tuple[str, ...] = LEVELS
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    view_prefix: str = "img"
    supersample: int = 3
    missing_view_rate: float = 0.0

    def __post_init__(self) -> None:
        self.levels = tuple(self.levels)
        if self.num_identities < 1:
            raise ValueError(f"SyntheticConfig.num_identities must be >= 1, got {self.num_identities}")
        if self.image_size < 16:
            raise ValueError(f"SyntheticConfig.image_size must be >= 16, got {self.image_size}")
        if not 1 <= self.views <= 3:
            raise ValueError(f"SyntheticConfig.views must be 1, 2 or 3, got {self.views}")
        unknown = [lv for lv in self.levels if lv not in LEVELS]
        if unknown or not self.levels:
            raise ValueError(f"SyntheticConfig.levels must be a non-empty subset of {LEVELS}, got {self.levels}")
        for name in ("val_fraction", "test_fraction", "missing_view_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"SyntheticConfig.{name} must be in [0, 1), got {value}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("SyntheticConfig.val_fraction + test_fraction must be < 1")
        if self.view_prefix not in ("img", "images"):
            raise ValueError(f"SyntheticConfig.view_prefix must be 'img' or 'images', got {self.view_prefix!r}")
        if self.supersample < 1:
            raise ValueError(f"SyntheticConfig.supersample must be >= 1, got {self.supersample}")


# ---------------------------------------------------------------------------------------------- sampling
def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (float(r), float(g), float(b))


def _shift_hue(c: tuple[float, float, float], delta: float) -> tuple[float, float, float]:
    h, s, v = colorsys.rgb_to_hsv(*c)
    return _hsv(h + delta, s, v)


def sample_object(rng: np.random.Generator) -> SynthObject:
    """A random object identity."""
    hue = rng.random()
    return SynthObject(
        shape=str(rng.choice(SHAPES)),
        aspect=float(rng.uniform(0.75, 1.25)),
        primary=_hsv(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)),
        secondary=_hsv(hue + rng.uniform(0.25, 0.75), rng.uniform(0.4, 1.0), rng.uniform(0.5, 1.0)),
        part_colour=_hsv(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0)),
        pattern=str(rng.choice(PATTERNS)),
        freq=float(rng.uniform(2.0, 3.5)),
        texture_amp=float(rng.uniform(0.0, 0.15)),
        texture_freq=float(rng.uniform(5.0, 9.0)),
        texture_angle=float(rng.uniform(0, math.pi)),
        part=str(rng.choice(PARTS)),
        part_side=str(rng.choice(SIDES)),
    )


def _random_colour(rng: np.random.Generator) -> tuple[float, float, float]:
    return _hsv(rng.random(), rng.uniform(0.1, 0.9), rng.uniform(0.25, 0.95))


def sample_context(rng: np.random.Generator) -> SynthContext:
    """A random view context: background, placement, rotation and lighting."""
    radius = float(rng.uniform(0.2, 0.3))
    margin = radius * 1.5
    return SynthContext(
        background_seed=int(rng.integers(0, 2**31 - 1)),
        bg_a=_random_colour(rng),
        bg_b=_random_colour(rng),
        bg_angle=float(rng.uniform(0, 2 * math.pi)),
        clutter=int(rng.integers(8, 18)),
        cx=float(rng.uniform(margin, 1 - margin)),
        cy=float(rng.uniform(margin, 1 - margin)),
        radius=radius,
        rotation=float(rng.uniform(-0.35, 0.35)),
        brightness=float(rng.uniform(0.85, 1.15)),
    )


def make_distractor(obj: SynthObject, level: str, rng: np.random.Generator) -> SynthObject:
    """A near-identity variant of ``obj`` that differs only in what ``level`` names."""
    if level == "colour":
        delta = float(rng.uniform(0.1, 0.2)) * (1 if rng.random() < 0.5 else -1)
        return replace(obj, primary=_shift_hue(obj.primary, delta))
    if level == "pattern":
        other = [p for p in PATTERNS if p != obj.pattern]
        return replace(obj, pattern=str(rng.choice(other)))
    if level == "part":
        if rng.random() < 0.5:
            return replace(obj, shape=str(rng.choice(SHAPE_NEIGHBOURS[obj.shape])))
        if rng.random() < 0.5:
            return replace(obj, part=str(rng.choice([p for p in PARTS if p != obj.part])))
        return replace(obj, part_side=str(rng.choice([s for s in SIDES if s != obj.part_side])))
    raise ValueError(f"level must be one of {LEVELS}, got {level!r}")


# ---------------------------------------------------------------------------------------------- drawing
def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    rho = np.hypot(u, v)
    theta = np.arctan2(v, u)
    if shape == "circle":
        return rho <= 0.95
    if shape == "square":
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "triangle":
        return (v <= 0.75) & (np.abs(u) <= (v + 0.95) / 1.7 * 1.0)
    if shape == "hexagon":
        return np.maximum(np.abs(u), 0.5 * np.abs(u) + (math.sqrt(3) / 2) * np.abs(v)) <= 0.9
    if shape == "pentagon":
        sector = 2 * math.pi / 5
        local = np.mod(theta + math.pi / 2, sector) - sector / 2
        return rho * np.cos(local) <= 0.78
    if shape == "star":
        return rho <= 0.5 + 0.45 * (0.5 + 0.5 * np.cos(5 * (theta + math.pi / 2)))
    if shape == "cross":
        return ((np.abs(u) <= 0.33) & (np.abs(v) <= 0.95)) | ((np.abs(u) <= 0.95) & (np.abs(v) <= 0.33))
    if shape == "blob":
        return rho <= 0.78 + 0.16 * np.sin(3 * theta + 0.7)
    raise ValueError(f"unknown shape {shape!r}")


def _part_mask(part: str, side: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # rotate so that the chosen side points to -v ("up"), then draw the part above the body
    k = SIDES.index(side)
    angle = k * math.pi / 2
    up = -(u * math.sin(angle)) + v * math.cos(angle)  # along -v for "top"
    across = u * math.cos(angle) + v * math.sin(angle)
    if part == "antenna":
        return ((np.abs(across) <= 0.07) & (up <= -0.7) & (up >= -1.3)) | (np.hypot(across, up + 1.35) <= 0.15)
    if part == "ears":
        left = (np.abs(across - 0.45) <= (up + 1.45) * 0.45) & (up >= -1.45) & (up <= -0.6)
        right = (np.abs(across + 0.45) <= (up + 1.45) * 0.45) & (up >= -1.45) & (up <= -0.6)
        return left | right
    if part == "hat":
        return (np.abs(across) <= 0.5) & (up <= -0.7) & (up >= -1.2)
    if part == "ball":
        return np.hypot(across, up + 1.1) <= 0.3
    if part == "handle":
        ring = np.hypot(across, up + 0.9)
        return (ring <= 0.42) & (ring >= 0.26) & (up <= -0.8)
    if part == "spikes":
        out = np.zeros_like(u, dtype=bool)
        for c in (-0.45, 0.0, 0.45):
            out |= (np.abs(across - c) <= (up + 1.4) * 0.2) & (up >= -1.4) & (up <= -0.65)
        return out
    raise ValueError(f"unknown part {part!r}")


def _pattern(obj: SynthObject, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Weight of the secondary colour (0..1) over the object."""
    f = obj.freq
    if obj.pattern == "solid":
        return np.zeros_like(u)
    if obj.pattern == "hstripes":
        return (np.floor((v + 1) * f) % 2).astype(np.float32)
    if obj.pattern == "vstripes":
        return (np.floor((u + 1) * f) % 2).astype(np.float32)
    if obj.pattern == "checker":
        return ((np.floor((u + 1) * f) + np.floor((v + 1) * f)) % 2).astype(np.float32)
    if obj.pattern == "dots":
        gu = (u + 1) * f
        gv = (v + 1) * f
        return (np.hypot(gu - np.floor(gu) - 0.5, gv - np.floor(gv) - 0.5) <= 0.3).astype(np.float32)
    if obj.pattern == "halves":
        return (u > 0).astype(np.float32)
    if obj.pattern == "rings":
        return (np.floor(np.hypot(u, v) * f * 1.2) % 2).astype(np.float32)
    if obj.pattern == "diagonal":
        return (np.floor((u + v + 2) * f * 0.75) % 2).astype(np.float32)
    raise ValueError(f"unknown pattern {obj.pattern!r}")


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(ys, xs)`` in [0, 1] of an ``n`` x ``n`` canvas (cached; read-only)."""
    if n not in _GRIDS:
        ys, xs = (np.mgrid[0:n, 0:n].astype(np.float32) + 0.5) / n
        ys.setflags(write=False)
        xs.setflags(write=False)
        _GRIDS[n] = (ys, xs)
    return _GRIDS[n]


def background(ctx: SynthContext, n: int) -> np.ndarray:
    """The busy background of a view: float32 ``[n, n, 3]`` in [0, 1] (gradient, clutter shapes, blotchy noise)."""
    rng = np.random.default_rng(ctx.background_seed)
    ys, xs = _grid(n)
    t = xs * math.cos(ctx.bg_angle) + ys * math.sin(ctx.bg_angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = np.asarray(ctx.bg_a, np.float32) * (1 - t[..., None]) + np.asarray(ctx.bg_b, np.float32) * t[..., None]
    for _ in range(ctx.clutter):
        colour = np.asarray(_random_colour(rng), np.float32)
        cx, cy = rng.uniform(-0.1, 1.1, size=2)
        w, h = rng.uniform(0.04, 0.25, size=2)
        kind = int(rng.integers(0, 4))
        ang = float(rng.uniform(0, math.pi))
        alpha = float(rng.uniform(0.5, 1.0))
        if kind == 2:  # a thick line across the canvas
            box = (slice(None), slice(None))
        else:  # only the shape's bounding box needs evaluating
            r = max(w, h)
            box = (slice(max(0, int((cy - r) * n)), max(0, int(math.ceil((cy + r) * n)))),
                   slice(max(0, int((cx - r) * n)), max(0, int(math.ceil((cx + r) * n)))))
        x, y = xs[box], ys[box]
        if x.size == 0:
            continue
        if kind == 0:
            mask = (np.abs(x - cx) <= w) & (np.abs(y - cy) <= h)
        elif kind == 1:
            mask = ((x - cx) / w) ** 2 + ((y - cy) / h) ** 2 <= 1
        elif kind == 2:
            mask = np.abs((x - cx) * math.sin(ang) - (y - cy) * math.cos(ang)) <= w * 0.25
        else:
            mask = (y - cy <= h) & (np.abs(x - cx) <= (y - cy + h) * w / max(2 * h, 1e-3))
        region = img[box]
        region[mask] = region[mask] * (1 - alpha) + colour * alpha
    cells = max(2, n // 12)
    coarse = rng.normal(0, 0.06, size=(cells, cells, 3)).astype(np.float32)
    noise = np.stack(
        [np.asarray(Image.fromarray(coarse[..., c]).resize((n, n), Image.BILINEAR)) for c in range(3)], axis=-1
    )
    return np.clip(img + noise, 0, 1)


def render(
    obj: SynthObject, ctx: SynthContext, size: int = 64, *, supersample: int = 3, bg: np.ndarray | None = None,
    masks: bool = False,
) -> Any:
    """Draw ``obj`` in ``ctx``: uint8 ``[size, size, 3]`` (and, with ``masks``, the body and part coverage).

    Args:
        obj: the object.
        ctx: the view context.
        size: output size in pixels.
        supersample: rendering scale before box-filtering down (anti-aliasing).
        bg: the context's :func:`background` at ``size * supersample`` (computed when None; pass it to draw several
            objects into one scene cheaply).
        masks: also return float ``[size, size]`` coverage (0..1) of the body and of the part.

    Returns:
        The image, or ``(image, body_coverage, part_coverage)`` with ``masks``.
    """
    n = size * supersample
    img = (background(ctx, n) if bg is None else bg).copy()
    ys, xs = _grid(n)
    # only the object's neighbourhood (body + part reach 1.5 radii) is evaluated
    reach = ctx.radius * 1.6 * max(1.0, obj.aspect)
    rows = slice(max(0, int((ctx.cy - reach) * n)), min(n, int(math.ceil((ctx.cy + reach) * n))))
    cols = slice(max(0, int((ctx.cx - reach) * n)), min(n, int(math.ceil((ctx.cx + reach) * n))))
    dx, dy = xs[rows, cols] - ctx.cx, ys[rows, cols] - ctx.cy
    cos, sin = math.cos(ctx.rotation), math.sin(ctx.rotation)
    u = (dx * cos + dy * sin) / ctx.radius / obj.aspect
    v = (-dx * sin + dy * cos) / ctx.radius
    body = _shape_mask(obj.shape, u, v)
    part = _part_mask(obj.part, obj.part_side, u * obj.aspect, v) & ~body
    weight = _pattern(obj, u, v)[..., None]
    colour = np.asarray(obj.primary, np.float32) * (1 - weight) + np.asarray(obj.secondary, np.float32) * weight
    grain = 1 + obj.texture_amp * np.sin(
        2 * math.pi * obj.texture_freq * (u * math.cos(obj.texture_angle) + v * math.sin(obj.texture_angle))
    )
    shade = (1.0 - 0.12 * v)[..., None]  # soft top light
    region = img[rows, cols]
    region[body] = np.clip(colour * grain[..., None] * shade, 0, 1)[body]
    region[part] = np.clip(np.asarray(obj.part_colour, np.float32) * shade, 0, 1)[part]
    img = np.clip(img * ctx.brightness, 0, 1)
    img = img.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    out = (img * 255 + 0.5).astype(np.uint8)
    if not masks:
        return out
    cover = []
    for region in (body, part):
        full = np.zeros((n, n), np.float32)
        full[rows, cols] = region
        cover.append(full.reshape(size, supersample, size, supersample).mean(axis=(1, 3)))
    return out, cover[0], cover[1]


def png_bytes(array: np.ndarray) -> bytes:
    """An image array encoded as PNG (fast compression)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- dataset writing
@dataclass
class _Row:
    views: list[bytes | None] = field(default_factory=list)
    distractors: dict[str, list[bytes | None]] = field(default_factory=dict)
    description: str = ""


def _identity_row(index: int, config: SyntheticConfig) -> _Row:
    seed = config.seed
    obj = sample_object(np.random.default_rng([seed, index, 1]))
    views = config.views
    if config.missing_view_rate > 0 and views == 3:
        if np.random.default_rng([seed, index, 4]).random() < config.missing_view_rate:
            views = 2
    row = _Row(description=obj.describe(), distractors={lv: [] for lv in config.levels})
    for v in range(3):
        if v >= views:
            row.views.append(None)
            for lv in config.levels:
                row.distractors[lv].append(None)
            continue
        ctx = sample_context(np.random.default_rng([seed, index, 2, v]))
        bg = background(ctx, config.image_size * config.supersample)
        row.views.append(png_bytes(render(obj, ctx, config.image_size, supersample=config.supersample, bg=bg)))
        for li, lv in enumerate(LEVELS):
            if lv not in config.levels:
                continue
            other = make_distractor(obj, lv, np.random.default_rng([seed, index, 3, li, v]))
            image = render(other, ctx, config.image_size, supersample=config.supersample, bg=bg)
            row.distractors[lv].append(png_bytes(image))
    return row


def write_image_table(columns: dict[str, list[Any]], image_columns: Sequence[str], folder: Path) -> Path:
    """Write one NearID-schema parquet table under ``folder/data`` (``image_columns`` hold PNG bytes or None)."""
    import datasets

    features = {}
    for name in columns:
        if name in image_columns:
            features[name] = datasets.Image()
        elif name in ("id", "n_images"):
            features[name] = datasets.Value("int64")
        else:
            features[name] = datasets.Value("string")
    data = {
        name: [None if v is None else {"bytes": v, "path": None} for v in values] if name in image_columns else values
        for name, values in columns.items()
    }
    table = datasets.Dataset.from_dict(data, features=datasets.Features(features))
    out = folder / "data" / "train-00000-of-00001.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent)
    with atomic_write(out, "wb") as handle:
        table.to_parquet(handle)
    return out


def generate_synthetic(
    output_dir: str | os.PathLike[str], config: SyntheticConfig | None = None, *, progress: bool = False
) -> Path:
    """Write a synthetic NearID dataset.

    Layout::

        output_dir/positives/data/train-00000-of-00001.parquet        id, category, category_description,
                                                                       img1..img3 (or images1..3), n_images
        output_dir/distractors/<level>/data/train-00000-of-00001.parquet   id, category, nimg1..nimg3, n_images
        output_dir/splits/{train,val,test}.json                        {"indices": [...]} held-out identities
        output_dir/synthetic_config.json

    Args:
        output_dir: destination folder (created).
        config: generation options (default :class:`SyntheticConfig`).
        progress: show a tqdm progress bar over the identities.

    Returns:
        ``output_dir``.
    """
    from tqdm.auto import tqdm

    config = config or SyntheticConfig()
    out = Path(output_dir)
    start = time.perf_counter()
    rows = [_identity_row(i, config) for i in tqdm(range(config.num_identities), desc="synthetic identities",
                                                    disable=not progress, leave=False)]
    view_cols = [f"{config.view_prefix}{j}" for j in (1, 2, 3)]
    positives: dict[str, list[Any]] = {
        "id": list(range(config.num_identities)),
        "category": ["synthetic"] * config.num_identities,
        "category_description": [r.description for r in rows],
        "n_images": [sum(v is not None for v in r.views) for r in rows],
    }
    for j, col in enumerate(view_cols):
        positives[col] = [r.views[j] for r in rows]
    write_image_table(positives, view_cols, out / "positives")
    neg_cols = ["nimg1", "nimg2", "nimg3"]
    for lv in config.levels:
        table: dict[str, list[Any]] = {
            "id": list(range(config.num_identities)),
            "category": ["synthetic"] * config.num_identities,
            "n_images": [sum(v is not None for v in r.distractors[lv]) for r in rows],
        }
        for j, col in enumerate(neg_cols):
            table[col] = [r.distractors[lv][j] for r in rows]
        write_image_table(table, neg_cols, out / "distractors" / lv)
    from .data import split_by_identity

    splits = split_by_identity(list(range(config.num_identities)), range(config.num_identities), seed=config.seed,
                               val_fraction=config.val_fraction, test_fraction=config.test_fraction)
    for folder in (out, out / "splits"):
        remove_stale_temporaries(folder)
    for name, indices in splits.items():
        write_json_atomic(out / "splits" / f"{name}.json", {"indices": indices, "seed": config.seed, "split": name})
    meta = asdict(config)
    meta["levels"] = list(config.levels)
    meta["seconds"] = round(time.perf_counter() - start, 3)
    write_json_atomic(out / "synthetic_config.json", meta)
    logger.info("wrote %d synthetic identities to %s in %.1f s", config.num_identities, out, meta["seconds"])
    return out


def generate_synthetic_mtg(
    output_dir: str | os.PathLike[str], *, num_pairs: int = 16, image_size: int = 64, seed: int = 0,
    supersample: int = 3,
) -> Path:
    """Write MTG-style part-edit pairs from the synthetic world (one parquet table, the MTG columns).

    Each row holds two original views of one object (``image_1_original``, ``image_2_original``), their part-edited
    versions on the same backgrounds (``image_1_inpainted``, ``image_2_inpainted``: the "part" level distractor),
    the object masks of the originals and the edit masks (pixels whose coverage changed), so the MTG oracle
    ``1 - |part| / |object|`` is defined.
    """
    out = Path(output_dir)
    cols: dict[str, list[Any]] = {c: [] for c in (
        "image_1_original", "image_2_original", "image_1_inpainted", "image_2_inpainted", "image_1_object_mask",
        "image_2_object_mask", "image_1_part_mask", "image_2_part_mask")}
    for i in range(num_pairs):
        obj = sample_object(np.random.default_rng([seed, i, 11]))
        edited = make_distractor(obj, "part", np.random.default_rng([seed, i, 12]))
        for k in (1, 2):
            ctx = sample_context(np.random.default_rng([seed, i, 13, k]))
            bg = background(ctx, image_size * supersample)
            img, body, part = render(obj, ctx, image_size, supersample=supersample, bg=bg, masks=True)
            img_e, body_e, part_e = render(edited, ctx, image_size, supersample=supersample, bg=bg, masks=True)
            obj_mask = (body + part) > 0.5
            edit_mask = (np.abs(body - body_e) + np.abs(part - part_e)) > 0.5
            cols[f"image_{k}_original"].append(png_bytes(img))
            cols[f"image_{k}_inpainted"].append(png_bytes(img_e))
            cols[f"image_{k}_object_mask"].append(png_bytes(obj_mask.astype(np.uint8) * 255))
            cols[f"image_{k}_part_mask"].append(png_bytes(edit_mask.astype(np.uint8) * 255))
    write_image_table(cols, list(cols), out)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nearid-make-synthetic",
        description="Write a procedural NearID dataset (positives + one distractor table per difficulty level).",
    )
    parser.add_argument("--output_dir", required=True, help="destination folder")
    parser.add_argument("--num_identities", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--views", type=int, default=3)
    parser.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val_fraction", type=float, default=0.1)
    parser.add_argument("--test_fraction", type=float, default=0.1)
    parser.add_argument("--view_prefix", choices=["img", "images"], default="img")
    parser.add_argument("--supersample", type=int, default=3)
    parser.add_argument("--missing_view_rate", type=float, default=0.0)
    add_debug_flag(parser)
    return parser


@entry_point("nearid-make-synthetic")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = SyntheticConfig(
        num_identities=args.num_identities, image_size=args.image_size, views=args.views,
        levels=tuple(args.levels), seed=args.seed, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, view_prefix=args.view_prefix, supersample=args.supersample,
        missing_view_rate=args.missing_view_rate,
    )
    out = generate_synthetic(args.output_dir, config)
    print(f"wrote {config.num_identities} identities ({', '.join(config.levels)}) to {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
