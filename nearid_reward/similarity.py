"""Stateless similarity maths on L2-normalised embeddings (pure functions on tensors)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["Aggregate", "cosine_matrix", "reference_scores", "leave_one_out_oracle"]

Aggregate = Literal["mean", "max", "centroid"]


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[N, M]`` between rows of ``a`` ``[N, D]`` and ``b`` ``[M, D]`` (re-normalised)."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def reference_scores(
    embeddings: torch.Tensor, references: torch.Tensor, aggregate: Aggregate = "mean"
) -> torch.Tensor:
    """Identity score of each embedding against a reference set, in [-1, 1] (higher = closer to the subject).

    Args:
        embeddings: ``[B, D]`` query embeddings.
        references: ``[R, D]`` reference embeddings (R >= 1).
        aggregate: ``"mean"`` (mean cosine to the references), ``"max"`` (cosine to the nearest reference) or
            ``"centroid"`` (cosine to the normalised mean reference).

    Returns:
        ``[B]`` scores.

    Example:
        >>> refs = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
        >>> reference_scores(torch.tensor([[1.0, 0.0]]), refs, "mean")
        tensor([0.5000])
    """
    if references.ndim != 2 or references.shape[0] == 0:
        raise ValueError(f"`references` must be a non-empty [R, D] tensor, got shape {tuple(references.shape)}")
    if embeddings.ndim != 2 or embeddings.shape[1] != references.shape[1]:
        raise ValueError(
            f"`embeddings` must be [B, {references.shape[1]}] to match the references, got {tuple(embeddings.shape)}"
        )
    if aggregate == "centroid":
        centroid = F.normalize(F.normalize(references, dim=-1).mean(0, keepdim=True), dim=-1)  # [1, D]
        return cosine_matrix(embeddings, centroid)[:, 0]
    sims = cosine_matrix(embeddings, references)  # [B, R]
    if aggregate == "mean":
        return sims.mean(dim=1)
    if aggregate == "max":
        return sims.max(dim=1).values
    raise ValueError(f"aggregate must be 'mean', 'max' or 'centroid', got {aggregate!r}")


def leave_one_out_oracle(references: torch.Tensor, aggregate: Aggregate = "mean") -> torch.Tensor:
    """Score of each reference against the *other* references (``[R]``), the "real photo of the subject" level.

    Its mean is the reference oracle: what a perfect generation of the subject would score. Needs R >= 2.
    """
    r = references.shape[0]
    if r < 2:
        raise ValueError(f"the leave-one-out oracle needs at least 2 references, got {r}")
    scores = [
        reference_scores(references[i : i + 1], torch.cat([references[:i], references[i + 1 :]]), aggregate)
        for i in range(r)
    ]
    return torch.cat(scores)
