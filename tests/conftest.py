"""Shared fixtures: tiny random models written once per test session (offline, seeded)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.disable_progress_bar()
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# stand-ins of third-party packages, put on sys.path only by the tests that use them (not collected as doctests)
collect_ignore = ["stubs"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_siglip(tiny_dir: Path) -> Path:
    """A plain tiny SigLIP (fixed 32 px, bicubic processor) checkpoint folder."""
    from nearid_reward.testing import save_tiny_siglip

    return save_tiny_siglip(tiny_dir / "siglip", kind="siglip", seed=0)


@pytest.fixture(scope="session")
def tiny_siglip2(tiny_dir: Path) -> Path:
    """A plain tiny SigLIP2 NaFlex checkpoint folder."""
    from nearid_reward.testing import save_tiny_siglip

    return save_tiny_siglip(tiny_dir / "siglip2", kind="siglip2", seed=0)


@pytest.fixture(scope="session")
def tiny_head(tiny_dir: Path) -> Path:
    """A tiny NearID model in the head-only format (backbone beside it)."""
    from nearid_reward.testing import save_tiny_nearid

    return save_tiny_nearid(tiny_dir / "nearid_head", format="head", kind="siglip")


@pytest.fixture(scope="session")
def tiny_release(tiny_dir: Path) -> Path:
    """A tiny NearID model in the official release layout."""
    from nearid_reward.testing import save_tiny_nearid

    return save_tiny_nearid(tiny_dir / "nearid_release", format="release", kind="siglip")
