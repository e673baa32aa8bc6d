"""Preprocessing: the PIL path equals transformers' image processors; the tensor path is pinned against them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import Siglip2ImageProcessorPil, SiglipImageProcessorPil
from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches

from nearid_reward import NearIDModel
from nearid_reward.config import PreprocessConfig
from nearid_reward.preprocess import PixelInputs, naflex_target_size, preprocess_pil, preprocess_tensor
from nearid_reward.testing import save_tiny_siglip

PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg", "motorcycle_left.png"]


def _photo(name: str) -> Image.Image:
    import skimage.data

    with Image.open(Path(os.path.dirname(skimage.data.__file__)) / name) as img:
        img.load()
        return img.convert("RGB")


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [_photo(n) for n in PHOTOS]


def _as_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)[None].float() / 255.0


@pytest.mark.parametrize("resample", [2, 3])
def test_pil_path_equals_hf_siglip_processor(photos: list[Image.Image], resample: int) -> None:
    cfg = PreprocessConfig(
        height=96, width=80, resample=resample, image_mean=(0.4, 0.5, 0.6), image_std=(0.2, 0.3, 0.4)
    )
    hf = SiglipImageProcessorPil(
        size={"height": 96, "width": 80}, resample=resample, image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.3, 0.4]
    )
    extra = [photos[0].convert("L"), photos[1].convert("RGBA"), photos[2].convert("P")]
    images = photos + extra
    ours = preprocess_pil(images, cfg).pixel_values
    ref = hf(images=images, return_tensors="pt")["pixel_values"]
    assert ours.shape == ref.shape == (len(images), 3, 96, 80)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)


def test_pil_path_equals_hf_siglip2_processor(photos: list[Image.Image]) -> None:
    cfg = PreprocessConfig(mode="naflex", patch_size=16, max_num_patches=64, resample=2)
    hf = Siglip2ImageProcessorPil(patch_size=16, max_num_patches=64)
    ours = preprocess_pil(photos, cfg)
    ref = hf(images=photos, return_tensors="pt")
    assert torch.equal(ours.spatial_shapes, ref["spatial_shapes"])
    n = ours.pixel_values.shape[1]
    assert torch.equal(ours.pixel_attention_mask, ref["pixel_attention_mask"][:, :n].long())
    assert int(ref["pixel_attention_mask"][:, n:].sum()) == 0  # HF pads further; those slots are all padding
    valid = ours.pixel_attention_mask.bool()
    assert torch.allclose(ours.pixel_values[valid], ref["pixel_values"][:, :n][valid], atol=1e-6, rtol=0)


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 3000), w=st.integers(1, 3000), p=st.sampled_from([8, 14, 16]), m=st.sampled_from([16, 64, 256])
)
def test_naflex_target_size_matches_transformers(h: int, w: int, p: int, m: int) -> None:
    assert naflex_target_size(h, w, p, m) == get_image_size_for_max_num_patches(h, w, p, m)


@pytest.mark.parametrize("resample,size", [(2, (37, 53)), (3, (37, 53)), (3, (120, 90)), (2, (120, 90))])
def test_tensor_resize_equals_pil_float_resize(resample: int, size: tuple[int, int]) -> None:
    """Without 8-bit rounding (PIL mode "F"), PIL's filters and the tensor path agree to float precision."""
    rng = np.random.default_rng(0)
    img = rng.random((70, 61)).astype(np.float32) * 0.6 + 0.2  # stays inside [0, 1] after cubic overshoot
    ref = np.asarray(Image.fromarray(img, mode="F").resize((size[1], size[0]), resample=resample))
    cfg = PreprocessConfig(height=size[0], width=size[1], resample=resample, do_normalize=False)
    x = torch.from_numpy(img)[None, None].expand(1, 3, -1, -1)
    ours = preprocess_tensor(x, cfg).pixel_values[0, 0]
    assert np.abs(ours.numpy() - ref).max() < 2e-5


# Pinned figures of the tensor path against the HF processor on real photographs (384 px, normalised to [-1, 1]);
# the tensor path skips PIL's rounding to 8 bits, so one 8-bit level (2/255 = 0.0078) is the floor.
PINNED = {2: {"max": 0.0080, "mean": 0.0025}, 3: {"max": 0.0090, "mean": 0.0025}}
PINNED_MIN_COSINE = 0.99998


@pytest.mark.parametrize("resample", [2, 3])
def test_tensor_path_matches_hf_processor_on_photographs(
    photos: list[Image.Image], resample: int, tmp_path: Path
) -> None:
    hf = SiglipImageProcessorPil(
        size={"height": 384, "width": 384}, resample=resample, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    )
    folder = save_tiny_siglip(tmp_path / "m384", image_size=384, patch_size=32, resample=resample)
    model = NearIDModel.from_pretrained(folder)
    max_diffs, mean_diffs, cosines = [], [], []
    with torch.no_grad():
        for img in photos:
            ref = hf(images=[img], return_tensors="pt")["pixel_values"]
            ours = preprocess_tensor(_as_tensor(img), model.preprocess).pixel_values
            max_diffs.append((ours - ref).abs().max().item())
            mean_diffs.append((ours - ref).abs().mean().item())
            cosines.append(F.cosine_similarity(model(PixelInputs(ours)), model(PixelInputs(ref))).item())
    assert max(max_diffs) <= PINNED[resample]["max"], max_diffs
    assert float(np.mean(mean_diffs)) <= PINNED[resample]["mean"], mean_diffs
    assert min(cosines) >= PINNED_MIN_COSINE, cosines


def test_naflex_tensor_path_matches_pil_path_on_photographs(photos: list[Image.Image]) -> None:
    cfg = PreprocessConfig(mode="naflex", patch_size=16, max_num_patches=256, resample=2)
    for img in photos:
        pil = preprocess_pil([img], cfg)
        ten = preprocess_tensor(_as_tensor(img), cfg)
        assert torch.equal(pil.spatial_shapes, ten.spatial_shapes)
        assert (pil.pixel_values - ten.pixel_values).abs().max().item() <= 0.0080


def test_value_ranges_are_equivalent() -> None:
    x = torch.rand(2, 3, 50, 41)
    cfg = PreprocessConfig(height=32, width=32)
    a = preprocess_tensor(x, cfg).pixel_values
    b = preprocess_tensor(x * 2 - 1, cfg, value_range=(-1.0, 1.0)).pixel_values
    c = preprocess_tensor(x * 255, cfg, value_range=(0.0, 255.0)).pixel_values
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)


def _high_bit_versions(gray8: Image.Image) -> dict[str, Image.Image]:
    """The same grayscale picture as 16-bit (I;16), 32-bit integer (I) and float (F) images."""
    levels = np.asarray(gray8)  # [H, W] uint8
    return {
        "I;16": Image.fromarray(levels.astype(np.uint16) * 257),
        "I": Image.fromarray(levels.astype(np.int32) * 257),
        "F": Image.fromarray(levels.astype(np.float32) / 255.0),
    }


def test_high_bit_depth_images_are_scaled_to_8_bits_not_clipped(
    tiny_head: Path, photos: list[Image.Image], tmp_path: Path
) -> None:
    from nearid_reward.images import to_rgb
    from nearid_reward.rendering import _to_unit_tensor
    from train_head.batching import AugmentConfig, PixelBatcher
    from train_head.data import PathImageTable

    gray8 = photos[0].resize((64, 48)).convert("L")
    versions = _high_bit_versions(gray8)
    assert [im.mode for im in versions.values()] == ["I;16", "I", "F"]
    versions["I;16"].save(tmp_path / "g16.png")
    gray8.save(tmp_path / "g8.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"  # how PIL opens a 16-bit grayscale PNG
    expected = np.asarray(gray8.convert("RGB"))
    for mode, image in versions.items():
        assert np.array_equal(np.asarray(to_rgb(image)), expected), mode
    # every loader: embedding (files and PIL images), the trainer's reader and augmentation, pipeline outputs
    model = NearIDModel.from_pretrained(tiny_head)
    with torch.no_grad():
        reference = model.embed([tmp_path / "g8.png"])
        assert torch.allclose(model.embed([tmp_path / "g16.png"]), reference, atol=1e-6)
        for image in versions.values():
            assert torch.allclose(model.embed([image]), reference, atol=1e-6)
    table = PathImageTable("t", {"view1": [tmp_path / "g8.png", tmp_path / "g16.png"]}, ids=[0, 1])
    batch = PixelBatcher({"t": table}, model.preprocess)([("t", 0, "view1"), ("t", 1, "view1")])
    assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])
    flip = AugmentConfig(flip_prob=1.0)
    rng = np.random.default_rng(0)
    assert np.array_equal(np.asarray(flip.apply(versions["I;16"], rng)), expected[:, ::-1])
    assert torch.equal(_to_unit_tensor([versions["I;16"]]), _to_unit_tensor([gray8]))


def test_high_bit_depth_values_outside_their_range_raise() -> None:
    from nearid_reward.images import to_rgb

    with pytest.raises(ValueError,
                       match=r"`ref`: float images \(mode F\) must have values in \[0, 1\]; got .* \[0, 2\]"):
        to_rgb(Image.fromarray(np.array([[0.0, 2.0]], dtype=np.float32)), name="ref")
    with pytest.raises(ValueError,
                       match=r"\(mode I\) are read as 16-bit .* \[0, 65535\]; got values in \[-1, 70000\]"):
        to_rgb(Image.fromarray(np.array([[-1, 70000]], dtype=np.int32)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        to_rgb(Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32)))
