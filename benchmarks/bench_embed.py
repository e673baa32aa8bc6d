"""Embedding throughput: the official-release path against nearid-reward's tensor and PIL paths.

Reproduce: ``python benchmarks/bench_embed.py [--images 32] [--size 512] [--repeats 5]``.

In one run, on the same images (real photographs from scikit-image, resized to ``--size``):
* official: transformers' SiglipImageProcessor on PIL images + the full SiglipVisionModel with its pooling head (what
  a user of the official release runs);
* ours-tensor: ``NearIDModel.embed`` on a float tensor batch (what a diffusion loop has), differentiable path;
* ours-pil: ``NearIDModel.embed`` on the PIL images (exact processor path).
For a tiny config (there the processor dominates) and a small one (about 12 layers, width 384; there the model
dominates). Prints images/s (median over repeats), the speed-up ratios, peak memory and the cosine between paths.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, median_time, peak_memory_mib  # noqa: E402

from nearid_reward.images import load_image, to_rgb  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIGS = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=224,
                 patch_size=16),
    "small": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6, image_size=224,
                  patch_size=16),
}


def _photos(n: int, size: int) -> list[Image.Image]:
    import skimage.data

    root = Path(os.path.dirname(skimage.data.__file__))
    names = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "hubble_deep_field.jpg",
             "motorcycle_left.png"]
    base = [to_rgb(load_image(root / name)).resize((size, size), Image.BICUBIC) for name in names]
    return [base[i % len(base)].rotate(7 * (i // len(base))) for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=512, help="side of the input images in pixels")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resample", type=int, default=2, choices=[2, 3],
                        help="processor filter: 2 bilinear (SigLIP2 checkpoints' processors), 3 bicubic (SigLIP v1)")
    args = parser.parse_args()

    from transformers import SiglipImageProcessorPil, SiglipVisionModel
    from transformers.utils import logging as hf_logging

    from nearid_reward import NearIDModel
    from nearid_reward.testing import save_tiny_siglip

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    photos = _photos(args.images, args.size)
    # what a diffusion loop holds: a contiguous float [B, 3, H, W] batch in [0, 1]
    stacked = torch.from_numpy(np.stack([np.asarray(p) for p in photos]))  # [B, H, W, 3] uint8
    batch = (stacked.permute(0, 3, 1, 2).float() / 255.0).contiguous()
    print(environment())
    print(f"{args.images} images of {args.size}x{args.size}, resample={args.resample}, "
          f"median of {args.repeats} repeats\n")
    header = f"{'config':<7} {'path':<12} {'img/s':>9} {'vs official':>12} {'peak MiB':>9} {'cos vs official':>16}"
    print(header)
    print("-" * len(header))
    for name, cfg in CONFIGS.items():
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_tiny_siglip(Path(tmp) / name, resample=args.resample, **cfg)
            official = SiglipVisionModel.from_pretrained(folder).eval()
            processor = SiglipImageProcessorPil.from_pretrained(folder)
            ours = NearIDModel.from_pretrained(folder)

        def run_official(processor=processor, official=official) -> torch.Tensor:
            with torch.no_grad():
                inputs = processor(images=photos, return_tensors="pt")
                return F.normalize(official(**inputs).pooler_output, dim=-1)

        def run_tensor(ours=ours) -> torch.Tensor:
            with torch.no_grad():
                return ours.embed(batch)

        def run_pil(ours=ours) -> torch.Tensor:
            with torch.no_grad():
                return ours.embed(photos)

        ref = run_official()
        rows = []
        for label, fn in (("official", run_official), ("ours-tensor", run_tensor), ("ours-pil", run_pil)):
            seconds = median_time(fn, repeats=args.repeats)
            peak, _ = peak_memory_mib(fn)
            cos = (fn() * ref).sum(-1).min().item()
            rows.append((label, args.images / seconds, peak, cos))
        base = rows[0][1]
        for label, ips, peak, cos in rows:
            print(f"{name:<7} {label:<12} {ips:>9.1f} {ips / base:>11.2f}x {peak:>9.1f} {cos:>16.6f}")
    print(f"\npeak memory: {peak_memory_mib(lambda: None)[1]}; cos = minimum over images")


if __name__ == "__main__":
    main()
