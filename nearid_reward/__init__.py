"""nearid-reward: identity embeddings, a differentiable identity reward and identity-based validation for
diffusion personalisation, built on the NearID encoder (a frozen SigLIP backbone with a retrained MAP head).

Importing this package never imports ``train_head``, ``integrations``, diffusers, accelerate or datasets.
"""

from __future__ import annotations

from . import _renamed
from ._version import __version__
from .callback import CallbackConfig, NearIDValidationCallback
from .config import HeadConfig, NearIDConfig, PreprocessConfig
from .diffusion import SamplerConfig
from .files import CheckpointError
from .metrics import identity_metrics, metric_names
from .model import NearIDModel
from .references import ReferenceSet
from .rendering import PromptSet, RenderConfig
from .reward import IdentityReward, RewardConfig
from .selection import CheckpointSelector, SelectionConfig
from .validation import IdentityValidator, ValidationConfig

__all__ = [
    "__version__",
    "CallbackConfig",
    "CheckpointError",
    "CheckpointSelector",
    "HeadConfig",
    "IdentityReward",
    "IdentityValidator",
    "NearIDConfig",
    "NearIDModel",
    "NearIDValidationCallback",
    "PreprocessConfig",
    "PromptSet",
    "ReferenceSet",
    "RenderConfig",
    "RewardConfig",
    "SamplerConfig",
    "SelectionConfig",
    "ValidationConfig",
    "identity_metrics",
    "metric_names",
]

_renamed.install()  # ``import nearid_reward.io`` (renamed to files) warns and still works
