"""nearid-reward: identity embeddings, a differentiable identity reward and identity-based validation for
diffusion personalisation, built on the NearID encoder (a frozen SigLIP backbone with a retrained MAP head).

Importing this package never imports ``train_head``, ``integrations``, diffusers, accelerate or datasets.
"""

from __future__ import annotations

from ._version import __version__
from .config import HeadConfig, NearIDConfig, PreprocessConfig
from .io import CheckpointError
from .model import NearIDModel

__all__ = [
    "__version__",
    "CheckpointError",
    "HeadConfig",
    "NearIDConfig",
    "NearIDModel",
    "PreprocessConfig",
]
