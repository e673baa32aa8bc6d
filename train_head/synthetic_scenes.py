"""The procedural world of the synthetic NearID benchmark: object identities, view contexts, near-identity
distractors at three levels, and their rendering with numpy (analytic masks, supersampled and box-filtered).

Identities are objects with a shape (and aspect), two colours in a pattern, a fine texture and an attached part of a
third colour. Each view has its own busy background, position, scale, slight rotation and lighting. A distractor is
a similar but different object drawn on exactly the same background, at the same place, scale, rotation and
lighting; the levels differ in what it changes:

* ``colour``: the primary colour's hue (everything else identical);
* ``pattern``: the colour pattern (same colours, shape and part);
* ``part``: the attached part (type or side) or a shape detail (a neighbouring shape).

Everything is deterministic for the generators passed in. :mod:`train_head.synthetic` writes datasets from it.
"""

from __future__ import annotations

import colorsys
import io
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "LEVELS",
    "SHAPES",
    "PATTERNS",
    "PARTS",
    "SIDES",
    "SynthObject",
    "SynthContext",
    "sample_object",
    "sample_context",
    "make_distractor",
    "background",
    "render",
    "png_bytes",
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
