"""Shared tiny inputs for the train_head tests: synthetic NearID data and a tiny SigLIP backbone (built once)."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache
from pathlib import Path

import pytest
import torch

_ROOT = Path(tempfile.mkdtemp(prefix="nearid-train-head-tests-"))
atexit.register(shutil.rmtree, _ROOT, True)
HF_CACHE = str(_ROOT / "hf-datasets-cache")


@cache
def synthetic_dataset(num_identities: int = 16, image_size: int = 32, seed: int = 0, view_prefix: str = "img",
                      missing_view_rate: float = 0.25) -> Path:
    from train_head.synthetic import SyntheticConfig, generate_synthetic

    out = _ROOT / f"synthetic-{num_identities}-{image_size}-{seed}-{view_prefix}-{missing_view_rate}"
    config = SyntheticConfig(num_identities=num_identities, image_size=image_size, seed=seed,
                             view_prefix=view_prefix, missing_view_rate=missing_view_rate, supersample=2,
                             val_fraction=0.25, test_fraction=0.0)
    return generate_synthetic(out, config)


@cache
def synthetic_mtg(num_pairs: int = 8, image_size: int = 32) -> Path:
    from train_head.synthetic import generate_synthetic_mtg

    return generate_synthetic_mtg(_ROOT / f"mtg-{num_pairs}-{image_size}", num_pairs=num_pairs,
                                  image_size=image_size, supersample=2)


@cache
def tiny_backbone(image_size: int = 32, kind: str = "siglip") -> Path:
    from nearid_reward.testing import save_tiny_siglip

    if kind == "siglip":
        return save_tiny_siglip(_ROOT / f"backbone-{kind}-{image_size}", image_size=image_size)
    return save_tiny_siglip(_ROOT / f"backbone-{kind}", kind="siglip2")


def distractor_dirs(root: Path, levels=("colour", "pattern", "part")) -> list[str]:
    return [str(root / "distractors" / lv) for lv in levels]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and far faster when the cores are shared (no OpenMP contention)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
