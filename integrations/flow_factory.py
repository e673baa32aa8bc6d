"""Flow-Factory reward: ``NearIDRewardModel``, named by dotted path in a Flow-Factory YAML.

Flow-Factory resolves ``reward_model:`` either from its registry or as a dotted class path, and builds the class as
``cls(config=RewardArguments, accelerator=Accelerator)``; YAML keys it does not know land in
``config.extra_kwargs``. Its reward processor dispatches on ``isinstance(model, PointwiseRewardModel)``, so the reward
must subclass Flow-Factory's own base class. That base class is imported when ``NearIDRewardModel`` is first looked up
(not when this module is imported), so the module stays importable without Flow-Factory::

    rewards:
      - name: nearid
        reward_model: integrations.flow_factory.NearIDRewardModel
        nearid_model: /models/nearid              # checkpoint folder or hub id (extra_kwargs)
        reference_dir: /data/subject_photos       # optional: the shared reference set
        aggregate: mean                           # mean | max | centroid
        kind: cosine                              # cosine | relative
        negative_dir: /data/lookalikes            # optional near-identity distractors
        negative_weight: 1.0
        device: cuda
        dtype: bfloat16                           # the encoder's backbone dtype
        batch_size: 16

Per sample, references come from the sample's ``condition_images`` (subject-driven editing: Kontext,
Qwen-Image-Edit, FLUX.2) when it has any, else from ``reference_dir``; a batch with neither is an error.
The rewards are :class:`~nearid_reward.IdentityReward` scores (cosine similarity in [-1, 1], higher is better).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from nearid_reward import RewardConfig

from .per_sample_reward import PerSampleReward

logger = logging.getLogger(__name__)

# NearIDRewardModel is a module attribute too, built on first access (see __getattr__ below).
__all__ = ["EXTRA_KEYS", "reward_config_from_extra"]

#: The YAML keys (Flow-Factory's ``extra_kwargs``) the reward reads.
EXTRA_KEYS = ("nearid_model", "reference_dir", "aggregate", "kind", "negative_dir", "negative_weight", "chunk_size")

_INSTALL_HINT = (
    "integrations.flow_factory.NearIDRewardModel subclasses Flow-Factory's PointwiseRewardModel and needs the "
    "`flow_factory` package in this environment (install Flow-Factory, X-GenGroup/Flow-Factory, with pip install -e "
    "from its clone); for a framework that cannot share an environment with nearid-reward, run "
    "nearid-reward-server instead"
)

_CLASS: type | None = None


def reward_config_from_extra(extra: dict[str, Any], dtype: Any = None) -> RewardConfig:
    """The :class:`~nearid_reward.RewardConfig` that Flow-Factory's ``extra_kwargs`` (and ``config.dtype``) ask for.

    Unknown keys are logged as a warning (a misspelt key) and otherwise ignored.

    Raises:
        ValueError: a bad value, naming the :class:`~nearid_reward.RewardConfig` field.
    """
    unknown = sorted(set(extra) - set(EXTRA_KEYS))
    if unknown:
        logger.warning("NearIDRewardModel ignores the YAML key(s) %s; it reads %s", unknown, list(EXTRA_KEYS))
    names = ("aggregate", "kind", "negative_weight", "chunk_size")
    fields: dict[str, Any] = {k: extra[k] for k in names if k in extra}
    if "negative_weight" in fields:
        fields["negative_weight"] = float(fields["negative_weight"])
    if dtype is not None:
        fields["backbone_dtype"] = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype
    return RewardConfig(**fields)


def _build_class() -> type:
    try:
        from flow_factory.rewards.abc import PointwiseRewardModel, RewardModelOutput
    except ImportError as exc:
        raise ImportError(f"{_INSTALL_HINT} ({exc})") from exc

    class NearIDRewardModel(PointwiseRewardModel):  # type: ignore[misc, valid-type]
        """NearID identity reward for Flow-Factory (a ``PointwiseRewardModel``; rewards ``(B,)``, higher is better).

        Args:
            config: Flow-Factory's ``RewardArguments``; ``extra_kwargs`` holds ``nearid_model`` (required),
                ``reference_dir``, ``aggregate``, ``kind``, ``negative_dir``, ``negative_weight``, ``chunk_size``;
                ``config.device`` / ``config.dtype`` place the encoder, ``config.batch_size`` is the batch the
                framework sends.
            accelerator: the run's ``accelerate.Accelerator`` (its device replaces ``cuda``).

        ``__call__`` takes the generated images as a list of ``(C, H, W)`` float tensors in [0, 1]
        (``use_tensor_inputs = True``; PIL images when a subclass sets it to False) and, optionally, each sample's
        ``condition_images`` (an ``(N, C, H, W)`` tensor, a list of ``(C, H, W)`` tensors or PIL images); it
        returns ``RewardModelOutput(rewards=(B,) float32 tensor, extra_info={"references": [...]})`` where
        ``references[i]`` is ``"condition_images"`` or ``"reference_dir"``.
        """

        required_fields: tuple[str, ...] = ("prompt", "image", "condition_images")
        use_tensor_inputs: bool = True

        def __init__(self, config: Any, accelerator: Any) -> None:
            super().__init__(config, accelerator)
            extra = dict(getattr(config, "extra_kwargs", None) or {})
            model = extra.get("nearid_model")
            if not model:
                raise ValueError("NearIDRewardModel needs `nearid_model:` (a NearID checkpoint folder or hub id) "
                                 "in its YAML entry")
            reward_config = reward_config_from_extra(extra, getattr(config, "dtype", None))
            self.scorer = PerSampleReward(
                str(model), extra.get("reference_dir"), negatives=extra.get("negative_dir"), config=reward_config
            ).to(self.device)
            self.model = self.scorer.model
            logger.info("NearIDRewardModel: %s shared reference(s) on %s", self.scorer.num_references, self.device)

        def to(self, device: Any) -> NearIDRewardModel:
            self.scorer.to(device)
            self.device = device
            return self

        @torch.no_grad()
        def __call__(
            self,
            prompt: list[str],
            image: list[Any] | None = None,
            video: list[Any] | None = None,
            audio: list[Any] | None = None,
            condition_images: list[Any] | None = None,
            condition_videos: list[Any] | None = None,
            **kwargs: Any,
        ) -> Any:
            if image is None:
                given = "video" if video is not None else "no image"
                raise ValueError(f"NearIDRewardModel scores images: `image` must be a list of (C, H, W) tensors, "
                                 f"got {given}")
            if isinstance(image, torch.Tensor) and image.ndim == 3:
                raise ValueError(f"`image` must be a list of (C, H, W) tensors or a (B, C, H, W) tensor, got one "
                                 f"tensor of shape {tuple(image.shape)}")
            rewards = self.scorer.score(image, condition_images)  # [B]
            sources = ["reference_dir"] * len(rewards) if condition_images is None else [
                "reference_dir" if c is None or len(c) == 0 else "condition_images" for c in condition_images
            ]
            return RewardModelOutput(rewards=rewards.float(), extra_info={"references": sources})

    NearIDRewardModel.__module__ = __name__
    return NearIDRewardModel


def __getattr__(name: str) -> Any:
    """``NearIDRewardModel`` is built on first access, importing Flow-Factory's base class then."""
    global _CLASS
    if name == "NearIDRewardModel":
        if _CLASS is None:
            _CLASS = _build_class()
        return _CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
