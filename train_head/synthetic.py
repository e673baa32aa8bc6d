"""``nearid-make-synthetic``: a procedural NearID world written in the NearID dataset schema.

Identities are objects with a shape (and aspect), two colours in a pattern, a fine texture and an attached part of a
third colour. Each identity is shown in several views (its own busy background, position, scale, slight rotation
and lighting). For every view and every difficulty level there is a near-identity distractor: a similar but
different object placed on exactly the same background, at the same place, scale, rotation and lighting. The
levels differ in what the distractor changes:

* ``colour``: the primary colour's hue (everything else identical);
* ``pattern``: the colour pattern (same colours, shape and part);
* ``part``: the attached part (type or side) or a shape detail (a neighbouring shape).

The scenes are drawn by :mod:`train_head.synthetic_scenes` (numpy, encoded with PIL); the output is deterministic
for a given seed. It is written as a positives table (``id``, ``img1..3`` or ``images1..3``) and one
distractor table per level (``id``, ``nimg1..3``) as parquet files with ``datasets`` image features, plus seeded
held-out splits by identity, so the trainer and ``nearid-eval`` read it like the real NearID data.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nearid_reward.cli.arguments import parse_arguments
from nearid_reward.cli.entry_points import entry_point
from nearid_reward.files import atomic_write, remove_stale_temporaries, write_json_atomic

from .synthetic_scenes import (
    LEVELS,
    PARTS,
    PATTERNS,
    SHAPES,
    SynthContext,
    SynthObject,
    background,
    make_distractor,
    png_bytes,
    render,
    sample_context,
    sample_object,
)

logger = logging.getLogger(__name__)

__all__ = [
    "LEVELS",
    "SHAPES",
    "PATTERNS",
    "PARTS",
    "SynthObject",
    "SynthContext",
    "SyntheticConfig",
    "MakeSyntheticOptions",
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

PROG = "nearid-make-synthetic"


@dataclass
class SyntheticConfig:
    """Options of :func:`generate_synthetic`; also the declaration of the ``nearid-make-synthetic`` flags of the same
    names (each field's help is in its metadata). ``levels`` may be given as any sequence; it is kept as a list.
    """

    num_identities: int = field(default=64, metadata={"help": "number of identities (rows)"})
    image_size: int = field(default=64, metadata={"help": "square image size in pixels (>= 16)"})
    views: int = field(default=3, metadata={"help": "views per identity (1..3; the NearID schema has three)"})
    levels: list[str] = field(default_factory=lambda: list(LEVELS), metadata={
        "help": "distractor levels written, each as its own distractor table", "choices": LEVELS})
    seed: int = field(default=0, metadata={"help": "everything is derived from it"})
    val_fraction: float = field(default=0.1, metadata={"help": "held-out identities for validation (index file)"})
    test_fraction: float = field(default=0.1, metadata={"help": "held-out identities for test (index file)"})
    view_prefix: Literal["img", "images"] = field(default="img", metadata={
        "help": "view column prefix: img (dataset-card naming) or images (official-code naming)"})
    supersample: int = field(default=3, metadata={"help": "rendering supersampling factor (anti-aliasing)"})
    missing_view_rate: float = field(default=0.0, metadata={
        "help": "fraction of identities whose last view is left empty (exercises the masks)"})

    def __post_init__(self) -> None:
        self.levels = list(self.levels)
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
    from .data.splits import split_by_identity  # not at import time: the package reads tables with torch

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


@dataclass
class MakeSyntheticOptions:
    """The ``nearid-make-synthetic`` flags beside :class:`SyntheticConfig`'s."""

    output_dir: str = field(metadata={"help": "destination folder"})


@entry_point(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    options, config = parse_arguments(
        [MakeSyntheticOptions, SyntheticConfig], argv, prog=PROG,
        description="Write a procedural NearID dataset (positives + one distractor table per difficulty level).",
    )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = generate_synthetic(options.output_dir, config)
    print(f"wrote {config.num_identities} identities ({', '.join(config.levels)}) to {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
