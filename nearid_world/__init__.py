"""A personalisation world with ground truth: a tiny text-to-image model of the synthetic objects, an attribute
oracle that reads any generated image, and the benchmark that measures NearID against that truth.

This package is a benchmark world, not part of the library: it depends on ``nearid_reward`` (scoring), on
``train_head`` (the synthetic object renderer and the head trainer) and on diffusers; ``nearid_reward`` never imports
it.
"""

from __future__ import annotations

__all__ = ["scenes"]
