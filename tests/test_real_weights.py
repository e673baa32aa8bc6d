"""Real checkpoints (marked ``slow``): run with ``pytest -m slow`` on a machine that has them.

Set ``NEARID_SIGLIP2_PATH`` / ``NEARID_RELEASE_PATH`` to local copies of ``google/siglip2-so400m-patch14-384`` and
``Aleksandar/nearid-siglip2``; without them the hub ids are tried (needs network or a filled HF cache). A test is
skipped only when its weights are absent (no such folder, and the hub id cannot be fetched); weights that are there
but do not load fail it.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from nearid_reward import CheckpointError, NearIDModel
from nearid_reward.testing import random_images

pytestmark = pytest.mark.slow

SIGLIP2 = os.environ.get("NEARID_SIGLIP2_PATH", "google/siglip2-so400m-patch14-384")
RELEASE = os.environ.get("NEARID_RELEASE_PATH", "Aleksandar/nearid-siglip2")


def _load(path: str) -> NearIDModel:
    from nearid_reward.weight_formats import resolve_checkpoint_dir

    try:
        folder = resolve_checkpoint_dir(path)
    except CheckpointError as exc:  # absent: not a local folder, and not fetchable from here
        pytest.skip(f"{path} is not available here: {exc}")
    return NearIDModel.from_pretrained(folder)  # present: any CheckpointError is a failure


def test_siglip2_so400m_matches_transformers() -> None:
    from transformers import SiglipVisionModel

    from nearid_reward.weight_formats import resolve_checkpoint_dir

    model = _load(SIGLIP2)
    assert model.embed_dim == 1152 and model.preprocess.height == 384
    reference = SiglipVisionModel.from_pretrained(str(resolve_checkpoint_dir(SIGLIP2))).eval()
    x = random_images(2, 384)
    with torch.no_grad():
        ours = model.embed(x)
        mean = torch.tensor(model.preprocess.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(model.preprocess.image_std).view(1, 3, 1, 1)
        theirs = F.normalize(reference(pixel_values=(x - mean) / std).pooler_output, dim=-1)
    assert (ours * theirs).sum(-1).min().item() >= 0.99999


def test_release_loads_without_remote_code_and_differs_from_the_frozen_head() -> None:
    from safetensors import safe_open

    from nearid_reward.weight_formats import resolve_checkpoint_dir

    release = _load(RELEASE)
    folder = resolve_checkpoint_dir(RELEASE)
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        assert len(list(handle.keys())) == 448
    assert release.embed_dim == 1152
    frozen = _load(SIGLIP2)
    x = random_images(2, 512)
    with torch.no_grad():
        a, b = release.embed(x), frozen.embed(x)
    assert torch.allclose(a.norm(dim=-1), torch.ones(2), atol=1e-4)
    assert (a * b).sum(-1).max().item() < 0.9999  # the retrained head changes the embedding
