"""A small end-to-end run on built-in tiny models: build a NearID model, score images against references.

Run with ``make demo`` (or ``python examples/quickstart.py``); everything is written to ``demo_out/quickstart``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nearid_reward import NearIDModel
from nearid_reward.similarity import leave_one_out_oracle, reference_scores
from nearid_reward.testing import random_images, save_tiny_nearid


def main() -> None:
    out = Path("demo_out/quickstart")
    model_dir = save_tiny_nearid(out / "tiny_nearid", format="head")
    model = NearIDModel.from_pretrained(model_dir)
    references = random_images(4, 64, seed=0)
    # "generations": noisy copies of the references (same subject) and unrelated images
    same = (references + 0.05 * torch.randn_like(references)).clamp(0, 1)
    other = random_images(4, 64, seed=99)
    with torch.no_grad():
        ref_emb = model.embed(references)
        scores_same = reference_scores(model.embed(same), ref_emb)
        scores_other = reference_scores(model.embed(other), ref_emb)
        oracle = leave_one_out_oracle(ref_emb).mean().item()
    print(f"model: {model_dir}")
    print(f"{'image':<12} {'identity score':>15}")
    for i, s in enumerate(scores_same.tolist()):
        print(f"{'same_' + str(i):<12} {s:>15.4f}")
    for i, s in enumerate(scores_other.tolist()):
        print(f"{'other_' + str(i):<12} {s:>15.4f}")
    print(f"reference oracle: {oracle:.4f}")


if __name__ == "__main__":
    main()
