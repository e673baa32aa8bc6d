"""Scoring a batch in which each sample may bring its own reference photos (the RL-framework adapters' core).

Flow-Factory hands a reward model one list of generated images plus, for subject-driven editing, the condition images
of each sample; the reward server receives the same shape over HTTP. :class:`PerSampleReward` scores such a batch
with :class:`~nearid_reward.IdentityReward` (one way to score): the images are embedded once, a sample without its own
references is scored against the shared reference set, and a sample with references is scored by an
``IdentityReward`` over a :class:`~nearid_reward.ReferenceSet` of its own (same aggregation, kind and negatives).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from nearid_reward import IdentityReward, NearIDModel, ReferenceSet, RewardConfig
from nearid_reward.images import ImageInput
from nearid_reward.model import as_nearid_model
from nearid_reward.references import embed_images

logger = logging.getLogger(__name__)

__all__ = ["PerSampleReward"]

#: One sample's references: a float tensor ``[N, 3, H, W]``, a list of ``(3, H, W)`` tensors or PIL images, paths.
SampleReferences = Any


class PerSampleReward:
    """Identity rewards ``[B]`` of a batch, each sample against its own references or the shared ones.

    Args:
        model: a :class:`~nearid_reward.NearIDModel` or a checkpoint folder / hub id.
        references: the shared reference photos (any :class:`~nearid_reward.IdentityReward` image input: a folder,
            files, PIL images, a float tensor ``[R, 3, H, W]``), or None when every sample brings its own.
        negatives: optional near-identity distractors, applied to every sample.
        config: the :class:`~nearid_reward.RewardConfig` (aggregation, kind, penalty weight, backbone dtype).

    Images are float tensors with values in [0, 1] (a ``[B, 3, H, W]`` batch or a list of ``(3, H, W)``
    tensors, sizes may differ) or PIL images. Rewards are float32, higher is better, and equal
    ``IdentityReward(model, refs)(images)`` sample by sample.

    Example:
        >>> from nearid_reward.testing import random_images, tiny_nearid_model
        >>> scorer = PerSampleReward(tiny_nearid_model(), random_images(3, 48, seed=1))
        >>> images = list(random_images(2, 64, seed=2))  # two (3, H, W) tensors in [0, 1]
        >>> own = [None, random_images(2, 48, seed=3)]  # sample 1 brings its own references
        >>> scorer.score(images, own).shape
        torch.Size([2])
    """

    def __init__(
        self,
        model: NearIDModel | str | os.PathLike[str],
        references: ImageInput | None,
        *,
        negatives: ImageInput | None = None,
        config: RewardConfig | None = None,
    ) -> None:
        self.config = config or RewardConfig()
        self.model = as_nearid_model(model, torch_dtype=self.config.torch_backbone_dtype)
        self.shared: IdentityReward | None = None
        self._own: IdentityReward | None = None  # scores samples with their own references (see _own_reward)
        if references is not None:
            self.shared = IdentityReward(self.model, references, negatives=negatives, config=self.config)
            self.model = self.shared.model  # cast to the backbone dtype and frozen by IdentityReward
            self.negatives: torch.Tensor | None = (
                self.shared.negative_embeddings if self.shared.num_negatives else None
            )
        else:  # the model set-up IdentityReward does, without a reference set to build it with
            if self.config.pooling is not None:
                self.model = self.model.with_pooling(self.config.pooling)
            dtype = self.config.torch_backbone_dtype
            if dtype is not None and self.model.dtype != dtype:
                self.model.backbone.to(dtype)
            self.model.requires_grad_(False).train(False)
            self.negatives = None
            if negatives is not None:
                self.negatives = embed_images(self.model, negatives, value_range=self.config.reference_value_range,
                                              name="negatives", chunk_size=self.config.reference_chunk_size)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def num_references(self) -> int:
        """References of the shared set (0 without one)."""
        return 0 if self.shared is None else self.shared.num_references

    def to(self, device: torch.device | str) -> PerSampleReward:
        """Move the encoder and the cached embeddings to ``device``."""
        self.model.to(device)
        self._own = None  # rebuilt on the new device when next needed
        if self.shared is not None:
            self.shared.to(device)
            self.negatives = self.shared.negative_embeddings if self.shared.num_negatives else None
        elif self.negatives is not None:
            self.negatives = self.negatives.to(device)
        return self

    # ------------------------------------------------------------------ embedding
    @torch.no_grad()
    def embed(self, images: Any, *, name: str = "image") -> torch.Tensor:
        """Embeddings ``[B, E]`` (float32, unit norm) of ``[B, 3, H, W]``, ``(3, H, W)`` tensors or PIL images."""
        chunk, check = self.config.chunk_size, self.config.check_inputs  # as IdentityReward.score embeds tensors
        if isinstance(images, torch.Tensor):
            if images.ndim != 4:
                raise ValueError(f"`{name}` must be a [B, 3, H, W] tensor or a list of (3, H, W) tensors, "
                                 f"got a tensor of shape {tuple(images.shape)}")
            return self.model.embed(images, chunk_size=chunk, check_inputs=check).float()
        items = list(images) if isinstance(images, Sequence) else None
        if not items:
            raise ValueError(f"`{name}` must be a non-empty list of images, got {type(images).__name__}"
                             + ("" if items is None else " of length 0"))
        if all(isinstance(x, torch.Tensor) for x in items):
            for i, x in enumerate(items):
                if x.ndim != 3 or x.shape[0] != 3:
                    raise ValueError(f"`{name}[{i}]` must be a (3, H, W) tensor in [0, 1], got shape {tuple(x.shape)}")
            if len({tuple(x.shape) for x in items}) == 1:
                return self.model.embed(torch.stack(items), chunk_size=chunk, check_inputs=check).float()  # [B, E]
            return torch.cat([self.model.embed(x[None], chunk_size=chunk, check_inputs=check).float() for x in items])
        if any(isinstance(x, torch.Tensor) for x in items):
            raise TypeError(f"`{name}` mixes tensors and other images: pass all tensors or all PIL images")
        return embed_images(self.model, items, name=name, chunk_size=chunk)

    def _embed_references(self, groups: list[tuple[int, SampleReferences]]) -> list[torch.Tensor]:
        """Reference embeddings ``[N_i, E]`` of each sample's group, in one encoder pass when the groups allow it."""
        tensors = [_as_tensor_group(refs) for _, refs in groups]
        flat: Any = None
        if all(t is not None for t in tensors) and len({tuple(t.shape[1:]) for t in tensors}) == 1:  # type: ignore[union-attr]
            flat = torch.cat(tensors)  # type: ignore[arg-type]
        elif all(_is_pil_group(refs) for _, refs in groups):
            flat = [img for _, refs in groups for img in _as_list(refs)]
        if flat is None:  # mixed sizes or kinds: one pass per sample (and per image for tensors of mixed sizes)
            return [self._embed_group(refs, f"condition_images[{i}]") for i, refs in groups]
        name = "condition_images" if len(groups) > 1 else f"condition_images[{groups[0][0]}]"
        emb = embed_images(self.model, flat, name=name, value_range=self.config.reference_value_range,
                           chunk_size=self.config.reference_chunk_size)  # [sum N_i, E]
        sizes = [len(t) if t is not None else len(_as_list(refs)) for t, (_, refs) in zip(tensors, groups)]
        return list(emb.split(sizes))

    def _embed_group(self, refs: SampleReferences, name: str) -> torch.Tensor:
        items = _as_list(refs)
        if any(isinstance(x, torch.Tensor) for x in items):
            if not all(isinstance(x, torch.Tensor) and x.ndim == 3 for x in items):
                raise TypeError(f"`{name}` must be all (3, H, W) tensors or all PIL images / paths")
            value_range = self.config.reference_value_range
            return torch.cat([embed_images(self.model, x[None], name=name, value_range=value_range) for x in items])
        return embed_images(self.model, refs, name=name, value_range=self.config.reference_value_range,
                            chunk_size=self.config.reference_chunk_size)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score(self, images: Any, references: Sequence[SampleReferences | None] | None = None) -> torch.Tensor:
        """Rewards ``[B]`` (float32, on the model's device; higher is better).

        Args:
            images: ``[B, 3, H, W]`` float in [0, 1], a list of B ``(3, H, W)`` tensors, or B PIL images.
            references: None (every sample against the shared set) or B entries, each None / empty (the shared
                set) or that sample's references (``[N, 3, H, W]`` tensor, list of tensors, PIL images or paths).

        Raises:
            ValueError: a sample has no references and there is no shared set; lengths differ; bad shapes.
        """
        embeddings = self.embed(images)  # [B, E]
        batch = embeddings.shape[0]
        if references is None:
            references = [None] * batch
        if len(references) != batch:
            raise ValueError(f"`condition_images` must have one entry per image ({batch}), got {len(references)}")
        own = [(i, refs) for i, refs in enumerate(references) if not _is_empty(refs)]
        shared_rows = [i for i in range(batch) if _is_empty(references[i])]
        if shared_rows and self.shared is None:
            raise ValueError(
                f"no references for sample(s) {shared_rows}: give the reward a reference set (reference_dir / "
                "--nearid_reference_dir) or pass each sample's references as condition_images"
            )
        rewards = torch.empty(batch, dtype=torch.float32, device=embeddings.device)
        if shared_rows:
            rows = torch.tensor(shared_rows, device=embeddings.device)
            rewards[rows] = self.shared.score_embeddings(embeddings[rows]).reward.float()  # type: ignore[union-attr]
        if own:
            for (i, _), ref_emb in zip(own, self._embed_references(own)):
                reward = self._own_reward(ref_emb)
                rewards[i] = reward.score_embeddings(embeddings[i : i + 1]).reward.float()[0]
        return rewards

    def _own_reward(self, ref_emb: torch.Tensor) -> IdentityReward:
        """The ``IdentityReward`` of one sample's reference embeddings ``[N, E]`` (same aggregation, kind and
        negatives). Built once and given each sample's embeddings in turn: constructing an ``IdentityReward``
        walks every encoder weight (freezing, device and mode), too much to repeat per sample and per step. Not
        thread-safe; the server scores one batch at a time under its lock."""
        if self._own is None:
            refs = ReferenceSet(ref_emb, self.negatives, aggregate=self.config.aggregate)
            self._own = IdentityReward(self.model, refs, config=self.config)
        else:
            self._own.set_reference_embeddings(ref_emb)
        return self._own


def _is_empty(refs: Any) -> bool:
    if refs is None:
        return True
    if isinstance(refs, torch.Tensor):
        return refs.numel() == 0
    return isinstance(refs, (list, tuple)) and len(refs) == 0


def _as_list(refs: Any) -> list[Any]:
    if isinstance(refs, torch.Tensor):
        return list(refs)
    return list(refs) if isinstance(refs, (list, tuple)) else [refs]


def _is_pil_group(refs: Any) -> bool:
    return all(isinstance(x, Image.Image) for x in _as_list(refs))


def _as_tensor_group(refs: Any) -> torch.Tensor | None:
    """A sample's tensor references as ``[N, 3, H, W]`` (None for PIL images, paths or mixed sizes)."""
    if isinstance(refs, torch.Tensor):
        if refs.ndim == 3:
            return refs[None]
        if refs.ndim != 4:
            raise ValueError(f"a sample's condition images must be [N, 3, H, W], got shape {tuple(refs.shape)}")
        return refs
    items = _as_list(refs)
    if items and all(isinstance(x, torch.Tensor) and x.ndim == 3 for x in items):
        if len({tuple(x.shape) for x in items}) == 1:
            return torch.stack(items)
    return None
