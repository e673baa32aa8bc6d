"""Turning image references into model inputs: decoded pixels (optionally augmented) or cached backbone tokens.

Collate functions here run inside DataLoader workers: they read encoded bytes, decode and preprocess them (pixel
mode) or look tokens up in a :class:`~train_head.cache.FeatureStore` (cached mode). Batches carry a flat
``slot_index`` of the images that are available, so padded or unreadable slots are never encoded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageEnhance

from nearid_reward.config import PreprocessConfig
from nearid_reward.images import to_rgb
from nearid_reward.model import mean_pool_tokens
from nearid_reward.preprocess import PixelInputs, preprocess_pil

from .data import ImageRef, TableRegistry, decode_image, describe_ref

if TYPE_CHECKING:
    from nearid_reward import NearIDModel

    from .cache import FeatureStore

logger = logging.getLogger(__name__)

__all__ = [
    "AugmentConfig",
    "PixelBatcher",
    "CachedBatcher",
    "TrainCollate",
    "batch_tokens",
    "scatter_embeddings",
    "embed_references",
    "mean_pool",
    "gather_eval_arrays",
]


@dataclass
class AugmentConfig:
    """Training-time augmentations (all off by default, as in the paper recipe). Any of them disables the cache.

    Attributes:
        flip_prob: horizontal flip probability per image.
        color_jitter_prob: probability of a colour jitter (brightness/contrast/saturation +-20 %, hue +-0.05).
        translate_prob: probability of an affine shift (+-10 % of the size) and scale (0.9..1.1).
    """

    flip_prob: float = 0.0
    color_jitter_prob: float = 0.0
    translate_prob: float = 0.0

    def __post_init__(self) -> None:
        for name in ("flip_prob", "color_jitter_prob", "translate_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"AugmentConfig.{name} must be in [0, 1], got {value}")

    @property
    def enabled(self) -> bool:
        return self.flip_prob > 0 or self.color_jitter_prob > 0 or self.translate_prob > 0

    def apply(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        image = to_rgb(image)
        if rng.random() < self.flip_prob:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < self.color_jitter_prob:
            for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                image = enhancer(image).enhance(float(rng.uniform(0.8, 1.2)))
            image = _shift_hue(image, float(rng.uniform(-0.05, 0.05)))
        if rng.random() < self.translate_prob:
            w, h = image.size
            scale = float(rng.uniform(0.9, 1.1))
            tx, ty = (float(rng.uniform(-0.1, 0.1)) * w, float(rng.uniform(-0.1, 0.1)) * h)
            cx, cy = w / 2, h / 2
            # inverse map: output pixel -> input pixel
            a, e = 1 / scale, 1 / scale
            c = cx - a * (cx + tx)
            f = cy - e * (cy + ty)
            image = image.transform((w, h), Image.Transform.AFFINE, (a, 0, c, 0, e, f), Image.Resampling.BILINEAR)
        return image


def _shift_hue(image: Image.Image, delta: float) -> Image.Image:
    hsv = np.asarray(image.convert("HSV"), dtype=np.int16)
    hsv[..., 0] = (hsv[..., 0] + int(round(delta * 255))) % 256
    return Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")


class PixelBatcher:
    """Read, decode, (augment) and preprocess referenced images exactly like the model's image processor.

    Args:
        registry: table key -> table, to read the references.
        preprocess: the model's :class:`~nearid_reward.config.PreprocessConfig`.
        augment: optional augmentations, drawn from ``(seed, epoch, index, slot)``.
        seed: augmentation seed.
    """

    def __init__(
        self,
        registry: TableRegistry,
        preprocess: PreprocessConfig,
        *,
        augment: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        self.registry = registry
        self.preprocess = preprocess
        self.augment = augment if augment is not None and augment.enabled else None
        self.seed = seed

    def __call__(
        self, refs: Sequence[ImageRef | None], aug_keys: Sequence[tuple[int, ...]] | None = None
    ) -> dict[str, Any]:
        images: list[Image.Image] = []
        index: list[int] = []
        failed: list[tuple[int, str]] = []
        for pos, ref in enumerate(refs):
            if ref is None:
                continue
            raw = self.registry[ref[0]].read(ref[1], ref[2])
            if raw is None:
                failed.append((pos, f"{describe_ref(self.registry, ref)}: missing image"))
                continue
            try:
                image = decode_image(raw)
            except ValueError as exc:
                failed.append((pos, f"{describe_ref(self.registry, ref)}: {exc}"))
                continue
            if self.augment is not None:
                key = aug_keys[pos] if aug_keys is not None else (pos,)
                image = self.augment.apply(image, np.random.default_rng([self.seed, *key, 31337]))
            images.append(image)
            index.append(pos)
        out: dict[str, Any] = {"slot_index": torch.tensor(index, dtype=torch.long), "failed": failed}
        if images:
            inputs = PixelInputs.concat([preprocess_pil([img], self.preprocess) for img in images])
            out["pixel_values"] = inputs.pixel_values
            out["pixel_attention_mask"] = inputs.pixel_attention_mask
            out["spatial_shapes"] = inputs.spatial_shapes
        return out


class CachedBatcher:
    """Look referenced images up in a feature cache (their final backbone tokens, fp16).

    Args:
        store: the :class:`~train_head.cache.FeatureStore`.
        keys: reference -> content key (references without a key were unreadable when the cache was built).
        registry: table key -> table, to name unreadable images by their file (optional).
    """

    def __init__(
        self, store: FeatureStore, keys: dict[ImageRef, str], registry: TableRegistry | None = None
    ) -> None:
        self.store = store
        self.keys = keys
        self.registry = registry or {}

    def __call__(
        self, refs: Sequence[ImageRef | None], aug_keys: Sequence[tuple[int, ...]] | None = None
    ) -> dict[str, Any]:
        index: list[int] = []
        wanted: list[str] = []
        failed: list[tuple[int, str]] = []
        for pos, ref in enumerate(refs):
            if ref is None:
                continue
            key = self.keys.get(ref)
            if key is None:
                failed.append((pos, f"{describe_ref(self.registry, ref)}: unreadable image"))
                continue
            index.append(pos)
            wanted.append(key)
        out: dict[str, Any] = {"slot_index": torch.tensor(index, dtype=torch.long), "failed": failed}
        if wanted:
            tokens, mask = self.store.get(wanted)
            out["tokens"] = tokens
            out["token_mask"] = mask
        return out


class TrainCollate:
    """Collate :class:`~train_head.data.NearIDTrainDataset` items into one batch.

    Output: ``slot_index`` (flat positions in ``[B * 2V]`` of the available images), the pixels or tokens of those
    images, ``pos_mask`` / ``neg_mask`` ``[B, V]`` and ``failed`` (``(reference, reason)`` of each unreadable
    image). A sample whose anchor is
    unreadable gets its next readable view as anchor (its distractor follows); a sample left with fewer than two
    readable views is masked out entirely.
    """

    def __init__(self, batcher: Callable[..., dict[str, Any]], num_views: int) -> None:
        self.batcher = batcher
        self.num_views = num_views

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        v = self.num_views
        slots = 2 * v
        refs = [r for item in items for r in item["refs"]]
        keys = [(int(item["epoch"]), int(item["index"]), s) for item in items for s in range(slots)]
        out = self.batcher(refs, keys)
        out["failed"] = [(refs[pos], why) for pos, why in out["failed"]]
        b = len(items)
        ok = torch.zeros(b * slots, dtype=torch.bool)
        ok[out["slot_index"]] = True
        ok = ok.view(b, slots)
        # per-row slot permutation that puts a readable view in slot 0 (the distractors follow the same order)
        order = torch.arange(slots).repeat(b, 1)  # [B, 2V] new slot -> old slot
        for row in range(b):
            if not ok[row, 0] and ok[row, 1:v].any():
                j = int(torch.nonzero(ok[row, 1:v])[0]) + 1
                order[row, [0, j]] = order[row, [j, 0]]
                order[row, [v, v + j]] = order[row, [v + j, v]]
        ok = torch.gather(ok, 1, order)
        pos_mask, neg_mask = ok[:, :v].clone(), ok[:, v:].clone()
        keep = pos_mask[:, 0] & (pos_mask.sum(1) >= 2)
        pos_mask &= keep[:, None]
        neg_mask &= keep[:, None]
        # remap flat positions: old flat -> new flat
        inverse = torch.empty_like(order)
        inverse.scatter_(1, order, torch.arange(slots).repeat(b, 1))
        old = out["slot_index"]
        rows = old // slots
        out["slot_index"] = rows * slots + inverse[rows, old % slots]
        out["pos_mask"] = pos_mask  # [B, V]; slot 0 is the anchor
        out["neg_mask"] = neg_mask  # [B, V]; slot k shares view k's background
        out["batch_size"] = b
        out["ids"] = [int(item["index"]) for item in items]
        return out


def batch_tokens(
    batch: dict[str, Any], model: NearIDModel | None, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Final backbone tokens ``[n, N, D]`` (and token mask) of a batch's available images.

    Cached batches carry the tokens; pixel batches run the frozen backbone (no gradient, in its own dtype).
    """
    if "tokens" in batch:
        mask = batch.get("token_mask")
        return batch["tokens"].to(device), None if mask is None else mask.to(device)
    if model is None:
        raise ValueError("a pixel batch needs the model to encode it")
    inputs = PixelInputs(
        batch["pixel_values"].to(device),
        None if batch.get("pixel_attention_mask") is None else batch["pixel_attention_mask"].to(device),
        None if batch.get("spatial_shapes") is None else batch["spatial_shapes"].to(device),
    )
    with torch.no_grad():
        return model.encode_tokens(inputs)


def scatter_embeddings(embeddings: torch.Tensor, slot_index: torch.Tensor, total: int) -> torch.Tensor:
    """Place ``[n, E]`` embeddings at their flat slot positions in a zero ``[total, E]`` tensor (differentiable)."""
    out = embeddings.new_zeros(total, embeddings.shape[-1])
    return out.index_copy(0, slot_index.to(embeddings.device), embeddings)


def mean_pool(tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Masked mean of tokens ``[n, N, D]`` -> unit-norm float32 ``[n, D]`` (the "mean pooling" baseline)."""
    return mean_pool_tokens(tokens, mask)


def embed_references(
    refs: Sequence[ImageRef],
    batcher: Callable[..., dict[str, Any]],
    pool: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    *,
    model: NearIDModel | None,
    device: torch.device | str,
    batch_size: int = 64,
    num_workers: int = 0,
) -> tuple[dict[ImageRef, np.ndarray], list[tuple[ImageRef, str]]]:
    """Embed every reference once (no gradient).

    Args:
        refs: unique references.
        batcher: :class:`PixelBatcher` or :class:`CachedBatcher`.
        pool: tokens ``[n, N, D]`` (+ mask) -> embeddings ``[n, E]`` (the head with normalisation, or
            :func:`mean_pool`).
        model: the model (pixel batches run its backbone).
        device: where to compute.
        batch_size, num_workers: DataLoader settings.

    Returns:
        ``(embeddings by reference (float32 numpy), unreadable references with the reason)``.
    """
    refs = list(refs)
    loader = torch.utils.data.DataLoader(
        range(len(refs)), batch_size=batch_size, num_workers=num_workers,
        collate_fn=_RefChunk(refs, batcher),
    )
    out: dict[ImageRef, np.ndarray] = {}
    failed: list[tuple[ImageRef, str]] = []
    with torch.no_grad():
        for chunk, batch in loader:
            failed.extend((chunk[pos], why) for pos, why in batch["failed"])
            if batch["slot_index"].numel() == 0:
                continue
            tokens, mask = batch_tokens(batch, model, device)
            emb = pool(tokens, mask).float().cpu().numpy()
            for row, pos in enumerate(batch["slot_index"].tolist()):
                out[chunk[pos]] = emb[row]
    return out, failed


class _RefChunk:
    def __init__(self, refs: list[ImageRef], batcher: Callable[..., dict[str, Any]]) -> None:
        self.refs = refs
        self.batcher = batcher

    def __call__(self, positions: list[int]) -> tuple[list[ImageRef], dict[str, Any]]:
        chunk = [self.refs[i] for i in positions]
        return chunk, self.batcher(chunk)


def gather_eval_arrays(
    emb: dict[ImageRef, np.ndarray], refs: Sequence[Sequence[ImageRef | None]], dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """``[N, V, E]`` embeddings and ``[N, V]`` validity from slot-aligned references (missing -> zeros, False)."""
    n, v = len(refs), (len(refs[0]) if refs else 0)
    arr = np.zeros((n, v, dim), dtype=np.float32)
    ok = np.zeros((n, v), dtype=bool)
    for i, row in enumerate(refs):
        for j, ref in enumerate(row):
            if ref is not None and ref in emb:
                arr[i, j] = emb[ref]
                ok[i, j] = True
    return arr, ok

