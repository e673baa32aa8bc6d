"""Stand-in for ``flow_factory.rewards.abc``: the base classes and the output a reward model returns."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class RewardModelOutput:
    """``rewards``: one value per sample (tensor, array or list); ``extra_info``: anything to log."""

    rewards: Any
    extra_info: dict[str, Any] | None = None


class BaseRewardModel(abc.ABC):
    """Built as ``cls(config=RewardArguments, accelerator=Accelerator)``.

    ``device`` is the accelerator's device when the YAML asks for ``cuda`` (the process's own GPU), else the YAML's.
    """

    required_fields: tuple[str, ...] = ()
    use_tensor_inputs: bool = False

    def __init__(self, config: Any, accelerator: Any) -> None:
        self.config = config
        self.accelerator = accelerator
        self.device = accelerator.device if config.device == torch.device("cuda") else config.device
        self.dtype = config.dtype
        self.model: torch.nn.Module | None = None

    @abc.abstractmethod
    def __call__(self, *args: Any, **kwargs: Any) -> RewardModelOutput: ...

    def to(self, device: Any) -> BaseRewardModel:
        if self.model is not None:
            self.model.to(device)
        self.device = device
        return self


class PointwiseRewardModel(BaseRewardModel):
    """One reward per sample. ``__call__(prompt, image=None, video=None, audio=None, condition_images=None,
    condition_videos=None, **kwargs)``; with ``use_tensor_inputs`` the images are ``(C, H, W)`` tensors in [0, 1] and
    each sample's condition images an ``(N, C, H, W)`` tensor, otherwise PIL images."""

    required_fields: tuple[str, ...] = ("image", "prompt")

    @abc.abstractmethod
    def __call__(self, prompt: list[str], image: Any = None, video: Any = None, audio: Any = None,
                 condition_images: Any = None, condition_videos: Any = None, **kwargs: Any) -> RewardModelOutput: ...
