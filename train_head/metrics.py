"""NearID evaluation metrics as plain functions: SSR and PA on the NearID benchmark (spec §5.2), their micro-average
over inpainting settings, and the MTG part-edit metrics M-O, M-Opair, SSR and PA (spec §5.3).

All rates are percentages (0-100, higher is better); counts are returned too so that results can be pooled exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "nearid_margins",
    "nearid_metrics",
    "pool_metrics",
    "similarity_profile",
    "mtg_oracle",
    "fisher_z_mean",
    "pearson",
    "mtg_metrics",
    "COUNT_KEYS",
]

# The counts behind the NearID rates; pooling sums them.
COUNT_KEYS = ("n_samples", "ssr_wins", "mean_wins", "pair_wins", "pair_trials")


def _as_array(x: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(x, dtype=np.float64)
    return arr


def _as_mask(mask: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask).astype(bool)
    if arr.shape != shape:
        raise ValueError(f"`{name}` must have shape {list(shape)}, got {list(arr.shape)}")
    return arr


def _normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _views_and_distractors(
    pos: Any, neg: Any, pos_mask: Any, neg_mask: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Checked, L2-normalised ``pos``/``neg`` ``[N, V, D]`` arrays and their ``[N, V]`` boolean masks."""
    p = _as_array(pos, "pos")
    n = _as_array(neg, "neg")
    if p.ndim != 3:
        raise ValueError(f"`pos` must be [N, V, D], got shape {list(p.shape)}")
    if n.shape != p.shape:
        raise ValueError(f"`neg` must have the shape of `pos` {list(p.shape)}, got {list(n.shape)}")
    pm = _as_mask(pos_mask, p.shape[:2], "pos_mask")
    nm = _as_mask(neg_mask, p.shape[:2], "neg_mask")
    return _normalise(p), _normalise(n), pm, nm


def nearid_margins(
    pos: torch.Tensor | np.ndarray,
    neg: torch.Tensor | np.ndarray,
    pos_mask: Any = None,
    neg_mask: Any = None,
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """The directed cross-view margins of every sample.

    For every pair of views ``i < j`` there are two terms: ``m_ij|i = cos(P_i, P_j) - cos(P_i, N_i)`` (anchor ``i``
    against its own same-background distractor) and ``m_ij|j = cos(P_i, P_j) - cos(P_j, N_j)``.

    Args:
        pos: ``[N, V, D]`` embeddings of the V views of N identities.
        neg: ``[N, V, D]`` embeddings of the distractors; ``neg[:, i]`` shares the background of ``pos[:, i]``.
        pos_mask, neg_mask: ``[N, V]`` validity (default all valid).

    Returns:
        ``(margins [N, T], terms)``: ``T = V * (V - 1)`` margins (NaN where a view or the anchor's distractor is
        missing) and, per column, ``(i, j, anchor)``.
    """
    p, n, pm, nm = _views_and_distractors(pos, neg, pos_mask, neg_mask)
    views = p.shape[1]
    terms: list[tuple[int, int, int]] = []
    cols: list[np.ndarray] = []
    cross = np.einsum("nvd,nvd->nv", p, n)  # [N, V] cos(P_i, N_i)
    for i in range(views):
        for j in range(i + 1, views):
            sim = np.einsum("nd,nd->n", p[:, i], p[:, j])  # [N]
            for anchor in (i, j):
                valid = pm[:, i] & pm[:, j] & nm[:, anchor]
                cols.append(np.where(valid, sim - cross[:, anchor], np.nan))
                terms.append((i, j, anchor))
    margins = np.stack(cols, axis=1) if cols else np.zeros((p.shape[0], 0))
    return margins, terms


def _rates(counts: Mapping[str, float]) -> dict[str, float]:
    n = counts["n_samples"]
    trials = counts["pair_trials"]

    def pct(num: float, den: float) -> float:
        return 100.0 * num / den if den > 0 else float("nan")

    ssr = pct(counts["ssr_wins"], n)
    pa = pct(counts["pair_wins"] + counts["mean_wins"], trials + n)
    out = {
        "ssr": ssr,
        "pa": pa,
        "pa_pairwise": pct(counts["pair_wins"], trials),
        "ssr_mean": pct(counts["mean_wins"], n),
        "pa_trials": float(trials + n),
        "hm": 2 * ssr * pa / (ssr + pa) if ssr + pa > 0 else float("nan"),
    }
    out.update({k: float(counts[k]) for k in COUNT_KEYS})
    return out


def nearid_metrics(
    pos: torch.Tensor | np.ndarray,
    neg: torch.Tensor | np.ndarray,
    pos_mask: Any = None,
    neg_mask: Any = None,
) -> dict[str, float]:
    """SSR and PA on NearID-style data (identity views vs same-background near-identity distractors).

    Per sample, every directed cross-view margin (see :func:`nearid_margins`) is a trial, won when strictly > 0.

    * ``ssr``: % of samples whose valid margins *all* win (the paper's SSR, code "SSRm").
    * ``pa``: pairwise accuracy in the paper-table convention: each sample's mean-margin win counts as one more
      trial, i.e. ``(wins + mean_wins) / (trials + n_samples)`` (spec §5.2, the convention of the published tables).
    * ``pa_pairwise``: ``wins / trials`` over the pairwise margins only (the training-time convention).
    * ``ssr_mean``: % of samples whose mean margin is > 0. ``hm``: harmonic mean of ``ssr`` and ``pa``.
    * ``n_samples``: samples with at least one valid margin; ``pa_trials``; and the raw counts ``ssr_wins``,
      ``mean_wins``, ``pair_wins``, ``pair_trials`` used by :func:`pool_metrics`.

    Args:
        pos: ``[N, V, D]`` view embeddings (re-normalised here).
        neg: ``[N, V, D]`` distractor embeddings, slot-aligned with ``pos``.
        pos_mask, neg_mask: ``[N, V]`` validity.

    Returns:
        A flat dict of floats; rates in percent (NaN when there is no valid sample).

    Example:
        >>> pos = torch.tensor([[[1.0, 0.0], [1.0, 0.1]]])       # two views of one identity
        >>> neg = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])       # their distractors
        >>> nearid_metrics(pos, neg)["ssr"]
        100.0
    """
    margins, _ = nearid_margins(pos, neg, pos_mask, neg_mask)
    valid = ~np.isnan(margins)
    has = valid.any(axis=1)
    wins = (np.nan_to_num(margins, nan=0.0) > 0) & valid
    all_win = has & (wins.sum(1) == valid.sum(1))
    with np.errstate(invalid="ignore"):
        mean_margin = np.where(has, np.nansum(margins, axis=1) / np.maximum(valid.sum(1), 1), np.nan)
    counts = {
        "n_samples": float(has.sum()),
        "ssr_wins": float(all_win.sum()),
        "mean_wins": float((has & (np.nan_to_num(mean_margin, nan=0.0) > 0)).sum()),
        "pair_wins": float(wins.sum()),
        "pair_trials": float(valid.sum()),
    }
    return _rates(counts)


def similarity_profile(
    pos: torch.Tensor | np.ndarray,
    neg: torch.Tensor | np.ndarray,
    pos_mask: Any = None,
    neg_mask: Any = None,
) -> dict[str, float]:
    """Mean cosine similarities that show *where* a model puts the near-identity distractors.

    SSR compares the first two; the ranking tier of the NearID objective asks the distractors to sit above the
    other identities (the last one), so the four together show how a model trades the two off.

    * ``positive``: ``cos(P_i, P_j)``, other views of the same identity (``i != j``);
    * ``same_context_distractor``: ``cos(P_i, N_i)``, the distractor on the same background;
    * ``other_context_distractor``: ``cos(P_i, N_j)``, ``i != j``, the distractor of another view;
    * ``other_identity``: ``cos(P_i, Q_j)`` over the views of two different identities.

    Each is averaged over the valid pairs (NaN when there is none).

    Args:
        pos: ``[N, V, D]`` view embeddings (re-normalised here).
        neg: ``[N, V, D]`` distractor embeddings, slot-aligned with ``pos``.
        pos_mask, neg_mask: ``[N, V]`` validity.

    Returns:
        The four means, in [-1, 1].

    Example:
        >>> pos = np.array([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])
        >>> neg = np.array([[[0.6, 0.8], [0.6, 0.8]], [[0.8, 0.6], [0.8, 0.6]]])
        >>> profile = similarity_profile(pos, neg)
        >>> profile["positive"], round(profile["same_context_distractor"], 3), round(profile["other_identity"], 3)
        (1.0, 0.6, 0.0)
    """
    p, n, pm, nm = _views_and_distractors(pos, neg, pos_mask, neg_mask)
    views = p.shape[1]
    other_view = ~np.eye(views, dtype=bool)  # [V, V]
    pp = np.einsum("nid,njd->nij", p, p)  # [N, V, V]
    pn = np.einsum("nid,njd->nij", p, n)
    pair_pp = pm[:, :, None] & pm[:, None, :] & other_view
    pair_pn = pm[:, :, None] & nm[:, None, :]
    same = pair_pn & np.eye(views, dtype=bool)
    flat = p.reshape(-1, p.shape[-1])  # [N*V, D]
    owner = np.repeat(np.arange(p.shape[0]), views)
    ok = pm.reshape(-1)
    gram = flat @ flat.T  # [N*V, N*V]
    cross = ok[:, None] & ok[None, :] & (owner[:, None] != owner[None, :])

    def mean(values: np.ndarray, mask: np.ndarray) -> float:
        return float(values[mask].mean()) if mask.any() else float("nan")

    return {
        "positive": mean(pp, pair_pp),
        "same_context_distractor": mean(pn, same),
        "other_context_distractor": mean(pn, pair_pn & other_view),
        "other_identity": mean(gram, cross),
    }


def pool_metrics(results: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Micro-average NearID metrics over settings (samples and trials pooled, spec §5.2).

    Equivalent to the weighted means ``SSR = sum SSR_t n_t / sum n_t`` and ``PA = sum PA_t trials_t / sum trials_t``.

    Args:
        results: outputs of :func:`nearid_metrics` (they must carry the count keys).
    """
    if not results:
        raise ValueError("`results` is empty: pass at least one nearid_metrics() result")
    counts = {k: 0.0 for k in COUNT_KEYS}
    for i, res in enumerate(results):
        missing = [k for k in COUNT_KEYS if k not in res]
        if missing:
            raise ValueError(f"results[{i}] lacks the count keys {missing}; pass nearid_metrics() outputs")
        for k in COUNT_KEYS:
            counts[k] += float(res[k])
    return _rates(counts)


def mtg_oracle(object_mask: Any, part_mask: Any) -> float:
    """The MTG oracle similarity ``1 - |part| / |object|`` (pixels > 0); 0 when a mask is missing or empty."""
    if object_mask is None or part_mask is None:
        return 0.0
    obj = int((np.asarray(object_mask) > 0).sum())
    part = int((np.asarray(part_mask) > 0).sum())
    if obj == 0:
        return 0.0
    return 1.0 - part / obj


def pearson(x: Any, y: Any) -> float:
    """Pearson correlation over the pairs where both are finite; 0 when undefined (fewer than 2 pairs or constant)."""
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 2:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    if den == 0.0:
        return 0.0
    return float((a * b).sum() / den)


def fisher_z_mean(correlations: Sequence[float]) -> float:
    """``tanh(mean(atanh(clip(r, -0.999, 0.999))))``: the Fisher-z average of correlations."""
    if not correlations:
        raise ValueError("`correlations` is empty")
    z = np.arctanh(np.clip(np.asarray(correlations, dtype=np.float64), -0.999, 0.999))
    return float(np.tanh(z.mean()))


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("nd,nd->n", _normalise(a), _normalise(b))


def mtg_metrics(
    original1: torch.Tensor | np.ndarray,
    original2: torch.Tensor | np.ndarray,
    edited1: torch.Tensor | np.ndarray,
    edited2: torch.Tensor | np.ndarray,
    oracle1: Any,
    oracle2: Any,
) -> dict[str, float]:
    """MTG part-edit metrics (spec §5.3).

    Similarities: ``s12 = cos(I1, I2)``, ``s11' = cos(I1, I1')``, ``s22' = cos(I2, I2')``, ``s12' = cos(I1, I2')``,
    ``s21' = cos(I2, I1')``. A row with a NaN embedding gives NaN similarities (excluded).

    * ``m_o``: Fisher-z mean of the Pearson correlations r(s11', o1), r(s22', o2), r(s12', o2), r(s21', o1)
      ("M-O"); ``m_opair``: the same over the two same-background pairs r(s11', o1), r(s22', o2) ("M-Opair").
      Higher is better; an undefined correlation counts as 0.
    * ``ssr``: % of samples whose margins ``s12 - s11'`` and ``s12 - s22'`` are all > 0; ``pa``: % of won margins.

    Args:
        original1, original2: ``[N, D]`` embeddings of the two original views.
        edited1, edited2: ``[N, D]`` embeddings of their part-edited versions.
        oracle1, oracle2: ``[N]`` oracle similarities (see :func:`mtg_oracle`).

    Returns:
        Dict with ``m_o``, ``m_opair``, ``ssr``, ``pa``, ``n_samples``, ``pa_trials``, ``r1``..``r4``.
    """
    i1, i2, e1, e2 = (_as_array(t, name) for t, name in
                      ((original1, "original1"), (original2, "original2"), (edited1, "edited1"), (edited2, "edited2")))
    if i1.ndim != 2 or not (i1.shape == i2.shape == e1.shape == e2.shape):
        raise ValueError(
            "`original1`, `original2`, `edited1`, `edited2` must all be [N, D] of one shape, got "
            f"{[list(t.shape) for t in (i1, i2, e1, e2)]}"
        )
    o1 = np.asarray(oracle1, dtype=np.float64).reshape(-1)
    o2 = np.asarray(oracle2, dtype=np.float64).reshape(-1)
    if o1.shape[0] != i1.shape[0] or o2.shape[0] != i1.shape[0]:
        raise ValueError(
            f"`oracle1` and `oracle2` must have N={i1.shape[0]} values, got {o1.shape[0]} and {o2.shape[0]}"
        )
    s12, s11, s22 = _cos(i1, i2), _cos(i1, e1), _cos(i2, e2)
    s12e, s21e = _cos(i1, e2), _cos(i2, e1)
    r = [pearson(s11, o1), pearson(s22, o2), pearson(s12e, o2), pearson(s21e, o1)]
    margins = np.stack([s12 - s11, s12 - s22], axis=1)  # [N, 2]
    valid = np.isfinite(margins)
    has = valid.any(1)
    wins = (np.nan_to_num(margins, nan=0.0) > 0) & valid
    n = int(has.sum())
    trials = int(valid.sum())
    return {
        "m_o": fisher_z_mean(r),
        "m_opair": fisher_z_mean(r[:2]),
        "ssr": 100.0 * float((has & (wins.sum(1) == valid.sum(1))).sum()) / n if n else float("nan"),
        "pa": 100.0 * float(wins.sum()) / trials if trials else float("nan"),
        "n_samples": float(n),
        "pa_trials": float(trials),
        "r1": r[0],
        "r2": r[1],
        "r3": r[2],
        "r4": r[3],
    }
