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


def plot_selection(history: list[dict[str, Any]], selection: dict[str, Any], path: Path) -> str:
    """Identity against step during DreamBooth, with the base model and nearid-select's ranking of checkpoints."""
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    val = sorted((r["step"], r["nearid/identity_mean"]) for r in history if r.get("source") == "checkpoint")
    if val:
        ax.plot(*zip(*val), "o-", label="validation at each checkpoint (adapter)")
    base = [r.get("nearid/base_identity_mean") for r in history if r.get("nearid/base_identity_mean") is not None]
    if base:
        ax.axhline(float(np.mean(base)), color="grey", ls="--", label="base model (adapter off)")
    rows = [r for r in selection.get("checkpoints", []) if r.get("step") is not None]
    if rows:
        pts = sorted((r["step"], r["identity_mean"]) for r in rows)
        ax.plot(*zip(*pts), "s", color="#ff7f0e", mfc="none", label="nearid-select (re-rendered)")
        winner = next((r for r in rows if r["name"] == selection.get("winner")), None)
        if winner is not None:
            ax.plot([winner["step"]], [winner["identity_mean"]], "*", color="red", ms=14,
                    label=f"selected: {winner['name']}")
    oracle = selection.get("reference_oracle")
    if oracle is not None:
        spread = selection.get("reference_oracle_std") or 0.0
        ax.axhspan(oracle - spread, oracle + spread, color="green", alpha=0.12, label="reference oracle")
    ax.set_xlabel("training step")
    ax.set_ylabel("NearID identity (cosine)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_reward(rewards: list[float], path: Path) -> str:
    fig, ax = plt.subplots(figsize=(6.5, 3.0))
    steps = np.arange(1, len(rewards) + 1)
    ax.plot(steps, rewards, ".", alpha=0.5, label="batch mean reward")
    if len(rewards) >= 5:
        kernel = np.ones(5) / 5
        ax.plot(steps[4:], np.convolve(rewards, kernel, mode="valid"), "-", label="moving average (5)")
    ax.set_xlabel("optimisation step")
    ax.set_ylabel("identity reward")
    ax.legend(fontsize=7)
    return _save(fig, path)
