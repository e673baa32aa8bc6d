"""Turning what users pass (tensors, PIL images, numpy arrays, paths, folders) into validated model inputs."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageInput",
    "IMAGE_SUFFIXES",
    "list_image_files",
    "load_image",
    "to_pil_list",
    "check_image_tensor",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# A float tensor [B, 3, H, W]; or one/several PIL images, uint8 numpy arrays [H, W, 3] or paths (files or folders).
ImageInput: TypeAlias = "torch.Tensor | Image.Image | np.ndarray | str | os.PathLike[str] | Sequence[Any]"


def list_image_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files directly inside ``folder`` (sorted by name); raises if there are none."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder {root} contains no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image file fully (so the file handle is closed), turned upright, or raise a clear error.

    An EXIF orientation tag (phone photos) is applied with ``ImageOps.exif_transpose``, as the diffusers DreamBooth
    scripts do with ``--instance_data_dir``: references are scored the way the subject was trained on.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"image file not found: {file}")
    try:
        with Image.open(file) as img:
            img.load()
            return ImageOps.exif_transpose(img)  # a transposed copy, or a plain copy without a tag
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"could not read image file {file}: {exc}") from exc


def _numpy_to_pil(array: np.ndarray, where: str) -> Image.Image:
    if array.dtype != np.uint8:
        raise TypeError(
            f"{where}: numpy images must be uint8 [H, W, 3] (or [H, W]); got dtype {array.dtype} and shape "
            f"{tuple(array.shape)}. For float data pass a torch tensor [B, 3, H, W] with a value_range."
        )
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
        return Image.fromarray(array)
    raise ValueError(f"{where}: numpy images must have shape [H, W, 3], [H, W, 4] or [H, W]; got {tuple(array.shape)}")


def to_pil_list(images: Any, *, name: str = "images") -> list[Image.Image]:
    """Coerce PIL images, uint8 numpy arrays and paths (files or folders) into a non-empty list of PIL images."""
    if isinstance(images, (Image.Image, str, os.PathLike)) or (isinstance(images, np.ndarray) and images.ndim <= 3):
        items: list[Any] = [images]
    elif isinstance(images, np.ndarray):  # a stack [B, H, W, C] of uint8 images
        items = list(images)
    elif isinstance(images, Sequence):
        items = list(images)
    else:
        raise TypeError(
            f"`{name}` must be a float tensor [B, 3, H, W], PIL images, uint8 numpy arrays or paths; "
            f"got {type(images).__name__}"
        )
    if not items:
        raise ValueError(f"`{name}` is empty: pass at least one image")
    out: list[Image.Image] = []
    for i, item in enumerate(items):
        where = f"{name}[{i}]"
        if isinstance(item, Image.Image):
            out.append(item)
        elif isinstance(item, (str, os.PathLike)):
            path = Path(item)
            if path.is_dir():
                out.extend(load_image(p) for p in list_image_files(path))
            else:
                out.append(load_image(path))
        elif isinstance(item, np.ndarray):
            out.append(_numpy_to_pil(item, where))
        elif isinstance(item, torch.Tensor):
            raise TypeError(f"{where} is a tensor inside a list: stack tensors into one [B, 3, H, W] batch instead")
        else:
            raise TypeError(f"{where} must be a PIL image, a uint8 numpy array or a path; got {type(item).__name__}")
    return out


def check_image_tensor(
    images: torch.Tensor,
    *,
    value_range: tuple[float, float] = (0.0, 1.0),
    name: str = "images",
    check_values: bool = True,
) -> None:
    """Validate a float image batch; raise ``TypeError``/``ValueError`` naming what was expected and what came.

    Args:
        images: expected ``[B, 3, H, W]`` float, B >= 1.
        value_range: the declared ``(low, high)``; values far outside it (by more than 10% of its width) are
            taken as a contradiction, e.g. 0..255 data declared as (0, 1).
        name: the argument name used in messages.
        check_values: also check for NaN/Inf and the value range (one device sync).
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(images).__name__}")
    if not (images.is_floating_point()):
        raise TypeError(
            f"`{name}` must be a float tensor, got dtype {images.dtype}; convert with `.float()` and pass "
            f"value_range=(0, 255) for 8-bit data"
        )
    if images.ndim != 4:
        hint = " (add a batch dimension with images[None])" if images.ndim == 3 else ""
        raise ValueError(f"`{name}` must be [B, 3, H, W], got shape {tuple(images.shape)}{hint}")
    if images.shape[1] != 3:
        raise ValueError(f"`{name}` must have 3 (RGB) channels in dim 1, got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"`{name}` is an empty batch (shape {tuple(images.shape)}): pass at least one image")
    if images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"`{name}` has an empty spatial size: shape {tuple(images.shape)}")
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    if not check_values:
        return
    vmin, vmax = torch.stack(torch.aminmax(images.detach().float())).tolist()
    if math.isnan(vmin) or math.isnan(vmax):
        raise ValueError(f"`{name}` contains NaN values")
    if abs(vmin) == float("inf") or abs(vmax) == float("inf"):
        raise ValueError(f"`{name}` contains infinite values")
    slack = 0.1 * (hi - lo)
    if vmin < lo - slack or vmax > hi + slack:
        guess = "(0, 255)" if vmax > 2.0 else "(-1, 1)" if vmin < -0.1 else None
        hint = f"; did you mean value_range={guess}?" if guess else ""
        raise ValueError(
            f"`{name}` has values in [{vmin:.4g}, {vmax:.4g}], which contradicts "
            f"value_range={tuple(value_range)}{hint}"
        )
