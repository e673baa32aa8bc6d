"""Result tables and pictures of identity scoring: the checkpoint-selection result, its CSV and text table, the
validation summary of a training run, their plots, and captioned image grids.

matplotlib is optional (the ``plot`` extra: ``pip install "nearid-reward[plot]"``). Without it the plots are
skipped with a logged message and every table is still written.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .files import atomic_write
from .images import check_value_range

logger = logging.getLogger(__name__)

__all__ = [
    "SelectionResult",
    "SUMMARY_COLUMNS",
    "selection_csv",
    "format_table",
    "plot_selection",
    "summary_markdown",
    "plot_identity_history",
    "image_grid",
    "log_scored_images",
    "to_uint8_images",
]

TABLE_COLUMNS = ("identity_mean", "relative_mean", "identity_gain", "class_leakage_mean", "copy_fraction")
SUMMARY_COLUMNS = ("identity_mean", "relative_mean", "base_identity_mean", "identity_gain", "class_leakage_mean",
                   "copy_fraction", "script/identity_mean")  # fmt: skip
"""Metric names shown by :func:`summary_markdown` (each only when some validation has it)."""

_CSV_FIRST = ("rank", "name", "step", "kind")
_CSV_LAST = ("time_load_s", "time_render_s", "time_score_s", "cached", "hash")


@dataclass
class SelectionResult:
    """Outcome of a checkpoint selection (identical on every process).

    Attributes:
        rows: one dict per checkpoint, best first (``rank`` 1 is the winner): name, step, kind, hash, cached,
            metrics by name (e.g. ``identity_mean``), ``identity_gain`` when the base model was rendered, and
            ``time_load_s`` / ``time_render_s`` / ``time_score_s`` (0 for cached rows).
        base: metrics of the base model (adapter-free pipeline), or None.
        monitor, mode: the metric that ranked the rows and whether higher (``"max"``) or lower won.
        reference_oracle: mean leave-one-out reference score (None with one reference); ``reference_oracle_std``
            its standard deviation over references.
        files: written files by role (``json``, ``csv``, ``png``, ``winner``); empty on non-main processes.
    """

    rows: list[dict[str, Any]]
    base: dict[str, Any] | None
    monitor: str
    mode: str
    reference_oracle: float | None
    reference_oracle_std: float | None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def winner(self) -> dict[str, Any] | None:
        return self.rows[0] if self.rows else None


# ---------------------------------------------------------------------------------------------- the one guard
def _figure_class(purpose: str) -> type | None:
    """matplotlib's ``Figure`` class, or None (logged) when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning('matplotlib is not installed: no %s (pip install "nearid-reward[plot]")', purpose)
        return None
    return Figure


def _save_png(fig: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")  # the Agg canvas, without pyplot's global state
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())
    return path


# ---------------------------------------------------------------------------------------------- selection
def selection_csv(rows: Sequence[dict[str, Any]]) -> str:
    """CSV text of selection rows: rank, name, step, kind, every float metric (sorted), then timings and cache."""
    metric_keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, float) and k not in _CSV_LAST})
    columns = [*_CSV_FIRST, *metric_keys, *_CSV_LAST]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{row[k]:.6g}" if isinstance(row.get(k), float) else row.get(k, "")) for k in columns})
    return buffer.getvalue()


def format_table(result: SelectionResult) -> str:
    """A plain-text ranked table of the result (what ``nearid-select`` prints)."""
    keys = [k for k in TABLE_COLUMNS if any(k in r for r in result.rows)]
    if result.monitor not in keys:
        keys.insert(0, result.monitor)
    width = max([len("checkpoint"), *(len(r["name"]) for r in result.rows)])
    header = f"{'rank':>4}  {'checkpoint':<{width}}  {'step':>7}  " + "  ".join(f"{k:>18}" for k in keys)
    lines = [header, "-" * len(header)]
    for r in result.rows:
        values = "  ".join(f"{r[k]:>18.4f}" if isinstance(r.get(k), float) else f"{'-':>18}" for k in keys)
        lines.append(f"{r['rank']:>4}  {r['name']:<{width}}  {r['step']:>7}  {values}")
    if result.base is not None and "identity_mean" in result.base:
        lines.append(f"base model identity_mean: {result.base['identity_mean']:.4f}")
    if result.reference_oracle is not None:
        lines.append(f"reference oracle: {result.reference_oracle:.4f} +- {result.reference_oracle_std:.4f}")
    if result.winner is not None:
        lines.append(f"winner: {result.winner['name']} ({result.monitor}={result.winner[result.monitor]:.4f})")
    return "\n".join(lines)


def plot_selection(result: SelectionResult, path: str | os.PathLike[str]) -> Path | None:
    """Identity score per checkpoint step, the base-model line, the reference-oracle band and the winner.

    Returns the written PNG, or None without rows or without matplotlib (logged).
    """
    if not result.rows:
        return None
    figure = _figure_class(f"selection plot {path}")
    if figure is None:
        return None
    rows = sorted(result.rows, key=lambda r: r["step"])
    fig = figure(figsize=(7, 4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if result.reference_oracle is not None:
        lo = result.reference_oracle - (result.reference_oracle_std or 0.0)
        hi = result.reference_oracle + (result.reference_oracle_std or 0.0)
        ax.axhspan(lo, hi, color="tab:green", alpha=0.15, label="reference oracle (mean +- std)")
        ax.axhline(result.reference_oracle, color="tab:green", linewidth=1)
    if result.base is not None and "identity_mean" in result.base:
        ax.axhline(result.base["identity_mean"], color="tab:gray", linestyle="--", label="base model")
    ax.plot([r["step"] for r in rows], [r["identity_mean"] for r in rows], marker="o", color="tab:blue",
            label="identity_mean")  # fmt: skip
    if result.winner is not None and "identity_mean" in result.winner:
        ax.plot([result.winner["step"]], [result.winner["identity_mean"]], marker="*", markersize=14,
                color="tab:red", linestyle="none", label=f"winner ({result.winner['name']})")
    ax.set_xlabel("training step")
    ax.set_ylabel("NearID identity score (cosine)")
    ax.set_title(f"identity by checkpoint (ranked by {result.monitor}, {result.mode})")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return _save_png(fig, Path(path))


# ---------------------------------------------------------------------------------------------- training runs
def summary_markdown(
    records: Sequence[dict[str, Any]],
    *,
    prefix: str,
    title: str,
    best_step: int | None,
    best_value: float | None,
    monitor_key: str,
) -> str:
    """A Markdown table of a validation history: one row per validation, a column per :data:`SUMMARY_COLUMNS` name.

    Args:
        records: history lines as logged (keys ``prefix + name``, plus ``step`` and ``is_best``).
        prefix: the logging prefix of the records (e.g. ``"nearid/"``).
        title: the heading.
        best_step, best_value, monitor_key: the best validation, as the validator tracked it.
    """
    keys = [k for k in SUMMARY_COLUMNS if any(prefix + k in r for r in records)]
    lines = [f"# {title}", "", f"Best step: **{best_step}** ({monitor_key} = {best_value})", "",
             "| step | " + " | ".join(keys) + " | best so far |", "|---|" + "---|" * (len(keys) + 1)]  # fmt: skip
    for r in records:
        cells = [f"{r[prefix + k]:.4f}" if isinstance(r.get(prefix + k), (int, float)) else "" for k in keys]
        lines.append(f"| {r.get('step')} | " + " | ".join(cells) + f" | {'yes' if r.get('is_best') else ''} |")
    return "\n".join(lines) + "\n"


def plot_identity_history(
    records: Sequence[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    prefix: str,
    oracle: float | None = None,
    best_step: int | None = None,
) -> Path | None:
    """Identity score (and the base model's) against the global step of a validation history.

    Returns the written PNG, or None without identity scores or without matplotlib (logged).
    """
    points = sorted((r["step"], r[prefix + "identity_mean"]) for r in records if prefix + "identity_mean" in r)
    if not points:
        return None
    figure = _figure_class(f"identity plot {path}")
    if figure is None:
        return None
    fig = figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    steps, values = zip(*points)
    ax.plot(steps, values, "o-", label="identity (adapter)")
    base = sorted((r["step"], r[prefix + "base_identity_mean"]) for r in records if prefix + "base_identity_mean" in r)
    if base:
        base_steps, base_values = zip(*base)
        ax.plot(base_steps, base_values, "--", color="grey", label="base model")
    if oracle is not None and oracle == oracle:  # not NaN
        ax.axhline(oracle, color="green", alpha=0.4, label="reference oracle")
    if best_step is not None:
        ax.axvline(best_step, color="red", alpha=0.5, label=f"best step {best_step}")
    ax.set_xlabel("global step")
    ax.set_ylabel("NearID identity (cosine)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save_png(fig, Path(path))


def image_grid(
    images: torch.Tensor,
    captions: Sequence[str] | None = None,
    *,
    value_range: tuple[float, float] = (0.0, 1.0),
    cols: int | None = None,
) -> np.ndarray:
    """Tile ``images`` ``[N, 3, H, W]`` into one uint8 ``[rows*H, cols*W, 3]`` array, captions drawn on the tiles.

    ``cols`` defaults to ``ceil(sqrt(N))``; rows fill left to right.
    """
    from PIL import Image, ImageDraw

    arr = to_uint8_images(images, value_range)
    n, h, w = arr.shape[:3]
    if cols is None:
        cols = int(math.ceil(math.sqrt(n)))
    elif cols < 1:
        raise ValueError(f"`cols` must be >= 1, got {cols}")
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i in range(n):
        tile = arr[i]
        if captions is not None and i < len(captions):
            pil = Image.fromarray(tile)
            draw = ImageDraw.Draw(pil)
            draw.rectangle((0, 0, w, 11), fill=(0, 0, 0))
            draw.text((1, 0), captions[i], fill=(255, 255, 255))
            tile = np.asarray(pil)
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = tile
    return grid


def to_uint8_images(images: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Images ``[N, 3, H, W]`` with values in ``value_range`` as a uint8 array ``[N, H, W, 3]`` (clipped, rounded)."""
    lo, hi = check_value_range(value_range)
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def log_scored_images(
    accelerator: Any,
    images: torch.Tensor,
    scores: Sequence[float],
    prompts: Sequence[str] | None,
    *,
    step: int,
    tag: str,
    value_range: tuple[float, float] = (0.0, 1.0),
    max_images: int = 16,
) -> None:
    """Log the first ``max_images`` of ``images`` ``[N, 3, H, W]`` with their identity ``scores`` to the
    accelerator's TensorBoard (one captioned grid, and the captions as text) and Weights & Biases trackers.

    Other trackers are skipped; a tracker's failure is logged and never raised (logging must not stop training).
    """
    names = ("tensorboard", "wandb")
    trackers = [t for t in getattr(accelerator, "trackers", []) if getattr(t, "name", None) in names]
    if not trackers:
        return
    n = min(images.shape[0], max_images, len(scores))
    scores = list(scores[:n])
    captions = [f"{i}: {s:.3f}" + (f" | {prompts[i]}" if prompts is not None else "") for i, s in enumerate(scores)]
    for tracker in trackers:
        try:
            if tracker.name == "tensorboard":
                grid = image_grid(images[:n], [f"{s:.3f}" for s in scores], value_range=value_range)
                tracker.log_images({tag: grid[None]}, step=step, dataformats="NHWC")
                tracker.log({tag + "_captions": "\n\n".join(captions)}, step=step)
            else:
                import wandb

                arrays = to_uint8_images(images[:n], value_range)
                tracker.log({tag: [wandb.Image(a, caption=c) for a, c in zip(arrays, captions)]}, step=step)
        except Exception:  # a tracker problem must never stop validation
            logger.exception("could not log validation images to the %s tracker", tracker.name)
