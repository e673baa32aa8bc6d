"""Plots of the demo report (matplotlib, Agg backend). Each function writes a PNG and returns its path relative to
the report folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"{path.parent.name}/{path.name}"


def plot_metrics(head: dict[str, Any], path: Path) -> str:
    """Grouped bars: SSR and PA per level, frozen backbone vs trained head."""
    levels = [*head["levels"], "pooled"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
    width = 0.38
    x = np.arange(len(levels))
    for ax, metric in zip(axes, ("ssr", "pa")):
        for k, (name, label, colour) in enumerate((("frozen", "frozen backbone", "#9e9e9e"),
                                                   ("trained", "trained NearID head", "#1f77b4"))):
            values = [head["metrics"][name][lv][metric] for lv in levels]
            bars = ax.bar(x + (k - 0.5) * width, values, width, label=label, color=colour)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(x, levels)
        ax.set_title(metric.upper() + " on held-out identities (%)")
        ax.set_ylim(0, 105)
    axes[0].legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def _pca(points: np.ndarray) -> np.ndarray:
    centred = points - points.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def plot_projection(npz: Path, path: Path) -> str:
    """PCA of views (dots) and their near-identity distractors (crosses), one colour per identity."""
    data = np.load(npz)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.8))
    cmap = plt.get_cmap("tab10")
    for ax, name, title in zip(axes, ("frozen", "trained"), ("frozen backbone (own head)", "trained NearID head")):
        views, fakes = data[f"{name}_views"], data[f"{name}_fakes"]  # [N, V, E]
        n, v, e = views.shape
        flat = _pca(np.concatenate([views.reshape(-1, e), fakes.reshape(-1, e)]))
        pv, pf = flat[: n * v].reshape(n, v, 2), flat[n * v :].reshape(n, fakes.shape[1], 2)
        for i in range(n):
            ax.scatter(pv[i, :, 0], pv[i, :, 1], color=cmap(i % 10), marker="o", s=28)
            ax.scatter(pf[i, :, 0], pf[i, :, 1], color=cmap(i % 10), marker="x", s=28)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].scatter([], [], color="black", marker="o", label="views of an identity")
    axes[0].scatter([], [], color="black", marker="x", label="its near-identity distractors")
    axes[0].legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_truth(world: dict[str, Any], selected_step: int | None, path: Path) -> str:
    """NearID identity and the oracle's true identity against DreamBooth step, with the picks of each method."""
    rows = world["checkpoints"]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.8, 3.6))
    ax.plot(steps, [r["truth"] for r in rows], "o-", color="black", label="true identity (oracle)")
    ax.axhline(world["base"]["truth"], color="black", ls=":", lw=1, label="base model, true identity")
    best = max(rows, key=lambda r: r["truth"])
    ax.plot([best["step"]], [best["truth"]], "D", ms=11, mfc="none", color="black", label="oracle-best checkpoint")
    if selected_step is not None:
        pick = next(r for r in rows if r["step"] == selected_step)
        ax.plot([pick["step"]], [pick["truth"]], "*", ms=15, color="red", label=f"NearID pick (step {selected_step})")
    ax.set_xlabel("DreamBooth step")
    ax.set_ylabel("true identity (fraction of attributes)")
    ax.set_ylim(-0.02, 1.02)
    twin = ax.twinx()
    for kind, colour, label in (("nearid", "#d62728", "NearID score"), ("frozen", "#1f77b4", "frozen head score"),
                                ("meanpool", "#2ca02c", "mean-pool score")):
        twin.plot(steps, [r[kind] for r in rows], ".--", color=colour, alpha=0.8, label=label)
    twin.set_ylabel("cosine to the subject's views")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=6.5, loc="lower right")
    return _save(fig, path)


def plot_samples(panels: list[tuple[str, Path]], path: Path) -> str:
    """Image panels side by side, each with its title (subject views, base, selected, reward-tuned...)."""
    from PIL import Image

    fig, axes = plt.subplots(1, len(panels), figsize=(2.3 * len(panels), 2.9))
    for ax, (title, image) in zip(np.atleast_1d(axes), panels):
        ax.imshow(np.asarray(Image.open(image).convert("RGB")), interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    return _save(fig, path)
