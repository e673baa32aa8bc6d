"""Fixtures of the train_head tests: synthetic NearID data, MTG pairs and a tiny SigLIP backbone, each built once
per session and shared, and one torch thread for every test here (tiny models run faster on one thread, and far
faster when the cores are shared)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import cache
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def train_head_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train_head")


@pytest.fixture(scope="session")
def hf_cache(train_head_root: Path) -> str:
    """The datasets cache folder every test of this directory shares."""
    return str(train_head_root / "hf-datasets-cache")


@pytest.fixture(scope="session")
def synthetic_dataset(train_head_root: Path) -> Callable[..., Path]:
    """``synthetic_dataset(num_identities=16, image_size=32, seed=0, ...)``: a synthetic NearID dataset root."""

    @cache
    def build(num_identities: int = 16, image_size: int = 32, seed: int = 0, view_prefix: str = "img",
              missing_view_rate: float = 0.25) -> Path:
        from train_head.synthetic import SyntheticConfig, generate_synthetic

        out = train_head_root / f"synthetic-{num_identities}-{image_size}-{seed}-{view_prefix}-{missing_view_rate}"
        config = SyntheticConfig(num_identities=num_identities, image_size=image_size, seed=seed,
                                 view_prefix=view_prefix, missing_view_rate=missing_view_rate, supersample=2,
                                 val_fraction=0.25, test_fraction=0.0)
        return generate_synthetic(out, config)

    return build


@pytest.fixture(scope="session")
def synthetic_mtg(train_head_root: Path) -> Callable[..., Path]:
    """``synthetic_mtg(num_pairs=8, image_size=32)``: a synthetic MTG part-edit folder."""

    @cache
    def build(num_pairs: int = 8, image_size: int = 32) -> Path:
        from train_head.synthetic import generate_synthetic_mtg

        return generate_synthetic_mtg(train_head_root / f"mtg-{num_pairs}-{image_size}", num_pairs=num_pairs,
                                      image_size=image_size, supersample=2)

    return build


@pytest.fixture(scope="session")
def tiny_backbone(train_head_root: Path) -> Callable[..., Path]:
    """``tiny_backbone(image_size=32, kind="siglip")``: a tiny SigLIP checkpoint folder."""

    @cache
    def build(image_size: int = 32, kind: str = "siglip") -> Path:
        from nearid_reward.testing import save_tiny_siglip

        if kind == "siglip":
            return save_tiny_siglip(train_head_root / f"backbone-{kind}-{image_size}", image_size=image_size)
        return save_tiny_siglip(train_head_root / f"backbone-{kind}", kind="siglip2")

    return build


@pytest.fixture(scope="session")
def distractor_dirs() -> Callable[..., list[str]]:
    """``distractor_dirs(root, levels=("colour", "pattern", "part"))``: the distractor folders of a dataset root."""

    def folders(root: Path, levels: Sequence[str] = ("colour", "pattern", "part")) -> list[str]:
        return [str(root / "distractors" / level) for level in levels]

    return folders
