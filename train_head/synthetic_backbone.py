"""A tiny SigLIP backbone pretrained on the synthetic world: the stand-in for SigLIP's own pretraining.

A random tiny backbone carries little that a head can use. This module gives it a short *generic* pretraining on
the synthetic world, never on the identity task: from single scenes it predicts what a caption would say about
them (the object's shape, colour pattern, part and side, its colours, the background colours, where the object is,
its size, rotation and the lighting) with linear read-outs on the backbone's own pooling head, and, per patch token,
a scene parse (how much of the patch is object body or part, the object's colour there, and the colours, shape,
pattern, part and side of the object it belongs to). The result is then
frozen and saved as an ordinary SigLIP folder (transformers ``save_pretrained`` plus its image processor), so
``NearIDModel.from_pretrained`` and the trainer use it exactly like a real SigLIP checkpoint. Because the read-outs
also describe the scene around the object, the backbone's own head keeps the context, like SigLIP's embedding does.

:func:`pretrain_synthetic_backbone` caches the result on disk: a rerun with the same configuration reuses it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nearid_reward.files import write_json_atomic

from .synthetic_scenes import PARTS, PATTERNS, SHAPES, SIDES, background, render, sample_context, sample_object

logger = logging.getLogger(__name__)

__all__ = ["BackbonePretrainConfig", "pretrain_synthetic_backbone", "register_scene_sampler", "scene_labels",
           "warmup_cosine"]

STAMP = "pretrain_config.json"
OBJECTIVE_VERSION = 3  # bump when the pretraining task changes, so cached backbones are not reused
_CLASSES = {"shape": SHAPES, "pattern": PATTERNS, "part": PARTS, "side": SIDES}
_REGRESSION = 20  # 5 RGB colours + cx, cy, radius, rotation, brightness
_DENSE = 11  # per token: body and part coverage, the object's colour there, its primary and secondary colours


SceneSampler = Callable[[np.random.Generator], tuple[Any, Any]]
# world name -> draws one (SynthObject, SynthContext) scene; other worlds built on the same renderer register theirs
_SCENE_SAMPLERS: dict[str, SceneSampler] = {"nearid": lambda rng: (sample_object(rng), sample_context(rng))}


def register_scene_sampler(name: str, sampler: SceneSampler) -> None:
    """Make ``BackbonePretrainConfig(world=name)`` pretrain on scenes drawn by ``sampler(rng) -> (object, context)``.

    The objects must use this renderer's shapes, patterns, parts and sides (the read-out classes).
    """
    _SCENE_SAMPLERS[name] = sampler


@dataclass
class BackbonePretrainConfig:
    """Size and schedule of the synthetic pretraining.

    Attributes:
        image_size, patch_size: input geometry (``(image_size / patch_size)^2`` tokens).
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads: the SigLIP vision config.
        num_images: rendered training scenes (each a new random object in a new context).
        num_val_images: held-out scenes for the read-out scores saved with the backbone.
        steps, batch_size, learning_rate, weight_decay, warmup_steps: AdamW with a cosine schedule.
        seed: everything is derived from it.
        supersample: rendering supersampling.
        world: which registered scene sampler draws the scenes (:func:`register_scene_sampler`; default the NearID
            world of :mod:`train_head.synthetic`).
    """

    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_images: int = 6000
    num_val_images: int = 512
    steps: int = 1200
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    seed: int = 0
    supersample: int = 2
    world: str = "nearid"

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"BackbonePretrainConfig.image_size ({self.image_size}) must be a multiple of "
                             f"patch_size ({self.patch_size})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("BackbonePretrainConfig.hidden_size must be divisible by num_attention_heads")
        for name in ("num_images", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"BackbonePretrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.world not in _SCENE_SAMPLERS:
            raise ValueError(f"BackbonePretrainConfig.world must be one of {sorted(_SCENE_SAMPLERS)} (see "
                             f"register_scene_sampler), got {self.world!r}")


def scene_labels(obj: Any, ctx: Any) -> tuple[list[int], list[float]]:
    """Class indices (shape, pattern, part, side) and 20 normalised regression targets of one scene."""
    classes = [SHAPES.index(obj.shape), PATTERNS.index(obj.pattern), PARTS.index(obj.part), SIDES.index(obj.part_side)]
    colours = [c for rgb in (obj.primary, obj.secondary, obj.part_colour, ctx.bg_a, ctx.bg_b) for c in rgb]
    reg = [(c - 0.5) * 3.0 for c in colours]
    reg += [(ctx.cx - 0.5) * 4.0, (ctx.cy - 0.5) * 4.0, (ctx.radius - 0.25) * 20.0, ctx.rotation / 0.2,
            (ctx.brightness - 1.0) / 0.09]
    return classes, reg


def _render_pool(
    n: int, config: BackbonePretrainConfig, offset: int, progress: bool = False
) -> dict[str, torch.Tensor]:
    from tqdm.auto import tqdm

    size, patch = config.image_size, config.patch_size
    grid = size // patch
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    classes = np.empty((n, 4), dtype=np.int64)
    targets = np.empty((n, _REGRESSION), dtype=np.float32)
    dense = np.empty((n, grid * grid, _DENSE), dtype=np.float32)
    dense_classes = np.empty((n, grid * grid, 4), dtype=np.int64)
    for i in tqdm(range(n), desc="pretraining scenes", disable=not progress, leave=False):
        rng = np.random.default_rng([config.seed, 5150, offset + i])
        obj, ctx = _SCENE_SAMPLERS[config.world](rng)
        bg = background(ctx, size * config.supersample)
        img, body, part = render(obj, ctx, size, supersample=config.supersample, bg=bg, masks=True)
        images[i] = img
        cls, reg = scene_labels(obj, ctx)
        classes[i] = cls
        targets[i] = reg
        dense[i, :, :5] = _dense_targets(img, body, part, patch)
        dense[i, :, 5:] = np.asarray(reg[:6], dtype=np.float32)  # the object's two colours, on every patch
        # what is in each patch: the body's shape and pattern where it covers a quarter of the patch, the part's
        # type and side where it covers a tenth (-100 = no label)
        body_cover, part_cover = dense[i, :, 0], dense[i, :, 1]
        dense_classes[i] = -100
        dense_classes[i, body_cover >= 0.25, 0] = cls[0]
        dense_classes[i, body_cover >= 0.25, 1] = cls[1]
        dense_classes[i, part_cover >= 0.1, 2] = cls[2]
        dense_classes[i, part_cover >= 0.1, 3] = cls[3]
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # SigLIP normalisation
    return {"pixels": pixels, "classes": torch.from_numpy(classes), "targets": torch.from_numpy(targets),
            "dense": torch.from_numpy(dense), "dense_classes": torch.from_numpy(dense_classes)}


def _dense_targets(img: np.ndarray, body: np.ndarray, part: np.ndarray, patch: int) -> np.ndarray:
    """Per patch: body coverage, part coverage, and the object's mean colour there (normalised)."""
    grid = img.shape[0] // patch

    def pool(a: np.ndarray) -> np.ndarray:
        return a.reshape(grid, patch, grid, patch, *a.shape[2:]).sum(axis=(1, 3))

    cover = np.clip(body + part, 0, 1)
    area = pool(cover)  # [g, g]
    colour = pool(img.astype(np.float32) / 255.0 * cover[..., None]) / np.maximum(area, 1e-6)[..., None]
    out = np.concatenate([pool(body)[..., None] / patch**2, pool(part)[..., None] / patch**2,
                          (colour - 0.5) * 3.0], axis=-1)
    return out.reshape(grid * grid, 5)


def _loss(readout: torch.nn.Linear, dense_readout: torch.nn.Linear, pooled: torch.Tensor, tokens: torch.Tensor,
          batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Scene read-outs from the pooled output plus the per-patch parse from the tokens; returns (loss, scores)."""
    logits = readout(pooled)
    classes = batch["classes"]
    losses, correct, start = [], [], 0
    for k, names in enumerate(_CLASSES.values()):
        part = logits[:, start:start + len(names)]
        losses.append(F.cross_entropy(part, classes[:, k]))
        correct.append((part.argmax(1) == classes[:, k]).float().mean())
        start += len(names)
    reg = F.mse_loss(logits[:, start:], batch["targets"])
    dense = dense_readout(tokens)  # [B, N, 5 + classes]
    target = batch["dense"]
    cover = (target[..., 0] + target[..., 1]).clamp(max=1.0).unsqueeze(-1)  # where the object is
    coverage_loss = F.mse_loss(dense[..., :2], target[..., :2]) * 10.0
    colour_loss = ((dense[..., 2:_DENSE] - target[..., 2:]) ** 2 * cover).sum() / cover.sum().clamp(min=1.0) / 9.0
    dense_losses, dense_correct, start = [], [], _DENSE
    labels = batch["dense_classes"]  # [B, N, 4], -100 = no label
    for k, names in enumerate(_CLASSES.values()):
        part = dense[..., start:start + len(names)].reshape(-1, len(names))
        target_k = labels[..., k].reshape(-1)
        start += len(names)
        labelled = target_k >= 0
        if bool(labelled.any()):
            dense_losses.append(F.cross_entropy(part[labelled], target_k[labelled]))
            dense_correct.append((part[labelled].argmax(1) == target_k[labelled]).float().mean())
        else:
            dense_losses.append(part.sum() * 0.0)
            dense_correct.append(torch.zeros(()))
    total = sum(losses) + reg + coverage_loss + colour_loss + sum(dense_losses)
    return total, correct + [reg, coverage_loss / 10.0] + dense_correct


def warmup_cosine(step: int, total: int, warmup: int, *, floor: float = 0.0) -> float:
    """Learning-rate factor at ``step`` of ``total``: linear warm-up over ``warmup`` steps, then a half cosine from 1
    down to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def pretrain_synthetic_backbone(
    output_dir: str | os.PathLike[str], config: BackbonePretrainConfig | None = None, *, force: bool = False,
    progress: bool = False,
) -> Path:
    """Pretrain (or reuse) a tiny SigLIP backbone on the synthetic world and save it as a SigLIP folder.

    Args:
        output_dir: where the SigLIP folder is written (``config.json``, ``model.safetensors``,
            ``preprocessor_config.json``, and ``pretrain_config.json`` with the settings and read-out scores).
        config: the pretraining settings (default :class:`BackbonePretrainConfig`).
        force: retrain even when a matching folder exists.
        progress: show tqdm progress bars for rendering the scenes and for the training steps.

    Returns:
        ``output_dir``, loadable with ``NearIDModel.from_pretrained`` (its own head is the frozen baseline).
    """
    from tqdm.auto import tqdm
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    config = config or BackbonePretrainConfig()
    out = Path(output_dir)
    wanted = dataclasses.asdict(config)
    stamp = out / STAMP
    if not force and stamp.is_file() and (out / "model.safetensors").is_file():
        stored = json.loads(stamp.read_text(encoding="utf-8"))
        # backbones cached before the ``world`` option existed were NearID-world ones
        same = {"world": "nearid", **stored.get("config", {})} == wanted
        if same and stored.get("objective_version") == OBJECTIVE_VERSION:
            logger.info("reusing the pretrained synthetic backbone in %s", out)
            return out
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    vision = SiglipVisionConfig(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        image_size=config.image_size, patch_size=config.patch_size, vision_use_head=True,
    )
    vision._attn_implementation = "eager"  # faster than sdpa for these tiny sequences on the CPU (backward too)
    model = SiglipVisionModel(vision)
    n_out = sum(len(v) for v in _CLASSES.values()) + _REGRESSION
    readout = torch.nn.Linear(config.hidden_size, n_out)
    dense_readout = torch.nn.Linear(config.hidden_size, _DENSE + sum(len(v) for v in _CLASSES.values()))
    pool = _render_pool(config.num_images, config, 0, progress=progress)
    val = _render_pool(config.num_val_images, config, 10**7)
    render_seconds = time.perf_counter() - started
    params = list(model.parameters()) + list(readout.parameters()) + list(dense_readout.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)

    def lr_at(step: int) -> float:
        return warmup_cosine(step, config.steps, config.warmup_steps)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    order = torch.randperm(config.num_images, generator=generator)
    cursor = 0
    for step in tqdm(range(config.steps), desc="backbone pretraining", disable=not progress, leave=False):
        if cursor + config.batch_size > config.num_images:
            order = torch.randperm(config.num_images, generator=generator)
            cursor = 0
        idx = order[cursor:cursor + config.batch_size]
        cursor += config.batch_size
        batch = {k: v[idx] for k, v in pool.items()}
        result = model(pixel_values=batch["pixels"])
        loss, _ = _loss(readout, dense_readout, result.pooler_output, result.last_hidden_state, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if step % 200 == 0 or step == config.steps - 1:
            logger.info("synthetic backbone pretraining: step %d/%d loss %.4f", step + 1, config.steps, loss.item())
    model.eval()
    scores = []
    with torch.no_grad():
        for i in range(0, config.num_val_images, 128):
            batch = {k: v[i:i + 128] for k, v in val.items()}
            result = model(pixel_values=batch["pixels"])
            scores.append(torch.stack(_loss(readout, dense_readout, result.pooler_output,
                                            result.last_hidden_state, batch)[1]))
    names = [*_CLASSES, "scene_mse", "coverage_mse", *(f"patch_{k}" for k in _CLASSES)]
    readout_scores = {name: round(float(v), 4) for name, v in zip(names, torch.stack(scores).mean(0))}
    out.mkdir(parents=True, exist_ok=True)
    model.config._attn_implementation = "sdpa"
    model.save_pretrained(str(out))
    SiglipImageProcessorPil(
        size={"height": config.image_size, "width": config.image_size}, resample=3,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(str(out))
    seconds = time.perf_counter() - started
    write_json_atomic(stamp, {"config": wanted, "objective_version": OBJECTIVE_VERSION,
                              "held_out_readout": readout_scores, "seconds": round(seconds, 2),
                              "render_seconds": round(render_seconds, 2)})
    logger.info("pretrained the synthetic backbone in %.1f s (held-out read-out %s): %s", seconds, readout_scores,
                out)
    return out
