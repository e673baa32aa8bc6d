"""``ReferenceSet``: one subject's reference embeddings, its near-identity negatives, the aggregation and the
reference oracle, held once and shared by the reward, the validator and checkpoint selection.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import nn

from .images import ImageInput
from .model import NearIDModel
from .similarity import Aggregate, leave_one_out_oracle, reference_scores

__all__ = ["ReferenceSet", "embed_images", "embed_images_with_context"]

_AGGREGATES = ("mean", "max", "centroid")


def embed_images(
    model: NearIDModel,
    images: ImageInput,
    *,
    value_range: tuple[float, float] = (0.0, 1.0),
    name: str = "images",
    chunk_size: int | None = None,
    check_inputs: bool = True,
) -> torch.Tensor:
    """Embeddings ``[N, E]`` (float32, unit norm) of any accepted image input, without gradients.

    Errors name the argument: ``"invalid `references`: ..."``.
    """
    emb = _embed_without_grad(model, images, name, value_range=value_range, chunk_size=chunk_size,
                              check_inputs=check_inputs)
    return emb.float()  # [N, E]


def embed_images_with_context(
    model: NearIDModel,
    images: ImageInput,
    *,
    value_range: tuple[float, float] = (0.0, 1.0),
    name: str = "images",
    chunk_size: int | None = None,
    check_inputs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity embeddings ``[N, E]`` and context features ``[N, D]`` from one backbone pass, without gradients.

    The embeddings equal :func:`embed_images`'s; the context features are
    :func:`~nearid_reward.model.mean_pool_tokens` of the same tokens. Both float32 with unit norm.
    """
    emb, contexts = _embed_without_grad(model, images, name, value_range=value_range, chunk_size=chunk_size,
                                        check_inputs=check_inputs, return_context=True)
    return emb.float(), contexts.float()  # [N, E], [N, D]


def _embed_without_grad(model: NearIDModel, images: ImageInput, name: str, **kwargs: Any) -> Any:
    """``model.embed(images, **kwargs)`` without gradients; an empty input or an input error names the argument."""
    _check_not_empty(images, name)
    with torch.no_grad():
        try:
            return model.embed(images, **kwargs)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"invalid `{name}`: {exc}") from exc


class ReferenceSet(nn.Module):
    """A subject's reference embeddings, optional near-identity negatives, their aggregation and the oracle.

    The tensors are non-persistent buffers: the set moves with ``.to(device)`` (and with a module that holds it,
    e.g. :class:`~nearid_reward.IdentityReward`), follows ``.double()``, and is never part of a ``state_dict``.
    :meth:`set_references` / :meth:`set_negatives` replace the tensors in place, so every holder sees the change.

    Args:
        references: ``[R, E]`` reference embeddings, R >= 1 (unit norm, as :meth:`NearIDModel.embed` returns).
        negatives: ``[K, E]`` embeddings of near-identity distractors, or None.
        aggregate: how an image's similarities to the R references combine: ``"mean"``, ``"max"`` or
            ``"centroid"`` (see :func:`~nearid_reward.similarity.reference_scores`).
        contexts: ``[R, D]`` context features of the references (:func:`~nearid_reward.model.mean_pool_tokens`;
            what the copy signal compares generations with), or None. :meth:`from_images` fills them from the same
            backbone pass.

    Attributes:
        references: ``[R, E]`` float32.
        negatives: ``[K, E]``, K = 0 without negatives.
        leave_one_out: ``[R]`` score of each reference against the others (empty when R < 2).
        oracle: their mean, the score of "another real photo of the subject" (NaN when R < 2).
        contexts: ``[R, D]`` context features, ``[0, 0]`` when not given (see :attr:`has_contexts`).

    Example:
        >>> refs = ReferenceSet(torch.eye(3)[:2], aggregate="mean")
        >>> refs.scores(torch.tensor([[1.0, 0.0, 0.0]]))  # mean cosine to the two references
        tensor([0.5000])
        >>> refs.num_references, refs.oracle
        (2, 0.0)
    """

    references: torch.Tensor
    negatives: torch.Tensor
    leave_one_out: torch.Tensor
    contexts: torch.Tensor

    def __init__(
        self,
        references: torch.Tensor,
        negatives: torch.Tensor | None = None,
        *,
        aggregate: Aggregate = "mean",
        contexts: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if aggregate not in _AGGREGATES:
            raise ValueError(f"`aggregate` must be 'mean', 'max' or 'centroid', got {aggregate!r}")
        self.aggregate: Aggregate = aggregate
        refs = _check_embeddings(references, None, "reference embeddings")
        self.register_buffer("references", torch.zeros(0, refs.shape[1]), persistent=False)
        self.register_buffer("negatives", torch.zeros(0, refs.shape[1]), persistent=False)
        self.register_buffer("leave_one_out", torch.zeros(0), persistent=False)
        self.register_buffer("contexts", torch.zeros(0, 0), persistent=False)
        self.to(refs.device)
        self.set_references(refs, contexts=contexts)
        self.set_negatives(negatives)

    @classmethod
    def from_images(
        cls,
        model: NearIDModel,
        references: ImageInput,
        negatives: ImageInput | None = None,
        *,
        aggregate: Aggregate = "mean",
        value_range: tuple[float, float] = (0.0, 1.0),
        chunk_size: int | None = 32,
    ) -> ReferenceSet:
        """Embed the subject's photos (and distractors) with ``model``, without gradients.

        Args:
            model: the NearID encoder; the set is created on its device.
            references: a float tensor ``[R, 3, H, W]`` with values in ``value_range``, PIL images, uint8 arrays,
                file paths or a folder (files are turned upright from their EXIF orientation).
            negatives: near-identity distractors in the same forms, or None.
            aggregate, value_range: see the class; ``value_range`` applies to tensors only.
            chunk_size: images per encoder call.
        """
        refs, contexts = embed_images_with_context(model, references, value_range=value_range, name="references",
                                                   chunk_size=chunk_size)
        negs = None
        if not _is_empty(negatives):
            negs = embed_images(model, negatives, value_range=value_range, name="negatives", chunk_size=chunk_size)
        return cls(refs, negs, aggregate=aggregate, contexts=contexts)

    # ------------------------------------------------------------------ contents
    @property
    def embed_dim(self) -> int:
        return int(self.references.shape[1])

    @property
    def num_references(self) -> int:
        return int(self.references.shape[0])

    @property
    def num_negatives(self) -> int:
        return int(self.negatives.shape[0])

    @property
    def oracle_tensor(self) -> torch.Tensor:
        """The oracle as a 0-d tensor on the set's device (NaN when R < 2); no device sync."""
        if self.leave_one_out.numel() == 0:
            return torch.full((), float("nan"), dtype=self.leave_one_out.dtype, device=self.leave_one_out.device)
        return self.leave_one_out.mean()

    @property
    def oracle(self) -> float:
        """Mean leave-one-out reference score (NaN with a single reference)."""
        return float(self.oracle_tensor)

    @property
    def oracle_std(self) -> float:
        """Standard deviation of the leave-one-out scores over references (NaN with a single reference)."""
        loo = self.leave_one_out
        return float(loo.std(unbiased=False)) if loo.numel() else math.nan

    @property
    def has_contexts(self) -> bool:
        """Whether the set holds the references' context features (needed by the copy signal)."""
        return self.contexts.numel() > 0

    def set_references(self, embeddings: torch.Tensor, *, contexts: torch.Tensor | None = None) -> None:
        """Replace the reference embeddings ``[R, E]`` (same E) and recompute the oracle.

        ``contexts`` (``[R, D]``) replaces the context features too; without it they are dropped, since they
        described the old references.
        """
        emb = _check_embeddings(embeddings, self.embed_dim, "reference embeddings").detach()
        dtype, device = self.references.dtype, self.references.device
        if contexts is not None:
            contexts = _check_embeddings(contexts, None, "reference context features").detach()
            if contexts.shape[0] != emb.shape[0]:
                raise ValueError(f"reference context features must be [{emb.shape[0]}, D] (one per reference), got "
                                 f"{tuple(contexts.shape)}")
        self.references = emb.to(device=device, dtype=dtype)
        loo = leave_one_out_oracle(emb.float(), self.aggregate) if emb.shape[0] >= 2 else torch.zeros(0)
        self.leave_one_out = loo.to(device=device, dtype=dtype)
        new_contexts = torch.zeros(0, 0) if contexts is None else contexts
        self.contexts = new_contexts.to(device=device, dtype=dtype)

    def set_negatives(self, embeddings: torch.Tensor | None) -> None:
        """Replace the negative embeddings ``[K, E]``; None or ``K = 0`` removes them."""
        if embeddings is None or (isinstance(embeddings, torch.Tensor) and embeddings.ndim == 2
                                  and embeddings.shape[0] == 0):  # fmt: skip
            emb = torch.zeros(0, self.embed_dim)
        else:
            emb = _check_embeddings(embeddings, self.embed_dim, "negative embeddings").detach()
        self.negatives = emb.to(device=self.negatives.device, dtype=self.negatives.dtype)

    def fingerprint(self) -> str:
        """SHA-256 of the embeddings and the aggregation: equal fingerprints give equal scores."""
        digest = hashlib.sha256(self.aggregate.encode())
        for tensor in (self.references, self.negatives):
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    # ------------------------------------------------------------------ scoring
    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Identity score ``[B]`` of embeddings ``[B, E]``: aggregated cosine to the references, in [-1, 1].

        Higher is better. Differentiable w.r.t. ``embeddings``; computed in at least float32.
        """
        dtype = torch.promote_types(embeddings.dtype, torch.float32)
        return reference_scores(embeddings.to(dtype), self.references.to(dtype), self.aggregate)  # [B]

    def negative_scores(self, embeddings: torch.Tensor) -> torch.Tensor | None:
        """``[B]`` maximum cosine to the negatives (lower is better), or None without negatives."""
        if self.num_negatives == 0:
            return None
        dtype = torch.promote_types(embeddings.dtype, torch.float32)
        return reference_scores(embeddings.to(dtype), self.negatives.to(dtype), "max")  # [B]

    def extra_repr(self) -> str:
        return f"references={self.num_references}, negatives={self.num_negatives}, aggregate={self.aggregate!r}"


# ---------------------------------------------------------------------------------------------- helpers
def _is_empty(images: Any) -> bool:
    return images is None or (isinstance(images, (list, tuple)) and len(images) == 0)


def _check_not_empty(images: Any, name: str) -> None:
    empty = (isinstance(images, torch.Tensor) and images.ndim >= 1 and images.shape[0] == 0) or (
        isinstance(images, (list, tuple)) and len(images) == 0
    )
    if empty:
        raise ValueError(f"`{name}` is empty: pass at least one image (a tensor [N, 3, H, W], PIL images or paths)")


def _check_embeddings(embeddings: Any, dim: int | None, name: str) -> torch.Tensor:
    width = "E" if dim is None else str(dim)
    wrong_width = isinstance(embeddings, torch.Tensor) and dim is not None and embeddings.shape[-1] != dim
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2 or wrong_width:
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise ValueError(f"{name} must be a tensor [R, {width}], got {shape}")
    if embeddings.shape[0] == 0:
        raise ValueError(f"{name} are empty: the reference set needs at least one image")
    if not embeddings.is_floating_point():
        raise ValueError(f"{name} must be a float tensor, got dtype {embeddings.dtype}")
    if not torch.isfinite(embeddings).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return embeddings
