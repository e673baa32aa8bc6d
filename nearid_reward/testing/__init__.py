"""Builders for tests, demos and benchmarks: tiny random models and pipelines built from configs (no downloads).

* :mod:`nearid_reward.testing.models` (re-exported here): tiny NearID / SigLIP checkpoints in every format and
  random images. Needs only the core dependencies.
* :mod:`nearid_reward.testing.pipelines`: tiny diffusers pipelines (SD, SDXL, Flux, SD3, Sana, Qwen-Image,
  Lumina2, HiDream), offline tokenizers and LoRA checkpoints. Needs the ``diffusers`` extra; importing it without
  diffusers raises an ImportError that names the extra.
"""

from __future__ import annotations

from .models import (
    perturb_head,
    random_images,
    save_tiny_nearid,
    save_tiny_siglip,
    tiny_nearid_model,
    tiny_vision_config,
    write_random_images,
)

__all__ = [
    "perturb_head",
    "random_images",
    "save_tiny_nearid",
    "save_tiny_siglip",
    "tiny_nearid_model",
    "tiny_vision_config",
    "write_random_images",
]
