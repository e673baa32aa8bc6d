"""The Flow-Factory reward class against a stand-in of Flow-Factory's base classes (tests/stubs/flow_factory).

The class is resolved the way Flow-Factory resolves a YAML ``reward_model:`` (a dotted path), built as
``cls(config=RewardArguments, accelerator=...)`` from a YAML-shaped dict, and compared with ``IdentityReward``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import integrations.flow_factory as ff_module
from nearid_reward import IdentityReward, NearIDModel
from nearid_reward.testing import random_images, write_random_images

STUBS = Path(__file__).resolve().parent / "stubs"
DOTTED = "integrations.flow_factory.NearIDRewardModel"
CPU = SimpleNamespace(device=torch.device("cpu"))  # what the base class reads from the Accelerator


def _forget_flow_factory() -> None:
    for name in [m for m in sys.modules if m == "flow_factory" or m.startswith("flow_factory.")]:
        del sys.modules[name]
    ff_module._CLASS = None


@pytest.fixture
def flow_factory() -> Iterator[ModuleType]:
    """The stand-in package on ``sys.path`` for one test, forgotten afterwards."""
    _forget_flow_factory()
    sys.path.insert(0, str(STUBS))
    try:
        import flow_factory.rewards

        yield flow_factory.rewards
    finally:
        sys.path.remove(str(STUBS))
        _forget_flow_factory()


@pytest.fixture(scope="module")
def subjects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("ff_subjects")
    a = random_images(2, 48, seed=11)
    b = random_images(2, 48, seed=12)
    write_random_images(root / "a", 2, 48, seed=11)
    return {"a": a, "b": b, "a_dir": root / "a"}


def _build(flow_factory: ModuleType, tiny_head: Path, **yaml: Any) -> Any:
    from flow_factory.hparams import RewardArguments

    entry = {"name": "nearid", "reward_model": DOTTED, "device": "cpu", "dtype": "float32", "batch_size": 4,
             "nearid_model": str(tiny_head), **yaml}
    config = RewardArguments.from_dict(entry)
    cls = flow_factory.get_reward_model_class(config.reward_model)
    return cls(config=config, accelerator=CPU)


def _near_copy(image: torch.Tensor, seed: int) -> torch.Tensor:
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    return (image + noise).clamp(0, 1)


def test_the_class_resolves_from_its_dotted_path_and_declares_its_inputs(flow_factory: ModuleType,
                                                                          tiny_head: Path, subjects: dict) -> None:
    cls = flow_factory.get_reward_model_class(DOTTED)
    assert cls.__name__ == "NearIDRewardModel" and cls.__module__ == "integrations.flow_factory"
    assert issubclass(cls, flow_factory.PointwiseRewardModel)  # Flow-Factory dispatches on isinstance
    assert cls.use_tensor_inputs is True
    assert cls.required_fields == ("prompt", "image", "condition_images")
    reward = _build(flow_factory, tiny_head, reference_dir=str(subjects["a_dir"]), aggregate="max")
    assert reward.config.extra_kwargs["reference_dir"] == str(subjects["a_dir"])  # a YAML key Flow-Factory keeps
    assert reward.scorer.config.aggregate == "max" and reward.scorer.num_references == 2
    assert reward.device == torch.device("cpu") and not any(p.requires_grad for p in reward.model.parameters())


def test_rewards_are_identity_reward_scores(flow_factory: ModuleType, tiny_head: Path, subjects: dict) -> None:
    reward = _build(flow_factory, tiny_head, reference_dir=str(subjects["a_dir"]))
    images = list(random_images(4, 64, seed=3))  # (C, H, W) tensors in [0, 1], as with use_tensor_inputs
    out = reward(prompt=["a photo of sks dog"] * 4, image=images)
    assert isinstance(out, flow_factory.RewardModelOutput)
    assert out.rewards.shape == (4,) and out.rewards.dtype == torch.float32 and torch.isfinite(out.rewards).all()
    expected = IdentityReward(NearIDModel.from_pretrained(tiny_head), subjects["a_dir"])(torch.stack(images))
    torch.testing.assert_close(out.rewards, expected)
    assert out.extra_info == {"references": ["reference_dir"] * 4}
    # the framework turns the rewards into a CPU float32 tensor
    assert torch.as_tensor(out.rewards, device="cpu", dtype=torch.float32).tolist() == out.rewards.tolist()


def test_swapping_a_samples_references_swaps_its_ranking(flow_factory: ModuleType, tiny_head: Path,
                                                         subjects: dict) -> None:
    reward = _build(flow_factory, tiny_head, aggregate="max")  # no shared set: condition_images only
    a, b = subjects["a"], subjects["b"]
    x, y = _near_copy(a[0], 1), _near_copy(b[0], 2)  # x looks like subject a, y like subject b
    matched = reward(prompt=["p", "p"], image=[x, y], condition_images=[a, b]).rewards
    swapped = reward(prompt=["p", "p"], image=[x, y], condition_images=[b, a]).rewards
    assert matched[0] > swapped[0] and matched[1] > swapped[1]
    both_a = reward(prompt=["p", "p"], image=[x, y], condition_images=[a, a]).rewards
    both_b = reward(prompt=["p", "p"], image=[x, y], condition_images=[b, b]).rewards
    assert both_a.argmax() == 0 and both_b.argmax() == 1  # the ranking follows the references
    model = NearIDModel.from_pretrained(tiny_head)
    torch.testing.assert_close(matched, torch.cat([IdentityReward(model, a, aggregate="max")(x[None]),
                                                   IdentityReward(model, b, aggregate="max")(y[None])]))
    # the other shapes Flow-Factory uses for condition images: lists of (C, H, W) tensors, PIL images
    as_lists = reward(prompt=["p", "p"], image=[x, y], condition_images=[list(a), list(b)]).rewards
    torch.testing.assert_close(as_lists, matched)


def test_per_sample_references_fall_back_to_the_shared_set(flow_factory: ModuleType, tiny_head: Path,
                                                           subjects: dict) -> None:
    reward = _build(flow_factory, tiny_head, reference_dir=str(subjects["a_dir"]))
    images = list(random_images(2, 64, seed=5))
    out = reward(prompt=["p", "p"], image=images, condition_images=[None, subjects["b"]])
    model = NearIDModel.from_pretrained(tiny_head)
    torch.testing.assert_close(out.rewards[0], IdentityReward(model, subjects["a_dir"])(images[0][None])[0])
    torch.testing.assert_close(out.rewards[1], IdentityReward(model, subjects["b"])(images[1][None])[0])
    assert out.extra_info == {"references": ["reference_dir", "condition_images"]}


def test_pil_inputs_when_a_subclass_turns_tensor_inputs_off(flow_factory: ModuleType, tiny_head: Path,
                                                            subjects: dict) -> None:
    base = flow_factory.get_reward_model_class(DOTTED)
    reward = _build(flow_factory, tiny_head, reference_dir=str(subjects["a_dir"]))
    reward.__class__ = type("PILNearIDReward", (base,), {"use_tensor_inputs": False})
    arrays = (random_images(2, 64, seed=6).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    pils = [Image.fromarray(a) for a in arrays]
    out = reward(prompt=["p", "p"], image=pils)
    expected = IdentityReward(NearIDModel.from_pretrained(tiny_head), subjects["a_dir"]).score(pils).reward
    torch.testing.assert_close(out.rewards, expected)


def test_bad_input_gives_a_clear_error(flow_factory: ModuleType, tiny_head: Path, subjects: dict) -> None:
    reward = _build(flow_factory, tiny_head)  # no reference_dir
    images = list(random_images(2, 64, seed=7))
    with pytest.raises(ValueError, match=r"no references for sample\(s\) \[0, 1\].*condition_images"):
        reward(prompt=["p", "p"], image=images)
    with pytest.raises(ValueError, match=r"no references for sample\(s\) \[1\]"):
        reward(prompt=["p", "p"], image=images, condition_images=[subjects["a"], None])
    with pytest.raises(ValueError, match=r"`image\[1\]` must be a \(3, H, W\) tensor.*got shape \(64, 64, 3\)"):
        reward(prompt=["p", "p"], image=[images[0], images[1].permute(1, 2, 0)], condition_images=[subjects["a"]] * 2)
    with pytest.raises(ValueError, match=r"one entry per image \(2\), got 1"):
        reward(prompt=["p", "p"], image=images, condition_images=[subjects["a"]])
    with pytest.raises(ValueError, match="`image` must be a list of"):
        reward(prompt=["p"], image=None, video=[torch.zeros(2, 3, 8, 8)])
    with pytest.raises(ValueError, match="needs `nearid_model:`"):
        _build(flow_factory, tiny_head, nearid_model="")


def test_without_flow_factory_the_import_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p).resolve() != STUBS])
    _forget_flow_factory()
    assert "flow_factory" not in sys.modules
    with pytest.raises(ImportError, match=r"needs the `flow_factory` package.*nearid-reward-server"):
        ff_module.NearIDRewardModel  # noqa: B018
    assert ff_module.reward_config_from_extra({"aggregate": "max"}).aggregate == "max"  # the module itself works
