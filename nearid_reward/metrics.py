"""Identity metrics of generated images: their names and directions declared once, and one stateless function.

:func:`identity_metrics` computes them from embeddings and a :class:`~nearid_reward.ReferenceSet`;
:func:`metric_names` says which names a configuration produces and whether higher or lower is better, without
scoring anything. Keys carry no prefix: a logger adds its own (``nearid/`` in
:class:`~nearid_reward.IdentityValidator`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .references import ReferenceSet
from .reward import RewardKind, penalised_reward
from .similarity import cosine_matrix, leave_one_out_oracle

__all__ = ["MetricSpec", "METRICS", "metric_names", "identity_metrics", "context_copy_scores"]

Requirement = Literal["oracle", "threshold", "negatives", "class_images", "base_images", "paired_base", "contexts"]


@dataclass(frozen=True)
class MetricSpec:
    """What one identity metric means.

    Attributes:
        name: the key in the metrics dict (no prefix).
        higher_is_better: True or False for a score to maximise or minimise; None for a descriptive number
            (counts, the oracle) that should not rank anything.
        requires: what the metric needs besides generated images: ``"oracle"`` (>= 2 references),
            ``"threshold"``, ``"negatives"``, ``"class_images"``, ``"base_images"``, ``"paired_base"`` (base images
            rendered with the same prompts and seeds, one per image), ``"contexts"`` (the references' context
            features, >= 2 references, and the copy signal asked for).
        description: one line for tables and help texts.
    """

    name: str
    higher_is_better: bool | None
    requires: tuple[Requirement, ...]
    description: str


_SPECS = (
    MetricSpec("identity_mean", True, (), "mean identity score (aggregated cosine to the references)"),
    MetricSpec("identity_min", True, (), "lowest identity score of the set"),
    MetricSpec("identity_max", True, (), "highest identity score of the set"),
    MetricSpec("identity_std", None, (), "standard deviation of the identity scores"),
    MetricSpec("num_images", None, (), "number of scored images"),
    MetricSpec("frac_above_threshold", True, ("threshold",), "share of images whose score reaches the threshold"),
    MetricSpec("reference_oracle", None, ("oracle",), "mean leave-one-out score of the references themselves"),
    MetricSpec("relative_mean", True, ("oracle",), "identity_mean / reference_oracle (1.0: as close as a real photo)"),
    MetricSpec("copy_fraction", False, ("oracle",),
               "share of images closer to one reference than it is to its nearest other reference (+ copy_margin)"),
    MetricSpec("copy_max_excess", False, ("oracle",), "largest such excess over the references' own spread"),
    MetricSpec("context_copy_fraction", False, ("contexts",),
               "share of images whose scene (mean-pooled backbone features) is as close to the references' as "
               "theirs are to each other: the training place copied"),
    MetricSpec("context_copy_excess", None, ("contexts",),
               "mean of each image's scene similarity to the references minus the references' own lowest"),
    MetricSpec("negative_max_mean", False, ("negatives",), "mean of each image's highest similarity to a negative"),
    MetricSpec("reward_mean", True, ("negatives",), "mean reward: identity minus the weighted negative penalty"),
    MetricSpec("class_leakage_mean", False, ("class_images",), "identity score of class-prompt images"),
    MetricSpec("class_leakage_relative", False, ("class_images", "oracle"), "class_leakage_mean / reference_oracle"),
    MetricSpec("base_identity_mean", None, ("base_images",), "identity_mean of the base model (adapter disabled)"),
    MetricSpec("identity_gain", True, ("base_images",), "identity_mean minus base_identity_mean"),
    MetricSpec("base_similarity", None, ("base_images", "paired_base"),
               "mean cosine between each image and its base-model twin (1.0: the adapter changed nothing)"),
)

METRICS: dict[str, MetricSpec] = {spec.name: spec for spec in _SPECS}
"""Every metric :func:`identity_metrics` can return, in its order."""


def metric_names(
    *,
    oracle: bool = True,
    threshold: bool = True,
    negatives: bool = True,
    class_images: bool = True,
    base_images: bool = True,
    paired_base: bool = True,
    contexts: bool = True,
) -> dict[str, MetricSpec]:
    """The metrics :func:`identity_metrics` returns for a configuration, by name (all of them by default).

    Args:
        oracle: the reference set has >= 2 references.
        threshold: a threshold is given.
        negatives: the reference set has negatives.
        class_images: class-prompt images are scored.
        base_images: base-model images are scored.
        paired_base: the base images pair one to one with the images.
        contexts: the copy signal is computed (context features of >= 2 references and of the images).

    Example:
        >>> names = metric_names(negatives=False, class_images=False, base_images=False)
        >>> list(names)[:3], "identity_gain" in names
        (['identity_mean', 'identity_min', 'identity_max'], False)
        >>> metric_names()["class_leakage_mean"].higher_is_better
        False
    """
    have = {"oracle": oracle, "threshold": threshold, "negatives": negatives, "class_images": class_images,
            "base_images": base_images, "paired_base": paired_base, "contexts": contexts}  # fmt: skip
    return {name: spec for name, spec in METRICS.items() if all(have[r] for r in spec.requires)}


def identity_metrics(
    embeddings: torch.Tensor,
    references: ReferenceSet,
    *,
    threshold: float | None = None,
    copy_margin: float = 0.0,
    class_embeddings: torch.Tensor | None = None,
    base_embeddings: torch.Tensor | None = None,
    negative_weight: float = 1.0,
    reward_kind: RewardKind = "cosine",
    identity: torch.Tensor | None = None,
    contexts: torch.Tensor | None = None,
    context_margin: float = 0.2,
) -> dict[str, float]:
    """Identity metrics of generated images against a reference set (flat ``dict[str, float]``, no prefix).

    Every key is declared in :data:`METRICS` (with its direction); :func:`metric_names` lists which ones a
    configuration gives. Scores are cosines in [-1, 1].

    Args:
        embeddings: ``[B, E]`` unit-norm embeddings of the generated images (B >= 1).
        references: the subject's :class:`~nearid_reward.ReferenceSet`.
        threshold: the cosine bar of ``frac_above_threshold`` (None: not computed).
        copy_margin: an image counts as a copy of reference ``r`` when its similarity to ``r`` exceeds ``r``'s
            similarity to its nearest other reference by more than this.
        class_embeddings: ``[C, E]`` embeddings of class-prompt images (``class_leakage_*``).
        base_embeddings: ``[B', E]`` embeddings of the base model's images (``base_identity_mean``,
            ``identity_gain``; ``base_similarity`` when ``B' == B``, pairs in order).
        negative_weight, reward_kind: how ``reward_mean`` is formed, as in :class:`~nearid_reward.RewardConfig`.
        identity: ``[B]`` ``references.scores(embeddings)`` when the caller already has it (scored once).
        contexts: ``[B, D]`` context features of the images (:func:`~nearid_reward.model.mean_pool_tokens`):
            adds ``context_copy_fraction`` and ``context_copy_excess`` (see :func:`context_copy_scores`); the
            reference set must hold its references' context features and >= 2 references.
        context_margin: an image counts as a copy when its excess exceeds ``-context_margin`` (generations never
            reach the band of real photos; 0.2 was chosen in the generation world, see docs/world.md).

    Example:
        >>> refs = ReferenceSet(torch.tensor([[0.6, 0.8, 0.0], [0.6, 0.0, 0.8]]))  # cosine 0.36 to each other
        >>> m = identity_metrics(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), refs, threshold=0.5)
        >>> {k: round(m[k], 4) for k in ("identity_mean", "identity_max", "reference_oracle", "relative_mean")}
        {'identity_mean': 0.5, 'identity_max': 0.6, 'reference_oracle': 0.36, 'relative_mean': 1.3889}
        >>> m["frac_above_threshold"], m["copy_fraction"]
        (0.5, 1.0)
    """
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"`embeddings` must be a non-empty [B, E] tensor, got shape {tuple(embeddings.shape)}")
    embeddings = embeddings.float()
    if identity is None:
        identity = references.scores(embeddings)
    elif identity.shape != (embeddings.shape[0],):
        raise ValueError(f"`identity` must be [{embeddings.shape[0]}] (one score per image), got "
                         f"{tuple(identity.shape)}")
    identity = identity.float()  # [B]
    metrics: dict[str, float] = {
        "identity_mean": float(identity.mean()),
        "identity_min": float(identity.min()),
        "identity_max": float(identity.max()),
        "identity_std": float(identity.std(unbiased=False)),
        "num_images": float(identity.shape[0]),
    }
    if threshold is not None:
        metrics["frac_above_threshold"] = float((identity >= threshold).float().mean())
    oracle = references.oracle
    if references.num_references >= 2 and math.isfinite(oracle):
        refs = references.references.float()  # [R, E]
        metrics["reference_oracle"] = oracle
        metrics["relative_mean"] = metrics["identity_mean"] / oracle
        ref_sims = cosine_matrix(refs, refs)  # [R, R]
        ref_sims.fill_diagonal_(-float("inf"))
        nearest_other = ref_sims.max(dim=1).values  # [R]
        excess = (cosine_matrix(embeddings, refs) - nearest_other[None, :]).max(dim=1).values  # [B]
        metrics["copy_fraction"] = float((excess > copy_margin).float().mean())
        metrics["copy_max_excess"] = float(excess.max())
    if contexts is not None:
        if not references.has_contexts:
            raise ValueError("the copy signal needs the references' context features: build the ReferenceSet with "
                             "ReferenceSet.from_images (or pass contexts=)")
        if contexts.ndim != 2 or contexts.shape[0] != embeddings.shape[0]:
            raise ValueError(f"`contexts` must be [{embeddings.shape[0]}, D] (one per image), got "
                             f"{tuple(contexts.shape)}")
        excess_ctx = context_copy_scores(contexts.float(), references.contexts.float())  # [B]
        metrics["context_copy_fraction"] = float((excess_ctx > -context_margin).float().mean())
        metrics["context_copy_excess"] = float(excess_ctx.mean())
    negative = references.negative_scores(embeddings)  # [B] or None
    if negative is not None:
        scaled = identity / references.oracle_tensor.float() if reward_kind == "relative" else identity
        metrics["negative_max_mean"] = float(negative.mean())
        metrics["reward_mean"] = float(penalised_reward(scaled, negative, negative_weight).mean())
    if class_embeddings is not None:
        leak = references.scores(class_embeddings.float())  # [C]
        metrics["class_leakage_mean"] = float(leak.mean())
        if "reference_oracle" in metrics:
            metrics["class_leakage_relative"] = metrics["class_leakage_mean"] / oracle
    if base_embeddings is not None:
        base = references.scores(base_embeddings.float())  # [B']
        metrics["base_identity_mean"] = float(base.mean())
        metrics["identity_gain"] = metrics["identity_mean"] - metrics["base_identity_mean"]
        if base_embeddings.shape == embeddings.shape:
            metrics["base_similarity"] = float((embeddings * base_embeddings.float()).sum(-1).mean())
    return metrics


def context_copy_scores(contexts: torch.Tensor, reference_contexts: torch.Tensor) -> torch.Tensor:
    """How far each image's scene is inside the references' own band: ``[B]``, > 0 means "looks like a copy".

    An image's score is its mean cosine to the references' context features minus the lowest leave-one-out mean
    cosine among the references (how alike the two least alike of the subject's own photos are, place included).
    Photos taken in one place share it, so a generation that shows the subject in *another* place falls below that
    band, and one that copies the training place does not. Samples of the subject in a place that some of the
    references show are within the band too, so the signal is meant for prompts that ask for new places.

    Args:
        contexts: ``[B, D]`` unit-norm context features of the generations.
        reference_contexts: ``[R, D]`` those of the references, R >= 2.

    Example:
        >>> refs = torch.tensor([[1.0, 0.0], [0.8, 0.6]])  # the two photos: cosine 0.8
        >>> context_copy_scores(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), refs)  # mean cosine 0.9 and 0.3, minus 0.8
        tensor([ 0.1000, -0.5000])
    """
    if reference_contexts.ndim != 2 or reference_contexts.shape[0] < 2:
        raise ValueError(f"the copy signal needs >= 2 reference context features [R, D], got "
                         f"{tuple(reference_contexts.shape)}")
    if contexts.ndim != 2 or contexts.shape[1] != reference_contexts.shape[1]:
        raise ValueError(f"`contexts` must be [B, {reference_contexts.shape[1]}], got {tuple(contexts.shape)}")
    band = leave_one_out_oracle(reference_contexts, "mean").min()  # the two least alike references' level
    return cosine_matrix(contexts, reference_contexts).mean(dim=1) - band  # [B]
