"""Builders for tiny random NearID models in every checkpoint format, for tests and CI (no downloads).

Example:
    >>> import tempfile
    >>> from nearid_reward import NearIDModel
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     model = NearIDModel.from_pretrained(save_tiny_nearid(tmp, format="head"))
    >>> model.embed(random_images(2, 48)).shape  # [B, E]: 32-d embeddings
    torch.Size([2, 32])
    >>> tiny_nearid_model().embed_dim  # the same model, built in one call
    32
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedConfig, Siglip2VisionConfig, SiglipConfig, SiglipVisionConfig

from ..model import NearIDModel

__all__ = [
    "tiny_vision_config",
    "save_tiny_siglip",
    "save_tiny_nearid",
    "tiny_nearid_model",
    "perturb_head",
    "random_images",
    "write_random_images",
]

TinyFormat = Literal["head", "release", "siglip"]


def tiny_vision_config(kind: Literal["siglip", "siglip2"] = "siglip", **overrides: Any) -> PreTrainedConfig:
    """A small SigLIP (fixed 32 px, patch 8 -> 16 tokens) or SigLIP2 NaFlex (patch 8, 16 patches) vision config.

    Keyword overrides replace any field (e.g. ``hidden_size=64, num_hidden_layers=4, image_size=64``).
    """
    base: dict[str, Any] = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
        vision_use_head=True,
    )
    if kind == "siglip":
        base["image_size"] = 32
        base.update(overrides)
        return SiglipVisionConfig(**base)
    base["num_patches"] = 16
    base.update(overrides)
    return Siglip2VisionConfig(**base)


def _save_processor(folder: Path, kind: str, config: PreTrainedConfig, resample: int | None) -> None:
    from transformers import Siglip2ImageProcessorPil, SiglipImageProcessorPil

    if kind == "siglip":
        proc: Any = SiglipImageProcessorPil(
            size={"height": config.image_size, "width": config.image_size},
            resample=3 if resample is None else resample,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )
    else:
        proc = Siglip2ImageProcessorPil(
            patch_size=config.patch_size,
            max_num_patches=config.num_patches,
            resample=2 if resample is None else resample,
        )
    proc.save_pretrained(str(folder))


def save_tiny_siglip(
    folder: str | os.PathLike[str],
    *,
    kind: Literal["siglip", "siglip2"] = "siglip",
    with_text: bool = False,
    seed: int = 0,
    resample: int | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a random tiny SigLIP checkpoint with transformers' own ``save_pretrained`` (+ its image processor).

    Args:
        folder: output folder.
        kind: ``"siglip"`` (fixed resolution, ``SiglipVisionModel``) or ``"siglip2"`` (NaFlex).
        with_text: write a full vision+text ``SiglipModel`` checkpoint instead of a vision-only one (SigLIP only).
        seed: weight seed.
        resample: PIL resample code of the processor (default: bicubic for SigLIP, bilinear for SigLIP2).
    """
    from transformers import Siglip2VisionModel, SiglipModel, SiglipVisionModel

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    vision = tiny_vision_config(kind, **config_overrides)
    torch.manual_seed(seed)
    if with_text:
        if kind != "siglip":
            raise ValueError("with_text=True is supported for kind='siglip' only")
        text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
                    max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model: Any = SiglipModel(SiglipConfig(vision_config=vision.to_dict(), text_config=text))
    else:
        model = (SiglipVisionModel if kind == "siglip" else Siglip2VisionModel)(vision)
    model.save_pretrained(str(out))
    _save_processor(out, kind, vision, resample)
    return out


@torch.no_grad()
def perturb_head(model: NearIDModel, *, seed: int = 1, scale: float = 0.5) -> None:
    """Move the head away from the backbone's own head (stands in for a trained NearID head)."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.head.parameters():
        noise = torch.randn(param.shape, generator=generator).to(param.dtype)
        param.add_(noise * scale * (param.detach().float().std().item() if param.numel() > 1 else 1.0))


def save_tiny_nearid(
    folder: str | os.PathLike[str],
    *,
    format: TinyFormat = "head",
    kind: Literal["siglip", "siglip2"] = "siglip",
    seed: int = 0,
    head_seed: int = 1,
    **config_overrides: Any,
) -> Path:
    """Write a tiny NearID model in one of the three formats and return the path to pass to ``from_pretrained``.

    * ``"siglip"``: a plain tiny SigLIP folder (the frozen baseline) at ``folder``.
    * ``"head"``: the backbone at ``folder/backbone`` and a perturbed head at ``folder/head`` (returned).
    * ``"release"``: the official release layout at ``folder`` (fp16 weights, perturbed head).
    """
    out = Path(folder)
    if format == "siglip":
        return save_tiny_siglip(out, kind=kind, seed=seed, **config_overrides)
    if format == "head":
        backbone_dir = save_tiny_siglip(out / "backbone", kind=kind, seed=seed, **config_overrides)
        model = NearIDModel.from_pretrained(backbone_dir)
        perturb_head(model, seed=head_seed)
        return model.save_pretrained(out / "head", format="head")
    if format == "release":
        with tempfile.TemporaryDirectory() as tmp:
            src = save_tiny_siglip(Path(tmp) / "backbone", kind=kind, seed=seed, **config_overrides)
            model = NearIDModel.from_pretrained(src)
        perturb_head(model, seed=head_seed)
        return model.save_pretrained(out, format="release")
    raise ValueError(f"format must be 'head', 'release' or 'siglip', got {format!r}")


def tiny_nearid_model(
    *, kind: Literal["siglip", "siglip2"] = "siglip", seed: int = 0, head_seed: int = 1, **config_overrides: Any
) -> NearIDModel:
    """A tiny NearID model (head-only format, saved to a temporary folder and loaded back), for examples and tests.

    Same weights as ``NearIDModel.from_pretrained(save_tiny_nearid(folder, format="head", ...))``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = save_tiny_nearid(tmp, format="head", kind=kind, seed=seed, head_seed=head_seed, **config_overrides)
        return NearIDModel.from_pretrained(path)


def random_images(n: int, size: int | tuple[int, int] = 48, *, seed: int = 0) -> torch.Tensor:
    """``[n, 3, H, W]`` smooth random images in [0, 1] (low-frequency blobs, so resizing is meaningful)."""
    h, w = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(2, h // 8), max(2, w // 8), generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)


def write_random_images(
    folder: str | os.PathLike[str], n: int, size: int | tuple[int, int] = 48, *, seed: int = 0, prefix: str = "img"
) -> list[Path]:
    """Write ``n`` random PNG images to ``folder`` and return their paths."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    images = random_images(n, size, seed=seed)
    paths = []
    for i, img in enumerate(images):
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        path = out / f"{prefix}_{i:03d}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths
