"""Stand-in for ``flow_factory.rewards``."""

from .abc import BaseRewardModel, PointwiseRewardModel, RewardModelOutput
from .registry import get_reward_model_class

__all__ = ["BaseRewardModel", "PointwiseRewardModel", "RewardModelOutput", "get_reward_model_class"]
