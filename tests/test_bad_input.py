"""Bad inputs to ``embed`` raise clear errors naming the input, what was expected and what came."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nearid_reward import NearIDModel


@pytest.fixture(scope="module")
def model(tiny_head: Path) -> NearIDModel:
    return NearIDModel.from_pretrained(tiny_head)


def test_wrong_rank(model: NearIDModel) -> None:
    with pytest.raises(ValueError, match=r"must be \[B, 3, H, W\], got shape \(3, 32, 32\).*images\[None\]"):
        model.embed(torch.rand(3, 32, 32))


def test_wrong_channel_count(model: NearIDModel) -> None:
    with pytest.raises(ValueError, match=r"3 \(RGB\) channels.*\(2, 4, 32, 32\)"):
        model.embed(torch.rand(2, 4, 32, 32))


def test_integer_images(model: NearIDModel) -> None:
    with pytest.raises(TypeError, match=r"float tensor, got dtype torch.uint8.*value_range=\(0, 255\)"):
        model.embed(torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8))


@pytest.mark.parametrize("bad,word", [(float("nan"), "NaN"), (float("inf"), "infinite"), (float("-inf"), "infinite")])
def test_nan_and_inf(model: NearIDModel, bad: float, word: str) -> None:
    x = torch.rand(2, 3, 32, 32)
    x[1, 0, 3, 4] = bad
    with pytest.raises(ValueError, match=word):
        model.embed(x)


def test_empty_batch(model: NearIDModel) -> None:
    with pytest.raises(ValueError, match="empty batch"):
        model.embed(torch.rand(0, 3, 32, 32))
    with pytest.raises(ValueError, match="empty"):
        model.embed([])


def test_value_range_contradicted_by_the_data(model: NearIDModel) -> None:
    with pytest.raises(ValueError, match=r"contradicts value_range=\(0.0, 1.0\); did you mean value_range=\(0, 255\)"):
        model.embed(torch.rand(1, 3, 32, 32) * 255)
    with pytest.raises(ValueError, match=r"did you mean value_range=\(-1, 1\)"):
        model.embed(torch.rand(1, 3, 32, 32) * 2 - 1)
    with pytest.raises(ValueError, match="high > low"):
        model.embed(torch.rand(1, 3, 32, 32), value_range=(1.0, 0.0))


def test_small_overshoot_is_accepted(model: NearIDModel) -> None:
    x = torch.rand(1, 3, 32, 32) * 1.04 - 0.02  # an unclamped VAE decode slightly outside [0, 1]
    assert model.embed(x).shape == (1, 32)


def test_missing_file(model: NearIDModel, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="image file not found.*nope.png"):
        model.embed([str(tmp_path / "nope.png")])


def test_unreadable_image_file(model: NearIDModel, tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="could not read image file.*broken.png"):
        model.embed([bad])


def test_empty_folder(model: NearIDModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="contains no images"):
        model.embed(tmp_path)


def test_float_numpy_and_unknown_types(model: NearIDModel) -> None:
    with pytest.raises(TypeError, match="numpy images must be uint8"):
        model.embed([np.random.rand(32, 32, 3)])
    with pytest.raises(TypeError, match="must be a PIL image"):
        model.embed([3.14])
    with pytest.raises(TypeError, match="stack tensors"):
        model.embed([torch.rand(3, 32, 32)])


def test_empty_pil_and_numpy_images(model: NearIDModel) -> None:
    from PIL import Image

    from nearid_reward.preprocess import preprocess_pil

    with pytest.raises(ValueError, match=r"`images\[1\]` is an empty image \(size 0x0\)"):
        model.embed([Image.new("RGB", (8, 8)), Image.new("RGB", (0, 0))])
    with pytest.raises(ValueError, match=r"`images\[0\]` is an empty image \(size 0x5\)"):
        model.embed([np.zeros((5, 0, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match=r"`images\[0\]` is an empty image"):
        preprocess_pil([Image.new("L", (0, 0))], model.preprocess)


BAD_VALUE_RANGES = [
    (255, TypeError, r"`value_range` must be a \(low, high\) pair of numbers such as \(0, 1\).*; got int 255"),
    ("0-1", TypeError, r"`value_range` must be a \(low, high\) pair .*; got str '0-1'"),
    ((0, 1, 2), ValueError, r"`value_range` must be a \(low, high\) pair .*; got 3 values \(0, 1, 2\)"),
    ((0, "1"), TypeError, r"`value_range` must be a \(low, high\) pair .*; got \(int, str\) \(0, '1'\)"),
    ((0, float("inf")), ValueError, r"`value_range` must be a \(low, high\) pair .*; got the non-finite"),
    ((1, 1), ValueError, r"`value_range` must be \(low, high\) with high > low, got \(1, 1\)"),
]


@pytest.mark.parametrize("value_range,error,message", BAD_VALUE_RANGES)
def test_bad_value_range_is_named(model: NearIDModel, value_range: object, error: type, message: str) -> None:
    # tensors and 8-bit inputs alike (the range is ignored for the latter, but a wrong one is still a mistake)
    for images in (torch.rand(1, 3, 32, 32), [np.zeros((8, 8, 3), dtype=np.uint8)]):
        with pytest.raises(error, match=message):
            model.embed(images, value_range=value_range)


def test_value_range_is_checked_wherever_it_is_accepted(model: NearIDModel) -> None:
    from nearid_reward import IdentityReward, IdentityValidator, RewardConfig
    from nearid_reward.preprocess import preprocess_tensor
    from nearid_reward.validation import image_grid

    images = torch.rand(2, 3, 32, 32)
    reward = IdentityReward(model, images)
    validator = IdentityValidator(reward)
    calls = {
        "reward": lambda: reward(images, value_range=255),
        "reward.score (PIL)": lambda: reward.score([np.zeros((8, 8, 3), dtype=np.uint8)], value_range="0-1"),
        "reward.loss": lambda: reward.loss(images, value_range=255),
        "validator.compute": lambda: validator.compute(images, value_range=255),
        "validator.validate": lambda: validator.validate(images, step=1, value_range=255),
        "image_grid": lambda: image_grid(images, value_range=255),
        "preprocess_tensor": lambda: preprocess_tensor(images, model.preprocess, value_range=255),
    }
    for where, call in calls.items():
        with pytest.raises(TypeError, match=r"`value_range` must be a \(low, high\) pair"):
            call()
        assert validator.history == [], where
    with pytest.raises(TypeError, match=r"`RewardConfig.reference_value_range` must be a \(low, high\) pair"):
        RewardConfig(reference_value_range=255)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`RewardConfig.reference_value_range` .*; got str '0-1'"):
        IdentityReward(model, images, reference_value_range="0-1")


@pytest.mark.parametrize("chunk_size,error,message", [
    (0, ValueError, r"`chunk_size` must be an int >= 1 \(images per backbone call\) or None; got 0"),
    (-1, ValueError, r"`chunk_size` must be an int >= 1 .*; got -1"),
    (2.5, TypeError, r"`chunk_size` must be an int >= 1 .*; got float 2.5"),
    (True, TypeError, r"`chunk_size` must be an int >= 1 .*; got bool True"),
])
def test_bad_chunk_size_is_named(model: NearIDModel, chunk_size: object, error: type, message: str) -> None:
    from nearid_reward import IdentityReward, RewardConfig

    images = torch.rand(3, 3, 32, 32)
    with pytest.raises(error, match=message):
        model.embed(images, chunk_size=chunk_size)
    with pytest.raises(error, match=message):
        model.chunk_size = chunk_size
    assert model.chunk_size is None
    reward = IdentityReward(model, images)
    with pytest.raises(error, match=message):
        reward.embed_images(images, chunk_size=chunk_size)  # 0 used to fall back silently to the default
    with pytest.raises(error, match=message.replace("`chunk_size`", "`RewardConfig.chunk_size`")):
        RewardConfig(chunk_size=chunk_size)  # type: ignore[arg-type]
    with pytest.raises(error, match=r"`RewardConfig.reference_chunk_size` must be an int >= 1 \(images per"):
        RewardConfig(reference_chunk_size=chunk_size)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`RewardConfig.reference_chunk_size` .*; got NoneType None"):
        RewardConfig(reference_chunk_size=None)  # type: ignore[arg-type]


def test_chunked_embedding_equals_the_whole_batch(model: NearIDModel) -> None:
    images = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        whole = model.embed(images)
        for chunk_size in (1, 2, 5, 9):
            assert torch.allclose(model.embed(images, chunk_size=chunk_size), whole, atol=1e-5)
