"""The generation world: named object attributes, plain named contexts, prompts, and rendering.

The NearID head world (:mod:`train_head.synthetic`) draws objects with continuous attributes on busy backgrounds.
A tiny text-to-image model cannot learn that in CPU-hours, and a prompt cannot name a continuous hue. This world keeps
the same renderer and identity attributes but makes every attribute a word:

* ``shape`` (5), ``primary`` colour (6 hues), ``secondary`` colour (the pattern's second colour and the part's
  colour; 5 remaining hues), ``pattern`` (4) and ``part`` (4, always on top), 2400 identities in all;
* ``context``: one of 4 plain backgrounds (a two-colour gradient with soft blotches) named in the prompt.

A view varies the position, size, slight rotation, lighting and the exact shade of each colour (small jitter), so
that three views of one identity look like three photos of one object. An identity's *near-identity distractor*
changes exactly one attribute (:data:`NEAR_ATTRIBUTES`), and is drawn on the same background at the same place.

Prompts read ``"a red and blue striped star with a hat on the beach"``; any attribute may be left out (the noun is
then ``object``), which is what lets the model take DreamBooth prompts such as ``"a sks object on the snow"``.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from train_head.synthetic import SynthContext, SynthObject, background, render

__all__ = [
    "SHAPES",
    "COLOURS",
    "PATTERNS",
    "PARTS",
    "CONTEXTS",
    "ATTRIBUTES",
    "IDENTITY_ATTRIBUTES",
    "NEAR_ATTRIBUTES",
    "VOCABULARY",
    "CLASS_NOUN",
    "Identity",
    "all_identities",
    "held_out_identities",
    "sample_identity",
    "near_identity",
    "view_context",
    "render_view",
    "prompt_for",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# name -> hue in degrees; saturation/value are fixed per name (with a small per-view jitter)
COLOURS: dict[str, float] = {"red": 0.0, "yellow": 55.0, "green": 120.0, "cyan": 185.0, "blue": 235.0,
                             "magenta": 300.0}
# prompt word -> pattern of train_head.synthetic
PATTERNS: dict[str, str] = {"plain": "solid", "striped": "hstripes", "checkered": "checker", "halved": "halves"}
PARTS: tuple[str, ...] = ("hat", "ears", "ball", "antenna")
# name -> (top colour, bottom colour) of the gradient
CONTEXTS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "beach": ((0.42, 0.68, 0.95), (0.94, 0.80, 0.48)),
    "grass": ((0.45, 0.66, 0.32), (0.22, 0.42, 0.16)),
    "snow": ((0.80, 0.86, 0.93), (0.97, 0.97, 0.98)),
    "night": ((0.04, 0.04, 0.10), (0.16, 0.14, 0.32)),
}
IDENTITY_ATTRIBUTES: tuple[str, ...] = ("shape", "primary", "secondary", "pattern", "part")
ATTRIBUTES: tuple[str, ...] = (*IDENTITY_ATTRIBUTES, "context")
# What a near-identity distractor may change (one at a time): the attributes a look-alike shares all but one of.
NEAR_ATTRIBUTES: tuple[str, ...] = IDENTITY_ATTRIBUTES
CLASS_NOUN = "object"
INSTANCE_TOKEN = "sks"
VOCABULARY: tuple[str, ...] = (
    "a", "an", "and", "with", "on", "the", "photo", "of", CLASS_NOUN, INSTANCE_TOKEN,
    *SHAPES, *COLOURS, *PATTERNS, *PARTS, *CONTEXTS,
)  # fmt: skip


_CHOICES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "primary": tuple(COLOURS), "secondary": tuple(COLOURS), "pattern": tuple(PATTERNS),
    "part": PARTS, "context": tuple(CONTEXTS),
}


def choices(attribute: str) -> tuple[str, ...]:
    """The names an attribute takes (``"secondary"`` takes the colour names, like ``"primary"``)."""
    if attribute not in _CHOICES:
        raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
    return _CHOICES[attribute]


@dataclass(frozen=True)
class Identity:
    """One object identity of the generation world: every attribute is a name (see :func:`choices`)."""

    shape: str
    primary: str
    secondary: str
    pattern: str
    part: str

    def __post_init__(self) -> None:
        for name in IDENTITY_ATTRIBUTES:
            value = getattr(self, name)
            if value not in choices(name):
                raise ValueError(f"Identity.{name} must be one of {choices(name)}, got {value!r}")
        if self.primary == self.secondary:
            raise ValueError(f"Identity.secondary must differ from primary, got {self.secondary!r} for both")

    def attributes(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in IDENTITY_ATTRIBUTES}

    def describe(self) -> str:
        """The full prompt noun phrase, e.g. ``"red and blue striped star with a hat"``."""
        return f"{self.primary} and {self.secondary} {self.pattern} {self.shape} with a {self.part}"


def all_identities() -> list[Identity]:
    """Every identity of the world (2400), in a fixed order."""
    return [Identity(s, p, q, pt, pa) for s in SHAPES for p in COLOURS for q in COLOURS if q != p
            for pt in PATTERNS for pa in PARTS]


def held_out_identities(n: int = 48, seed: int = 1234) -> list[Identity]:
    """Identities the world model and the world's NearID head never see in training (benchmark subjects).

    The first ``n`` of a seeded permutation of :func:`all_identities`; the same ``seed`` always gives the same list,
    and a smaller ``n`` gives a prefix of a larger one.
    """
    everything = all_identities()
    order = np.random.default_rng(seed).permutation(len(everything))
    return [everything[i] for i in order[:n]]


def sample_identity(rng: np.random.Generator, exclude: Sequence[Identity] = ()) -> Identity:
    """A uniformly random identity not in ``exclude``."""
    banned = set(exclude)
    while True:
        primary, secondary = rng.choice(list(COLOURS), size=2, replace=False)
        ident = Identity(str(rng.choice(SHAPES)), str(primary), str(secondary), str(rng.choice(list(PATTERNS))),
                         str(rng.choice(PARTS)))
        if ident not in banned:
            return ident


def near_identity(ident: Identity, attribute: str, rng: np.random.Generator) -> Identity:
    """A look-alike of ``ident`` that differs in ``attribute`` only (colours never collide)."""
    if attribute not in NEAR_ATTRIBUTES:
        raise ValueError(f"attribute must be one of {NEAR_ATTRIBUTES}, got {attribute!r}")
    taken = {ident.primary, ident.secondary} if attribute in ("primary", "secondary") else {getattr(ident, attribute)}
    options = [v for v in choices(attribute) if v not in taken]
    return replace(ident, **{attribute: str(rng.choice(options))})


def _rgb(colour: str, rng: np.random.Generator | None) -> tuple[float, float, float]:
    hue, sat, val = COLOURS[colour] / 360.0, 0.85, 0.92
    if rng is not None:
        hue += rng.uniform(-6, 6) / 360.0
        sat += rng.uniform(-0.08, 0.08)
        val += rng.uniform(-0.06, 0.06)
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, min(sat, 1.0), min(val, 1.0))
    return (float(r), float(g), float(b))


def synth_object(ident: Identity, rng: np.random.Generator | None = None) -> SynthObject:
    """The :class:`train_head.synthetic.SynthObject` that draws ``ident`` (``rng`` jitters the shades)."""
    secondary = _rgb(ident.secondary, rng)
    return SynthObject(
        shape=ident.shape, aspect=1.0 if rng is None else float(rng.uniform(0.92, 1.08)),
        primary=_rgb(ident.primary, rng), secondary=secondary, part_colour=secondary, pattern=PATTERNS[ident.pattern],
        freq=2.0, texture_amp=0.0, texture_freq=6.0, texture_angle=0.0, part=ident.part, part_side="top",
    )  # fmt: skip


def view_context(context: str, rng: np.random.Generator) -> SynthContext:
    """A random view in the named context: placement near the centre, size, slight rotation and lighting."""
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {tuple(CONTEXTS)}, got {context!r}")
    top, bottom = CONTEXTS[context]
    return SynthContext(
        background_seed=int(rng.integers(0, 2**31 - 1)), bg_a=top, bg_b=bottom,
        bg_angle=math.pi / 2 + float(rng.uniform(-0.2, 0.2)), clutter=0,
        cx=float(rng.uniform(0.42, 0.58)), cy=float(rng.uniform(0.5, 0.62)), radius=float(rng.uniform(0.25, 0.3)),
        rotation=float(rng.uniform(-0.15, 0.15)), brightness=float(rng.uniform(0.92, 1.08)),
    )  # fmt: skip


def render_view(
    ident: Identity, context: str, rng: np.random.Generator, size: int = 32, *, supersample: int = 2,
    ctx: SynthContext | None = None,
) -> np.ndarray:
    """One view of ``ident`` in ``context``: uint8 ``[size, size, 3]``.

    Args:
        ident: the identity.
        context: a context name (:data:`CONTEXTS`).
        rng: draws the view (placement, lighting, colour shades).
        size: output size in pixels.
        supersample: anti-aliasing factor.
        ctx: reuse this placement instead of drawing one (a distractor on the same background at the same place).
    """
    ctx = view_context(context, rng) if ctx is None else ctx
    bg = background(ctx, size * supersample)
    return render(synth_object(ident, rng), ctx, size, supersample=supersample, bg=bg)


_PART_PHRASE = {"hat": ("a", "hat"), "ears": ("ears",), "ball": ("a", "ball"), "antenna": ("an", "antenna")}


def prompt_for(ident: Identity | None, context: str | None = None, *, keep: dict[str, bool] | None = None,
               token: str | None = None) -> str:
    """The prompt of a view: ``"a red and blue striped star with a hat on the beach"``.

    Args:
        ident: the identity (None: ``"a object"`` / ``"a sks object"``).
        context: the context name, or None to leave it out.
        keep: per identity attribute, whether to name it (default: all). The noun is ``object`` without the shape;
            the secondary colour is only named with the primary.
        token: an instance token placed before the noun (DreamBooth: ``"a sks object on the snow"``).
    """
    words = ["a"]
    if token:
        words.append(token)
    k = {name: True for name in IDENTITY_ATTRIBUTES} | (keep or {})
    if ident is not None:
        if k["primary"]:
            words.append(ident.primary)
            if k["secondary"]:
                words += ["and", ident.secondary]
        if k["pattern"]:
            words.append(ident.pattern)
        words.append(ident.shape if k["shape"] else CLASS_NOUN)
        if k["part"]:
            words += ["with", *_PART_PHRASE[ident.part]]
    else:
        words.append(CLASS_NOUN)
    if context is not None:
        words += ["on", "the", context]
    return " ".join(words)
