"""Turning what users pass (tensors, PIL images, numpy arrays, paths, folders) into validated model inputs."""

from __future__ import annotations

import math
import numbers
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
    "is_high_bit_depth",
    "to_rgb",
    "check_pil_image",
    "to_pil_list",
    "check_value_range",
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


def is_high_bit_depth(image: Image.Image) -> bool:
    """Whether ``image`` holds more than 8 bits per sample: 16-bit (``I;16*``), 32-bit integer (``I``) or float
    (``F``) grayscale, the modes PIL opens 16-bit PNG/TIFF and float TIFF files in."""
    return image.mode in ("I", "F") or image.mode.startswith("I;16")


def to_rgb(image: Image.Image, *, name: str = "image") -> Image.Image:
    """An 8-bit RGB version of any PIL image (the image itself when it already is); high-bit-depth grayscale is
    scaled to 8 bits, not clipped.

    ``image.convert("RGB")`` clips 16-bit and float samples at 255, which turns a 16-bit photograph almost white.
    Here integer modes (``I;16*``, ``I``) are read as 16-bit samples in [0, 65535] and scaled by 255 / 65535 (an
    8-bit image stored as 16 bits, ``v * 257``, comes back exactly), and float images (``F``) are read as [0, 1] and
    scaled by 255, both rounded to the nearest level. Every other mode converts as with ``convert("RGB")``.

    Args:
        image: any PIL image.
        name: how the image is named in error messages.

    Raises:
        ValueError: a high-bit-depth image with values outside its range (or NaN/Inf floats).

    Example:
        >>> import numpy as np
        >>> gray16 = Image.fromarray(np.full((2, 2), 128 * 257, dtype=np.uint16))  # mode I;16
        >>> np.asarray(to_rgb(gray16))[0, 0].tolist()
        [128, 128, 128]
    """
    if not is_high_bit_depth(image):
        return image if image.mode == "RGB" else image.convert("RGB")
    samples = np.asarray(image).astype(np.float64)  # [H, W]
    high = 1.0 if image.mode == "F" else 65535.0
    if samples.size:
        if not np.isfinite(samples).all():
            raise ValueError(f"`{name}` (a float image, mode F) contains NaN or infinite values")
        lo, hi = float(samples.min()), float(samples.max())
        if lo < 0.0 or hi > high:
            kind = "float images (mode F) must have values in" if image.mode == "F" else (
                f"integer images (mode {image.mode}) are read as 16-bit samples and must have values in")
            raise ValueError(f"`{name}`: {kind} [0, {high:g}]; got values in [{lo:g}, {hi:g}]")
    gray = np.rint(samples * (255.0 / high)).astype(np.uint8)  # [H, W]
    return Image.fromarray(gray).convert("RGB")


def check_pil_image(image: Image.Image, name: str = "image") -> Image.Image:
    """Return ``image`` if it has at least one pixel; raise ``ValueError`` naming it otherwise."""
    if image.width == 0 or image.height == 0:
        raise ValueError(f"`{name}` is an empty image (size {image.width}x{image.height}): pass an image with pixels")
    return image


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
            out.append(check_pil_image(item, where))
        elif isinstance(item, (str, os.PathLike)):
            path = Path(item)
            files = list_image_files(path) if path.is_dir() else [path]
            out.extend(check_pil_image(load_image(p), str(p)) for p in files)
        elif isinstance(item, np.ndarray):
            out.append(check_pil_image(_numpy_to_pil(item, where), where))
        elif isinstance(item, torch.Tensor):
            raise TypeError(f"{where} is a tensor inside a list: stack tensors into one [B, 3, H, W] batch instead")
        else:
            raise TypeError(f"{where} must be a PIL image, a uint8 numpy array or a path; got {type(item).__name__}")
    return out


def check_value_range(value_range: Any, name: str = "value_range") -> tuple[float, float]:
    """Validate a ``(low, high)`` pixel range and return it as two floats.

    Raises:
        TypeError: not a tuple/list of two real numbers (e.g. ``255`` or ``"0-1"``).
        ValueError: not two values, not finite, or ``high <= low``.

    Example:
        >>> check_value_range((0, 255))
        (0.0, 255.0)
    """
    expected = f"`{name}` must be a (low, high) pair of numbers such as (0, 1), (-1, 1) or (0, 255)"
    if not isinstance(value_range, (tuple, list)):
        raise TypeError(f"{expected}; got {type(value_range).__name__} {value_range!r}")
    if len(value_range) != 2:
        raise ValueError(f"{expected}; got {len(value_range)} values {tuple(value_range)!r}")
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value_range):
        kinds = ", ".join(type(v).__name__ for v in value_range)
        raise TypeError(f"{expected}; got ({kinds}) {tuple(value_range)!r}")
    low, high = float(value_range[0]), float(value_range[1])
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{expected}; got the non-finite {tuple(value_range)!r}")
    if not high > low:
        raise ValueError(f"`{name}` must be (low, high) with high > low, got {tuple(value_range)!r}")
    return low, high


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
    lo, hi = check_value_range(value_range)
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
            f"value_range={(lo, hi)}{hint}"
        )
