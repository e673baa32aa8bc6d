"""``IdentityReward``: a differentiable identity reward against a subject's reference photos.

The reward of a generated image is its NearID similarity to the subject's references (mean, max or centroid
aggregation), optionally expressed relative to the reference oracle and penalised by its similarity to
near-identity distractors. Higher is better. The NearID encoder stays frozen and in eval mode; gradients flow to
the pixels only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .config import parse_dtype, with_overrides
from .images import ImageInput, check_value_range
from .model import NearIDModel, Pooling, as_nearid_model, check_chunk_size, check_pooling
from .references import ReferenceSet, embed_images
from .similarity import Aggregate

logger = logging.getLogger(__name__)

__all__ = [
    "RewardConfig",
    "RewardOutput",
    "IdentityReward",
    "identity_loss",
    "hinge_loss",
    "penalised_reward",
]

RewardKind = Literal["cosine", "relative"]

# ---------------------------------------------------------------------------------------------- stateless maths
def identity_loss(scores: torch.Tensor) -> torch.Tensor:
    """``1 - s`` per image: 0 for a perfect match, larger is worse (lower is better).

    Args:
        scores: ``[B]`` rewards (cosine similarities in [-1, 1], or oracle-relative scores).

    Returns:
        ``[B]`` losses.

    Example:
        >>> identity_loss(torch.tensor([1.0, 0.25]))
        tensor([0.0000, 0.7500])
    """
    return 1.0 - scores


def hinge_loss(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """``relu(threshold - s)`` per image: no loss (and no gradient) once a score reaches ``threshold``.

    Example:
        >>> hinge_loss(torch.tensor([0.9, 0.5]), 0.7)
        tensor([0.0000, 0.2000])
    """
    return torch.relu(threshold - scores)


def penalised_reward(identity: torch.Tensor, negative: torch.Tensor | None, weight: float) -> torch.Tensor:
    """``identity - weight * negative``: the near-identity penalty (``negative`` = max similarity to distractors).

    Args:
        identity: ``[B]`` similarity to the subject's references.
        negative: ``[B]`` maximum similarity to the negative references, or ``None`` (no penalty).
        weight: lambda >= 0.
    """
    if negative is None or weight == 0.0:
        return identity
    return identity - weight * negative


# ---------------------------------------------------------------------------------------------- config
@dataclass
class RewardConfig:
    """Options of :class:`IdentityReward`.

    Attributes:
        aggregate: how an image's similarities to the R references combine: ``"mean"``, ``"max"`` or ``"centroid"``.
        kind: ``"cosine"`` returns the aggregated cosine similarity in [-1, 1]; ``"relative"`` divides it by the
            reference oracle (the mean leave-one-out reference-to-reference score, needs R >= 2), so 1.0 means "as
            close to the references as they are to each other".
        negative_weight: lambda of the near-identity penalty ``reward = s - lambda * max_k cos(image, negative_k)``;
            used only when negative references are given.
        chunk_size: run the encoder on at most this many images at a time (None: whole batch).
        gradient_checkpointing: recompute encoder layers in the backward pass (less activation memory).
        backbone_dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the frozen backbone (the head and the
            similarities stay float32); None keeps the model's dtype. A ``torch.dtype`` or another spelling that
            :func:`~nearid_reward.config.parse_dtype` reads (``"bf16"``) is stored by torch's name.
        check_inputs: check image tensors for NaN/Inf and value-range mistakes on every call (costs one device
            sync per call; shapes are always checked).
        reference_chunk_size: images per encoder call when embedding references and negatives.
        reference_value_range: ``(low, high)`` of reference/negative *tensors* (PIL images and files are 8-bit).
        pooling: ``"head"`` scores with the model's head (NearID, or a plain SigLIP folder's own head: the frozen
            baseline); ``"mean"`` with the L2-normalised mean of the backbone's tokens (the CLIP-I / DINO-style
            baseline, :func:`~nearid_reward.model.mean_pool_tokens`); None keeps the model's own pooling. The
            reward then uses :meth:`NearIDModel.with_pooling`, a view sharing the frozen weights.

    ``gradient_checkpointing`` and ``backbone_dtype`` are applied to the :class:`~nearid_reward.NearIDModel` itself,
    so a model object shared with other code is affected too (the reward also freezes it).
    """

    aggregate: Aggregate = "mean"
    kind: RewardKind = "cosine"
    negative_weight: float = 1.0
    chunk_size: int | None = None
    gradient_checkpointing: bool = False
    backbone_dtype: str | None = None
    check_inputs: bool = False
    reference_chunk_size: int = 32
    reference_value_range: tuple[float, float] = (0.0, 1.0)
    pooling: Pooling | None = None

    def __post_init__(self) -> None:
        if self.pooling is not None:
            check_pooling(self.pooling, "RewardConfig.pooling")
        if self.aggregate not in ("mean", "max", "centroid"):
            raise ValueError(f"RewardConfig.aggregate must be 'mean', 'max' or 'centroid', got {self.aggregate!r}")
        if self.kind not in ("cosine", "relative"):
            raise ValueError(f"RewardConfig.kind must be 'cosine' or 'relative', got {self.kind!r}")
        if not self.negative_weight >= 0.0:
            raise ValueError(f"RewardConfig.negative_weight must be >= 0, got {self.negative_weight}")
        self.chunk_size = check_chunk_size(self.chunk_size, "RewardConfig.chunk_size")
        self.reference_chunk_size = check_chunk_size(  # type: ignore[assignment]
            self.reference_chunk_size, "RewardConfig.reference_chunk_size", allow_none=False
        )
        if self.backbone_dtype is not None:  # stored by torch's name: "float32", "float16" or "bfloat16"
            dtype = parse_dtype(self.backbone_dtype, name="RewardConfig.backbone_dtype (or None)")
            self.backbone_dtype = str(dtype).removeprefix("torch.")
        self.reference_value_range = check_value_range(
            self.reference_value_range, "RewardConfig.reference_value_range"
        )

    @property
    def torch_backbone_dtype(self) -> torch.dtype | None:
        return None if self.backbone_dtype is None else parse_dtype(self.backbone_dtype)


@dataclass
class RewardOutput:
    """Everything one scoring pass computes (all tensors on the reward's device).

    Attributes:
        reward: ``[B]`` the reward (higher is better): ``identity`` (or ``identity / oracle``) minus the penalty.
        identity: ``[B]`` aggregated cosine similarity to the references, in [-1, 1].
        negative: ``[B]`` maximum cosine similarity to the negative references, or None without negatives.
        embeddings: ``[B, E]`` unit-norm float32 embeddings of the images.
    """

    reward: torch.Tensor
    identity: torch.Tensor
    negative: torch.Tensor | None
    embeddings: torch.Tensor


# ---------------------------------------------------------------------------------------------- module
class IdentityReward(nn.Module):
    """Differentiable identity reward: NearID similarity of generated images to a subject's reference photos.

    The references (and negatives) live in a :class:`~nearid_reward.ReferenceSet`, embedded once without gradients;
    its tensors are buffers of this module, so they move with ``.to(device)``. :meth:`set_references` /
    :meth:`set_negatives` replace them. The encoder is frozen (no parameter ever receives a gradient) and stays in
    eval mode even when a parent module calls ``.train()``.

    Args:
        model: a :class:`~nearid_reward.NearIDModel`, or a checkpoint folder / hub id to load one from.
        references: the subject's reference photos: a float tensor ``[R, 3, H, W]`` (values in
            ``config.reference_value_range``), PIL images, uint8 arrays, file paths or a folder; or a
            :class:`~nearid_reward.ReferenceSet` already embedded with this model (shared, not copied; its
            aggregation must equal ``config.aggregate``).
        negatives: optional near-identity distractors in the same image forms (not with a ``ReferenceSet``, which
            carries its own).
        config: a :class:`RewardConfig`; keyword ``overrides`` replace its fields (e.g. ``aggregate="max"``).

    Shapes and ranges:
        ``forward(images[B, 3, H, W])`` with values in ``value_range`` (default ``(0, 1)``) returns ``[B]`` float32
        rewards; higher is better (``higher_is_better = True``). Cosine rewards lie in [-1, 1] (minus the penalty).

    Example:
        >>> from nearid_reward.testing import random_images, tiny_nearid_model
        >>> photos = random_images(3, 48, seed=1)  # or "path/to/subject_photos"; the model: "path/to/nearid"
        >>> reward = IdentityReward(tiny_nearid_model(), photos, aggregate="max")
        >>> images = random_images(2, 64, seed=2).requires_grad_()  # e.g. a pipeline's output, [B, 3, H, W] in [0, 1]
        >>> rewards = reward(images)  # [B], higher is better
        >>> rewards.shape, bool((rewards.abs() <= 1).all())
        (torch.Size([2]), True)
        >>> reward.loss(images).mean().backward()  # 1 - reward; gradients reach the pixels, never the encoder
        >>> images.grad.shape, any(p.grad is not None for p in reward.parameters())
        (torch.Size([2, 3, 64, 64]), False)
    """

    higher_is_better: bool = True

    def __init__(
        self,
        model: NearIDModel | str | os.PathLike[str],
        references: ImageInput | ReferenceSet,
        *,
        negatives: ImageInput | None = None,
        config: RewardConfig | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        base = with_overrides(config, RewardConfig, overrides, "IdentityReward")
        self.config = base
        self.model = as_nearid_model(model, torch_dtype=self.config.torch_backbone_dtype)
        if base.pooling is not None:
            self.model = self.model.with_pooling(base.pooling)
        if self.config.torch_backbone_dtype is not None and self.model.dtype != self.config.torch_backbone_dtype:
            self.model.backbone.to(self.config.torch_backbone_dtype)
        if any(p.requires_grad for p in self.model.parameters()):
            logger.info("IdentityReward freezes the NearID model it was given (requires_grad=False on every weight)")
        self.model.requires_grad_(False)
        if self.config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if isinstance(references, ReferenceSet):
            if negatives is not None:
                raise ValueError("`negatives` must not be given with a ReferenceSet: it carries its own negatives")
            if references.aggregate != base.aggregate:
                raise ValueError(
                    f"the ReferenceSet aggregates with {references.aggregate!r} but RewardConfig.aggregate is "
                    f"{base.aggregate!r}; pass aggregate={references.aggregate!r}"
                )
            if references.embed_dim != self.model.embed_dim:
                raise ValueError(
                    f"the ReferenceSet holds {references.embed_dim}-d embeddings but the model embeds to "
                    f"{self.model.embed_dim}-d: it was built with another model"
                )
            self._check_relative(references.num_references)
            self.references = references
        else:
            self.references = ReferenceSet.from_images(
                self.model, references, negatives, aggregate=base.aggregate,
                value_range=base.reference_value_range, chunk_size=base.reference_chunk_size,
            )  # fmt: skip
            self._check_relative(self.references.num_references)
        self.to(self.model.device)
        self.train(False)

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> IdentityReward:
        """Sets this module's flag; the NearID encoder always stays in eval mode."""
        super().train(mode)
        self.model.train(False)
        return self

    # ------------------------------------------------------------------ references
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def num_references(self) -> int:
        return self.references.num_references

    @property
    def num_negatives(self) -> int:
        return self.references.num_negatives

    @property
    def reference_embeddings(self) -> torch.Tensor:
        """``[R, E]`` the cached reference embeddings (``self.references.references``)."""
        return self.references.references

    @property
    def negative_embeddings(self) -> torch.Tensor:
        """``[K, E]`` the cached negative embeddings (K = 0 without negatives)."""
        return self.references.negatives

    @property
    def reference_oracle(self) -> torch.Tensor:
        """The reference oracle as a 0-d tensor on the reward's device (NaN with a single reference)."""
        return self.references.oracle_tensor

    @property
    def oracle(self) -> float:
        """The reference oracle: mean leave-one-out reference-to-reference score (NaN with a single reference)."""
        return self.references.oracle

    def embed_images(self, images: ImageInput, *, value_range: tuple[float, float] = (0.0, 1.0), name: str = "images",
                     chunk_size: int | None = None, check_inputs: bool = True) -> torch.Tensor:
        """Embeddings ``[N, E]`` (float32, unit norm) of any accepted image input, without gradients."""
        return embed_images(self.model, images, value_range=value_range, name=name,
                            chunk_size=self.config.reference_chunk_size if chunk_size is None else chunk_size,
                            check_inputs=check_inputs)

    def set_references(self, references: ImageInput) -> None:
        """Embed (without gradients) and cache new references; also refreshes the reference oracle."""
        emb = self.embed_images(references, value_range=self.config.reference_value_range, name="references")
        self.set_reference_embeddings(emb)

    def set_reference_embeddings(self, embeddings: torch.Tensor) -> None:
        """Cache precomputed reference embeddings ``[R, E]`` (e.g. shared between several scorers)."""
        if isinstance(embeddings, torch.Tensor) and embeddings.ndim == 2:
            self._check_relative(int(embeddings.shape[0]))
        self.references.set_references(embeddings)

    def set_negatives(self, negatives: ImageInput | None) -> None:
        """Embed and cache near-identity negatives (None or an empty list removes them)."""
        if negatives is None or (isinstance(negatives, (list, tuple)) and len(negatives) == 0):
            self.references.set_negatives(None)
            return
        emb = self.embed_images(negatives, value_range=self.config.reference_value_range, name="negatives")
        self.references.set_negatives(emb)

    def _check_relative(self, num_references: int) -> None:
        if self.config.kind == "relative" and num_references < 2:
            raise ValueError(
                "kind='relative' divides by the reference oracle, which needs at least 2 references; "
                f"got {num_references}"
            )

    # ------------------------------------------------------------------ scoring
    def score(self, images: ImageInput, *, value_range: tuple[float, float] = (0.0, 1.0)) -> RewardOutput:
        """Score images; differentiable w.r.t. tensor ``images`` ``[B, 3, H, W]`` (see :class:`RewardOutput`)."""
        value_range = check_value_range(value_range)
        if isinstance(images, torch.Tensor):
            embeddings = self.model.embed(
                images, value_range=value_range, chunk_size=self.config.chunk_size,
                check_inputs=self.config.check_inputs,
            )  # [B, E]
        else:
            embeddings = self.embed_images(images, name="images", chunk_size=self.config.chunk_size)
        return self.score_embeddings(embeddings)

    def score_embeddings(self, embeddings: torch.Tensor) -> RewardOutput:
        """Score precomputed unit-norm embeddings ``[B, E]`` against :attr:`references`."""
        dtype = torch.promote_types(embeddings.dtype, torch.float32)  # at least float32, float64 when given
        embeddings = embeddings.to(dtype)
        identity = self.references.scores(embeddings)  # [B]
        scaled = identity / self.reference_oracle.to(dtype) if self.config.kind == "relative" else identity
        negative = self.references.negative_scores(embeddings)  # [B] or None
        reward = penalised_reward(scaled, negative, self.config.negative_weight)
        return RewardOutput(reward=reward, identity=identity, negative=negative, embeddings=embeddings)

    def forward(self, images: torch.Tensor, *, value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """Rewards ``[B]`` (float32, higher is better) of images ``[B, 3, H, W]`` with values in ``value_range``.

        Differentiable w.r.t. ``images``; resizing and normalisation happen inside.
        """
        return self.score(images, value_range=value_range).reward

    def loss(
        self,
        images: torch.Tensor,
        *,
        value_range: tuple[float, float] = (0.0, 1.0),
        hinge_threshold: float | None = None,
    ) -> torch.Tensor:
        """Per-image loss ``[B]`` (lower is better): ``1 - reward``, or ``relu(hinge_threshold - reward)``."""
        reward = self(images, value_range=value_range)
        return identity_loss(reward) if hinge_threshold is None else hinge_loss(reward, hinge_threshold)

    def reward_fn(
        self,
        images: ImageInput,
        prompts: Sequence[str] | None = None,
        metadata: Any = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Adapter for DDPO / AlignProp / Flow-GRPO-style loops: ``(images, prompts, metadata) -> (rewards, info)``.

        trl versions: the ``reward_function`` of trl's ``DDPOTrainer`` and ``AlignPropTrainer``, which exist in
        trl < 0.24 only (both were removed in trl 0.24.0; install them with the ``trl`` extra, ``trl>=0.20,<0.24``).
        This method never imports trl. Trainers that cannot share this environment (Flow-GRPO, DiffusionNFT,
        DanceGRPO) reach the same reward through ``nearid-reward-server`` (see ``docs/rl_frameworks.md``).

        Args:
            images: float ``[B, 3, H, W]`` in [0, 1] (what ``output_type="pt"`` pipelines return), uint8
                ``[B, H, W, 3]`` numpy arrays or tensors, or a list of PIL images. Float tensors keep their
                gradient (AlignProp); the others are scored without one.
            prompts: the prompts (unused; identity does not depend on the prompt).
            metadata: per-prompt metadata (unused).

        Returns:
            ``rewards [B]`` and ``info`` with detached ``identity``, ``negative`` (when negatives are set) and the
            ``reference_oracle``.
        """
        batch = _as_unit_tensor(images)
        out = self.score(batch) if batch is not None else self.score(images)
        info: dict[str, Any] = {"identity": out.identity.detach(), "reference_oracle": self.oracle}
        if out.negative is not None:
            info["negative"] = out.negative.detach()
        return out.reward, info

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"references={self.num_references}, negatives={self.num_negatives}, aggregate={c.aggregate!r}, "
            f"kind={c.kind!r}, negative_weight={c.negative_weight}"
            + ("" if c.pooling is None else f", pooling={c.pooling!r}")
        )


# ---------------------------------------------------------------------------------------------- helpers
def _as_unit_tensor(images: Any) -> torch.Tensor | None:
    """uint8 batches ``[B, H, W, 3]`` (numpy or torch) -> float ``[B, 3, H, W]`` in [0, 1]; float tensors pass."""
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4:
        images = torch.from_numpy(images)
    if isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 image batches must be [B, H, W, 3], got shape {tuple(images.shape)}")
        return images.permute(0, 3, 1, 2).float() / 255.0
    if isinstance(images, torch.Tensor):
        return images
    return None
