"""The two-tier NearID objective (multi-positive InfoNCE + distractor ranking regulariser) as plain functions.

Shapes: ``B`` anchors per process, ``P`` positive slots and ``K`` distractor slots per anchor, ``D`` embedding width,
``W`` processes. Embeddings need not be normalised (they are re-normalised here).

Differences from the official implementation (spec §8.2, items 5 and 7), all invisible when every mask is true:

* Invalid (padded) slots are excluded from **every** pool and denominator: padded positive slots of any sample are
  not batch negatives, invalid distractors are not in the Tier-1 softmax, and a Tier-2 row with no valid batch
  negative is dropped instead of comparing against a log-sum-exp of nothing.
* Tier 1 is the mean over all valid (anchor, positive) pairs; the official code averages per positive slot and
  then over slots, which weighs pairs unequally once masks differ between slots.
* Under ``torch.distributed`` the mean is taken over the *global* number of valid terms, so the average of the
  per-process losses (what DDP's gradient averaging optimises) equals the loss of the concatenated batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["LossTerms", "nearid_loss", "nearid_loss_terms", "infonce", "cohesion_loss", "gather_positive_pool"]

CohesionMode = Literal["prototype", "pairwise"]
_NORM_EPS = 1e-7


@dataclass
class LossTerms:
    """The parts of the NearID objective (all scalars; ``loss`` carries the gradient).

    Attributes:
        loss: ``discrimination + alpha * ranking + cohesion_weight * cohesion``; lower is better.
        discrimination: Tier 1, multi-positive InfoNCE of each anchor against the positive pool plus its own
            distractors.
        ranking: Tier 2, ``softplus(LSE(batch positives, own excluded) - distractor)`` averaged over valid
            distractors (0 when there is none).
        cohesion: the optional cohesion term (0 when ``cohesion_weight`` is 0).
        accuracy: fraction of valid (anchor, positive) pairs whose positive has the largest Tier-1 logit (no grad).
        distractor_gap: mean over valid distractors of ``distractor logit - LSE(batch)`` (no grad; > 0 when the
            distractors beat the random batch negatives).
        pool_size: number of valid positives in the (global) pool.
    """

    loss: torch.Tensor
    discrimination: torch.Tensor
    ranking: torch.Tensor
    cohesion: torch.Tensor
    accuracy: torch.Tensor
    distractor_gap: torch.Tensor
    pool_size: int


def _distributed_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _check_mask(mask: torch.Tensor | None, shape: tuple[int, int], name: str, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"`{name}` must be a bool tensor of shape {list(shape)} or None, got {type(mask).__name__}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"`{name}` must have shape {list(shape)}, got {list(mask.shape)}")
    return mask.to(device=device, dtype=torch.bool)


def _check_inputs(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None,
    pos_mask: torch.Tensor | None,
    neg_mask: torch.Tensor | None,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    for name, value in (("anchor", anchor), ("positive", positive), ("negative", negative)):
        if value is not None and not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            raise TypeError(f"`{name}` must be a float tensor, got {type(value).__name__}")
    if anchor.ndim != 2:
        raise ValueError(f"`anchor` must be [B, D], got shape {list(anchor.shape)}")
    b, d = anchor.shape
    if positive.ndim != 3 or positive.shape[0] != b or positive.shape[2] != d:
        raise ValueError(f"`positive` must be [B, P, D] = [{b}, P, {d}] to match `anchor`, got {list(positive.shape)}")
    if negative is not None and (negative.ndim != 3 or negative.shape[0] != b or negative.shape[2] != d):
        raise ValueError(f"`negative` must be [B, K, D] = [{b}, K, {d}] to match `anchor`, got {list(negative.shape)}")
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}")
    pmask = _check_mask(pos_mask, (b, positive.shape[1]), "pos_mask", anchor.device)
    k = 0 if negative is None else negative.shape[1]
    nmask = _check_mask(neg_mask, (b, k), "neg_mask", anchor.device)
    return pmask, nmask


def gather_positive_pool(
    positive: torch.Tensor, pos_mask: torch.Tensor, *, gather: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The global pool of positives, gathered across processes *with* gradients.

    Args:
        positive: ``[B, P, D]`` local positives.
        pos_mask: ``[B, P]`` bool validity.
        gather: gather across ``torch.distributed`` ranks; ``None`` = when a process group with more than one rank
            is initialised.

    Returns:
        ``(pool [M, D], pool_mask [M], offset)`` where the pool is ordered rank, then sample, then slot; each rank's
        batch is padded to the largest ``B`` (padding is masked out); ``offset`` is the column of this rank's first
        positive, so sample ``b``'s slot ``j`` is column ``offset + b * P + j``.
    """
    b, p, d = positive.shape
    world, rank = _distributed_world()
    if gather is None:
        gather = world > 1
    flat = positive.reshape(b * p, d)  # [B*P, D]
    flat_mask = pos_mask.reshape(b * p)
    if not gather or world == 1:
        return flat, flat_mask, 0
    import torch.distributed as dist
    import torch.distributed.nn.functional as dist_fn

    sizes = [torch.zeros(1, dtype=torch.long, device=positive.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([b], dtype=torch.long, device=positive.device))
    b_max = int(max(int(s.item()) for s in sizes))
    if b < b_max:  # all_gather needs equal shapes: pad with masked-out zeros
        flat = torch.cat([flat, flat.new_zeros((b_max - b) * p, d)])
        flat_mask = torch.cat([flat_mask, flat_mask.new_zeros((b_max - b) * p)])
    pool = torch.cat(dist_fn.all_gather(flat.contiguous()))  # [W*Bmax*P, D], differentiable
    masks = [torch.empty_like(flat_mask, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(masks, flat_mask.to(torch.uint8).contiguous())
    pool_mask = torch.cat(masks).to(torch.bool)
    return pool, pool_mask, rank * b_max * p


def _global_sum(value: torch.Tensor, distributed: bool) -> torch.Tensor:
    if not distributed:
        return value
    import torch.distributed as dist

    out = value.detach().clone()
    dist.all_reduce(out)
    return out


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, distributed: bool, world: int) -> torch.Tensor:
    """Sum of ``values`` where ``mask`` over the global count; scaled by ``world`` so the mean over ranks is exact."""
    count = _global_sum(mask.sum().to(values.dtype), distributed)
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    if float(count) == 0.0:
        return total * 0.0
    return total * (world if distributed else 1) / count


def cohesion_loss(
    positive: torch.Tensor, pos_mask: torch.Tensor | None = None, *, mode: CohesionMode = "prototype"
) -> torch.Tensor:
    """Pull the views of one identity together (optional term; the anchor is not part of it).

    Args:
        positive: ``[B, P, D]`` positive views.
        pos_mask: ``[B, P]`` validity; rows with fewer than 2 valid views are skipped.
        mode: ``"prototype"``: mean over valid views of ``1 - cos(p_i, normalise(mean of the valid views))``;
            ``"pairwise"``: mean over valid pairs ``i < j`` of ``1 - cos(p_i, p_j)``.

    Returns:
        Scalar in [0, 2]; 0 when no row has two valid views. Lower is better.
    """
    if positive.ndim != 3:
        raise ValueError(f"`positive` must be [B, P, D], got shape {list(positive.shape)}")
    mask = _check_mask(pos_mask, tuple(positive.shape[:2]), "pos_mask", positive.device)  # type: ignore[arg-type]
    p = F.normalize(positive, dim=-1, eps=_NORM_EPS)
    rows = mask.sum(1) >= 2  # [B]
    if mode == "prototype":
        weights = mask.to(p.dtype).unsqueeze(-1)  # [B, P, 1]
        proto = F.normalize((p * weights).sum(1), dim=-1, eps=_NORM_EPS)  # [B, D]
        dist = 1.0 - (p * proto.unsqueeze(1)).sum(-1)  # [B, P]
        valid = mask & rows.unsqueeze(1)
    elif mode == "pairwise":
        sims = p @ p.transpose(1, 2)  # [B, P, P]
        n = p.shape[1]
        upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=p.device), diagonal=1)
        valid = mask.unsqueeze(2) & mask.unsqueeze(1) & upper  # [B, P, P]
        dist = 1.0 - sims
    else:
        raise ValueError(f"`mode` must be 'prototype' or 'pairwise', got {mode!r}")
    if not bool(valid.any()):
        return p.sum() * 0.0
    return dist[valid].mean()


def nearid_loss_terms(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    pos_mask: torch.Tensor | None = None,
    neg_mask: torch.Tensor | None = None,
    *,
    temperature: float = 0.07,
    alpha: float = 0.5,
    cohesion_weight: float = 0.0,
    cohesion_mode: CohesionMode = "prototype",
    gather: bool | None = None,
) -> LossTerms:
    """All terms of the NearID objective; see :func:`nearid_loss` for the definition and arguments.

    Args:
        cohesion_weight: weight of :func:`cohesion_loss` on the positives (0 disables it).
        cohesion_mode: ``"prototype"`` or ``"pairwise"``.
        gather: gather the positive pool across ``torch.distributed`` ranks (``None``: when initialised).
    """
    pmask, nmask = _check_inputs(anchor, positive, negative, pos_mask, neg_mask, temperature)
    if alpha < 0 or cohesion_weight < 0:
        raise ValueError(f"`alpha` and `cohesion_weight` must be >= 0, got {alpha} and {cohesion_weight}")
    b, p = positive.shape[:2]
    world, _ = _distributed_world()
    distributed = (gather is None or gather) and world > 1
    a = F.normalize(anchor, dim=-1, eps=_NORM_EPS)  # [B, D]
    pos = F.normalize(positive, dim=-1, eps=_NORM_EPS)  # [B, P, D]
    neg = F.normalize(negative, dim=-1, eps=_NORM_EPS)  # [B, K, D]
    pool, pool_mask, offset = gather_positive_pool(pos, pmask, gather=distributed)  # [M, D], [M]
    sims = a @ pool.T / temperature  # [B, M]
    hard = (a.unsqueeze(1) * neg).sum(-1) / temperature  # [B, K]
    neg_inf = torch.tensor(float("-inf"), dtype=sims.dtype, device=sims.device)

    # Tier 1: -log softmax of each valid own positive among [valid pool positives, own valid distractors].
    logits = torch.cat([sims.masked_fill(~pool_mask, neg_inf), hard.masked_fill(~nmask, neg_inf)], dim=1)
    own_cols = offset + torch.arange(b, device=a.device).unsqueeze(1) * p + torch.arange(p, device=a.device)  # [B, P]
    target = sims.gather(1, own_cols)  # [B, P]
    has_target = pmask.any(1, keepdim=True)  # rows without a valid positive would have an empty softmax
    lse = torch.logsumexp(torch.where(has_target, logits, torch.zeros_like(logits)), dim=1, keepdim=True)  # [B, 1]
    tier1 = lse - target  # [B, P]
    discrimination = _masked_mean(tier1, pmask, distributed, world)

    # Tier 2: each valid distractor against the log-sum-exp of the valid pool without the anchor's own positives.
    own = torch.zeros_like(sims, dtype=torch.bool).scatter_(1, own_cols, True)
    others = pool_mask.unsqueeze(0) & ~own  # [B, M]
    has_other = others.any(1, keepdim=True)  # [B, 1]
    batch_logits = torch.where(has_other, sims.masked_fill(~others, neg_inf), torch.zeros_like(sims))
    lse_batch = torch.logsumexp(batch_logits, dim=1, keepdim=True)  # [B, 1]
    tier2_mask = nmask & has_other
    ranking = _masked_mean(F.softplus(lse_batch - hard), tier2_mask, distributed, world)

    cohesion = cohesion_loss(positive, pmask, mode=cohesion_mode) if cohesion_weight > 0 else a.sum() * 0.0
    loss = discrimination + alpha * ranking + cohesion_weight * cohesion

    with torch.no_grad():
        best_other = torch.cat(
            [sims.masked_fill(~others, neg_inf), hard.masked_fill(~nmask, neg_inf)], dim=1
        ).amax(1, keepdim=True)  # [B, 1]
        correct = (target > best_other) & pmask
        accuracy = correct.sum().float() / pmask.sum().clamp(min=1).float()
        gap = (hard - lse_batch)[tier2_mask]
        distractor_gap = gap.float().mean() if gap.numel() else torch.zeros((), device=a.device)
    return LossTerms(
        loss=loss,
        discrimination=discrimination,
        ranking=ranking,
        cohesion=cohesion,
        accuracy=accuracy,
        distractor_gap=distractor_gap,
        pool_size=int(pool_mask.sum()),
    )


def nearid_loss(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    pos_mask: torch.Tensor | None = None,
    neg_mask: torch.Tensor | None = None,
    *,
    temperature: float = 0.07,
    alpha: float = 0.5,
    cohesion_weight: float = 0.0,
    gather: bool | None = None,
) -> torch.Tensor:
    """The two-tier NearID objective ("positive > near-identity distractor > random"); lower is better.

    With ``a`` the anchors, ``G`` the pool of every valid positive of every sample (on every process when
    distributed), ``s_bm = <a_b, g_m> / T`` and ``h_bk = <a_b, n_bk> / T`` (all vectors L2-normalised):

    * Tier 1 (discrimination): for every valid positive ``j`` of anchor ``b``,
      ``-s_b,own(b,j) + log(sum_m exp s_bm + sum_k exp h_bk)`` (the anchor's other positives stay in the
      denominator, as in the paper's objective), averaged over valid pairs.
    * Tier 2 (ranking): for every valid distractor, ``softplus(log sum_{m not own(b)} exp s_bm - h_bk)``,
      averaged over valid distractors.
    * Loss = Tier 1 + ``alpha`` * Tier 2 (+ ``cohesion_weight`` * :func:`cohesion_loss`).

    With every mask true this equals the official default objective ``infonce_ext`` (spec §3.2). Masked slots are
    excluded from every pool and denominator (the official code keeps padded slots in the pools); see the module
    docstring for the exact differences.

    Args:
        anchor: ``[B, D]`` anchor embeddings.
        positive: ``[B, P, D]`` other views of each anchor's identity.
        negative: ``[B, K, D]`` near-identity distractors of each anchor (slot ``k`` shares the background of
            view ``k``; slot 0 is the anchor's own same-background distractor).
        pos_mask: ``[B, P]`` bool, True for real positives (default all True).
        neg_mask: ``[B, K]`` bool, True for real distractors (default all True).
        temperature: softmax temperature T (> 0).
        alpha: weight of Tier 2 (0 gives :func:`infonce`).
        cohesion_weight: weight of the optional cohesion term.
        gather: gather the positive pool across ``torch.distributed`` ranks, with gradients
            (``torch.distributed.nn.functional.all_gather``); ``None`` = when a process group is initialised.

    Returns:
        Scalar loss tensor.

    Example:
        >>> a = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
        >>> loss = nearid_loss(a, a[:, None] + 0.1 * torch.randn(4, 2, 8), torch.randn(4, 3, 8))
        >>> loss.ndim
        0
    """
    return nearid_loss_terms(
        anchor, positive, negative, pos_mask, neg_mask, temperature=temperature, alpha=alpha,
        cohesion_weight=cohesion_weight, gather=gather,
    ).loss


def infonce(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor | None = None,
    pos_mask: torch.Tensor | None = None,
    neg_mask: torch.Tensor | None = None,
    *,
    temperature: float = 0.07,
    gather: bool | None = None,
) -> torch.Tensor:
    """Tier 1 of :func:`nearid_loss` only (multi-positive InfoNCE; the official ``infonce`` for ablations).

    Args:
        anchor: ``[B, D]``.
        positive: ``[B, P, D]``.
        negative: ``[B, K, D]`` distractors added to each anchor's denominator, or None for batch negatives only.
        pos_mask, neg_mask: validity masks as in :func:`nearid_loss`.
        temperature: softmax temperature.
        gather: see :func:`nearid_loss`.

    Returns:
        Scalar loss; lower is better.
    """
    if negative is None:
        negative = anchor.new_zeros(anchor.shape[0], 0, anchor.shape[-1] if anchor.ndim == 2 else 0)
    return nearid_loss_terms(
        anchor, positive, negative, pos_mask, neg_mask, temperature=temperature, alpha=0.0, gather=gather
    ).discrimination
