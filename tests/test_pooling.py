"""The mean-pool baseline embedding (``NearIDModel.with_pooling("mean")``, ``RewardConfig.pooling``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nearid_reward import IdentityReward, NearIDModel, RewardConfig
from nearid_reward.testing import random_images, tiny_nearid_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_lora_identity_reward.py"


@pytest.fixture(scope="module")
def model() -> NearIDModel:
    return tiny_nearid_model()


def _manual_mean_pool(model: NearIDModel, images: torch.Tensor) -> torch.Tensor:
    """Reference: transformers' SigLIP tokens of the preprocessed pixels, averaged and normalised by hand."""
    pixels = model.prepare(images).pixel_values
    tokens = model.backbone(pixel_values=pixels).last_hidden_state  # [B, N, D]
    mean = tokens.sum(1) / tokens.shape[1]
    return mean / mean.norm(dim=-1, keepdim=True)


def test_mean_pooling_is_the_normalised_token_mean(model: NearIDModel) -> None:
    images = random_images(3, 40, seed=4)
    mean = model.with_pooling("mean")
    emb = mean.embed(images)
    assert emb.shape == (3, mean.embed_dim) == (3, model.vision_config.hidden_size)
    torch.testing.assert_close(emb, _manual_mean_pool(model, images), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model.embed(images)[:, :1], emb[:, :1])  # the head's embedding is another one
    # a view: same frozen modules, the original keeps its head pooling
    assert mean.backbone is model.backbone and model.pooling == "head" and model.with_pooling("head") is model


def test_mean_pool_tokens_averages_only_the_real_tokens() -> None:
    from nearid_reward.model import mean_pool_tokens

    tokens = torch.randn(4, 7, 5)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 5 + [0] * 2, [1] + [0] * 6])
    expected = torch.stack([F.normalize(tokens[i, : int(mask[i].sum())].mean(0), dim=0) for i in range(4)])
    torch.testing.assert_close(mean_pool_tokens(tokens, mask), expected)
    torch.testing.assert_close(mean_pool_tokens(tokens), F.normalize(tokens.mean(1), dim=-1))


def test_mean_pool_reward_scores_cosine_to_mean_pooled_references(model: NearIDModel) -> None:
    refs, images = random_images(3, 32, seed=1), random_images(2, 48, seed=2).requires_grad_()
    reward = IdentityReward(model, refs, config=RewardConfig(pooling="mean"))
    expected = (_manual_mean_pool(model, images.detach()) @ _manual_mean_pool(model, refs).T).mean(1)
    got = reward(images)
    torch.testing.assert_close(got.detach(), expected, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())  # gradients reach pixels, never the frozen weights
    head_reward = IdentityReward(model, refs)
    assert not torch.allclose(head_reward(images.detach()), got.detach())
    assert "pooling='mean'" in repr(reward)


def test_bad_pooling_is_rejected(model: NearIDModel) -> None:
    with pytest.raises(ValueError, match="RewardConfig.pooling.*'head' or 'mean'.*'cls'"):
        RewardConfig(pooling="cls")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`pooling` must be 'head' or 'mean', got 'max'"):
        model.with_pooling("max")  # type: ignore[arg-type]


def test_reward_example_exposes_the_pooling_flag() -> None:
    spec = importlib.util.spec_from_file_location("train_lora_identity_reward", EXAMPLE)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    base = ["--pretrained_model_name_or_path", "x", "--nearid_model", "y", "--reference_dir", "z"]
    assert module.parse_args(base).nearid_pooling == "head"
    assert module.parse_args([*base, "--nearid_pooling", "mean"]).nearid_pooling == "mean"
    with pytest.raises(SystemExit):
        module.parse_args([*base, "--nearid_pooling", "cls"])
