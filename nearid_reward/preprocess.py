"""Image preprocessing for SigLIP backbones: a differentiable tensor path and an exact PIL path.

* :func:`preprocess_tensor` reproduces the checkpoint's image processor with tensor ops (antialiased resize with the
  processor's filter, rescale, normalise; NaFlex patchify), so gradients flow from the embedding to the pixels.
* :func:`preprocess_pil` matches transformers' ``SiglipImageProcessor`` / ``Siglip2ImageProcessor`` exactly
  (PIL resize of 8-bit images, then rescale and normalise in float32).

The two paths differ only where PIL rounds the resized image to 8 bits; ``tests/test_preprocess.py`` pins the size
of that difference on real photographs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import RESAMPLE_NAMES, PreprocessConfig
from .images import check_pil_image, check_value_range, is_high_bit_depth, to_rgb

__all__ = ["PixelInputs", "preprocess_tensor", "preprocess_pil", "naflex_target_size", "patchify"]

_TORCH_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


@dataclass
class PixelInputs:
    """Model-ready inputs.

    Attributes:
        pixel_values: ``[B, 3, H, W]`` for fixed-resolution backbones, or ``[B, N, P*P*3]`` patches for NaFlex.
        pixel_attention_mask: ``[B, N]`` (1 = real patch) for NaFlex, else ``None``.
        spatial_shapes: ``[B, 2]`` patch grid (rows, cols) per image for NaFlex, else ``None``.
    """

    pixel_values: torch.Tensor
    pixel_attention_mask: torch.Tensor | None = None
    spatial_shapes: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> PixelInputs:
        return PixelInputs(
            self.pixel_values.to(device),
            None if self.pixel_attention_mask is None else self.pixel_attention_mask.to(device),
            None if self.spatial_shapes is None else self.spatial_shapes.to(device),
        )

    def __len__(self) -> int:
        return int(self.pixel_values.shape[0])

    def slice(self, start: int, stop: int) -> PixelInputs:
        return PixelInputs(
            self.pixel_values[start:stop],
            None if self.pixel_attention_mask is None else self.pixel_attention_mask[start:stop],
            None if self.spatial_shapes is None else self.spatial_shapes[start:stop],
        )

    @classmethod
    def concat(cls, items: Sequence[PixelInputs]) -> PixelInputs:
        """Stack several inputs along the batch dimension, in order.

        Fixed-resolution inputs ``[B_i, 3, H, W]`` are concatenated to ``[sum B_i, 3, H, W]``. NaFlex inputs
        ``[B_i, N_i, P*P*3]`` are right-padded with zero patches to the longest ``N = max N_i`` and their masks
        ``[B_i, N_i]`` with zeros (padding is masked out), giving ``[sum B_i, N, P*P*3]``, ``[sum B_i, N]`` and
        spatial shapes ``[sum B_i, 2]``.

        Raises:
            ValueError: ``items`` is empty, or mixes NaFlex and fixed-resolution inputs.

        Example:
            >>> a = PixelInputs(torch.zeros(2, 3, 8, 8)); b = PixelInputs(torch.ones(1, 3, 8, 8))
            >>> PixelInputs.concat([a, b]).pixel_values.shape
            torch.Size([3, 3, 8, 8])
        """
        items = list(items)
        if not items:
            raise ValueError("PixelInputs.concat: expected at least one PixelInputs, got none")
        naflex = [p.pixel_attention_mask is not None for p in items]
        if any(naflex) != all(naflex):
            raise ValueError("PixelInputs.concat: cannot mix NaFlex inputs (with pixel_attention_mask) and "
                             f"fixed-resolution inputs; got masks on items {[i for i, m in enumerate(naflex) if m]}")
        if not naflex[0]:
            return cls(torch.cat([p.pixel_values for p in items]))
        longest = max(p.pixel_values.shape[1] for p in items)
        values, masks = [], []
        for p in items:
            pad = longest - p.pixel_values.shape[1]
            values.append(F.pad(p.pixel_values, (0, 0, 0, pad)))  # [B_i, N, P*P*3]
            masks.append(F.pad(p.pixel_attention_mask, (0, pad)))  # type: ignore[arg-type]  # [B_i, N]
        shapes = torch.cat([p.spatial_shapes for p in items])  # type: ignore[misc]  # [B, 2]
        return cls(torch.cat(values), torch.cat(masks), shapes)


def naflex_target_size(height: int, width: int, patch_size: int, max_num_patches: int) -> tuple[int, int]:
    """The size a NaFlex processor resizes an image to: the largest scale whose patch grid fits the budget.

    Both sides are rounded up to a multiple of ``patch_size`` (at least one patch); the scale is found by bisection
    to within 1e-5, as in SigLIP2's processor.
    """

    def side(scale: float, size: int) -> int:
        return max(patch_size, int(math.ceil(size * scale / patch_size) * patch_size))

    lo, hi = 1e-6, 100.0
    while hi - lo >= 1e-5:
        mid = (lo + hi) / 2
        if (side(mid, height) / patch_size) * (side(mid, width) / patch_size) <= max_num_patches:
            lo = mid
        else:
            hi = mid
    return side(lo, height), side(lo, width)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/P)*(W/P), P*P*C]``, patches in row-major order, pixels (row, col, channel)."""
    b, c, h, w = images.shape
    rows, cols = h // patch_size, w // patch_size
    x = images.reshape(b, c, rows, patch_size, cols, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, rows * cols, patch_size * patch_size * c)


def _affine(
    config: PreprocessConfig, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``scale, shift`` so that ``x01 * scale + shift`` equals rescale-then-normalise of 0..255 pixels."""
    pixel_scale = 255.0 * (config.rescale_factor if config.do_rescale else 1.0)
    scale = torch.full((3,), pixel_scale, dtype=dtype, device=device)
    shift = torch.zeros(3, dtype=dtype, device=device)
    if config.do_normalize:
        mean = torch.tensor(config.image_mean, dtype=dtype, device=device)
        std = torch.tensor(config.image_std, dtype=dtype, device=device)
        scale, shift = scale / std, -mean / std
    return scale.view(1, 3, 1, 1), shift.view(1, 3, 1, 1)


def _resize(images: torch.Tensor, size: tuple[int, int], resample: int) -> torch.Tensor:
    """Resize ``[B, C, H, W]`` values in [0, 1] the way PIL resizes 8-bit images, minus the rounding.

    PIL resamples in two 1-D passes, width first, and stores the intermediate image as 8 bits, which clips the
    overshoot of the cubic filter. Doing the same two antialiased passes with a clamp in between reproduces the
    HF image processor to within its 8-bit rounding (one level) instead of several levels at sharp edges.
    """
    height, width = int(images.shape[-2]), int(images.shape[-1])
    if (height, width) == tuple(size):
        return images
    mode = _TORCH_MODES.get(resample)
    if mode is None:
        raise ValueError(
            f"the tensor path supports resample 0 (nearest), 2 (bilinear) and 3 (bicubic); the checkpoint's processor "
            f"uses {resample} ({RESAMPLE_NAMES.get(resample, 'unknown')}). Pass PIL images instead."
        )
    if mode == "nearest-exact":
        return F.interpolate(images, size=size, mode=mode).clamp_(0.0, 1.0)
    # antialias=True gives PIL's filters (cubic a=-0.5, support widened when downsampling).
    if mode == "bilinear":  # a convex filter cannot overshoot: one separable call equals PIL's two passes
        return F.interpolate(images, size=size, mode=mode, align_corners=False, antialias=True).clamp_(0.0, 1.0)
    x = images
    if width != size[1]:
        # in place on the fresh interpolation output (its backward does not need it): saves a full-size copy
        x = F.interpolate(x, size=(height, size[1]), mode=mode, align_corners=False, antialias=True).clamp_(0.0, 1.0)
    if height != size[0]:
        x = F.interpolate(x, size=(size[0], size[1]), mode=mode, align_corners=False, antialias=True).clamp_(0.0, 1.0)
    return x


def preprocess_tensor(
    images: torch.Tensor, config: PreprocessConfig, *, value_range: tuple[float, float] = (0.0, 1.0)
) -> PixelInputs:
    """Differentiable preprocessing of a float batch.

    Args:
        images: ``[B, 3, H, W]`` float tensor with values in ``value_range`` (any H, W).
        config: the checkpoint's preprocessing.
        value_range: ``(low, high)`` of the pixel values, e.g. ``(0, 1)``, ``(-1, 1)`` or ``(0, 255)``.

    Returns:
        :class:`PixelInputs` in float32 (float64 for float64 images; gradients flow back to ``images``).
    """
    lo, hi = check_value_range(value_range)
    # at least float32; float64 stays float64 (finite-difference checks of the gradient need it)
    # channels-last inputs (e.g. from numpy HWC) resize several times slower: made contiguous
    x = images.to(torch.promote_types(images.dtype, torch.float32)).contiguous()
    if (lo, hi) != (0.0, 1.0):
        x = (x - lo) / (hi - lo)  # [B, 3, H, W] in [0, 1]
    height, width = int(x.shape[-2]), int(x.shape[-1])
    if config.mode == "fixed":
        target = (config.height, config.width) if config.do_resize else (height, width)
    else:
        target = naflex_target_size(height, width, config.patch_size, config.max_num_patches)
    resized = x
    if config.do_resize or config.mode == "naflex":
        resized = _resize(x, target, config.resample)  # clipped to [0, 1] like PIL's 8-bit output
    # Without a resize, clip out-of-range input the same way (8-bit images cannot leave [0, 1]).
    x = resized if resized is not x else x.clamp(0.0, 1.0)
    scale, shift = _affine(config, x.device, x.dtype)
    x = torch.addcmul(shift, x, scale)  # [B, 3, h, w] normalised: x * scale + shift in one pass
    if config.mode == "fixed":
        return PixelInputs(x)
    patches = patchify(x, config.patch_size)  # [B, n, P*P*3]
    b, n = patches.shape[:2]
    grid = torch.tensor([[target[0] // config.patch_size, target[1] // config.patch_size]] * b, device=x.device)
    mask = torch.ones(b, n, dtype=torch.long, device=x.device)
    return PixelInputs(patches, mask, grid)


def _pil_array(image: Image.Image, size: tuple[int, int] | None, config: PreprocessConfig) -> np.ndarray:
    if config.do_convert_rgb or is_high_bit_depth(image):  # 16-bit and float images are scaled to 8 bits
        image = to_rgb(image)
    if size is not None and (image.height, image.width) != size:
        image = image.resize((size[1], size[0]), resample=config.resample)
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if config.do_rescale:
        arr = arr * np.float32(config.rescale_factor)
    if config.do_normalize:
        arr = (arr - np.asarray(config.image_mean, dtype=np.float32)) / np.asarray(config.image_std, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))  # [3, h, w]


def preprocess_pil(images: Sequence[Image.Image], config: PreprocessConfig) -> PixelInputs:
    """Preprocess PIL images exactly as the HF image processor does (8-bit PIL resize, then float32 maths).

    Args:
        images: non-empty sequence of PIL images with at least one pixel each (any mode; converted to RGB when
            the processor does; 16-bit and float images are scaled to 8 bits first, see
            :func:`~nearid_reward.images.to_rgb`).
        config: the checkpoint's preprocessing.

    Returns:
        :class:`PixelInputs` in float32; NaFlex batches are padded to the longest patch sequence with a mask.
    """
    if len(images) == 0:
        raise ValueError("`images` is empty: pass at least one PIL image")
    for i, img in enumerate(images):
        check_pil_image(img, f"images[{i}]")
    if config.mode == "fixed":
        size = (config.height, config.width) if config.do_resize else None
        arrays = [_pil_array(img, size, config) for img in images]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"with do_resize=false all images must share one size, got {sorted(shapes)}")
        return PixelInputs(torch.from_numpy(np.stack(arrays)))
    patches: list[torch.Tensor] = []
    grids: list[tuple[int, int]] = []
    for img in images:
        target = naflex_target_size(img.height, img.width, config.patch_size, config.max_num_patches)
        arr = torch.from_numpy(_pil_array(img, target, config))[None]
        patches.append(patchify(arr, config.patch_size)[0])  # [n_i, P*P*3]
        grids.append((target[0] // config.patch_size, target[1] // config.patch_size))
    longest = max(p.shape[0] for p in patches)
    values = torch.zeros(len(patches), longest, patches[0].shape[1])
    mask = torch.zeros(len(patches), longest, dtype=torch.long)
    for i, p in enumerate(patches):
        values[i, : p.shape[0]] = p
        mask[i, : p.shape[0]] = 1
    return PixelInputs(values, mask, torch.tensor(grids, dtype=torch.long))
