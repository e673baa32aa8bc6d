"""``nearid-select`` cost per checkpoint, split into load/swap, render and score (goal: swap < 5% of the total).

Builds a tiny random SD pipeline and a run folder with ``--checkpoints`` LoRA checkpoints (diffusers' LoRA format,
as the DreamBooth LoRA scripts write them), then runs :class:`nearid_reward.CheckpointSelector` on them without the
cache, once with LoRA load + delete per checkpoint and once with in-place hotswap. ``load/swap`` includes
``load_lora_weights`` + ``set_adapters`` and the ``delete_adapters`` of the previous checkpoint; ``render`` is the
pipeline sampling the prompt set (instance + class prompts, fixed seeds); ``score`` is NearID embedding and metrics.
For scale, it also times what selection avoids: reloading the whole pipeline from disk for each checkpoint.

Reproduce: ``python benchmarks/bench_select.py`` (defaults: 6 checkpoints, the shipped prompt set = 8 instance +
4 class prompts, 25 steps, 64 px). Numbers are medians over the checkpoints of one run.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nearid_reward import (  # noqa: E402
    CheckpointSelector,
    IdentityValidator,
    NearIDModel,
    PromptSet,
    RenderConfig,
    SelectionConfig,
)
from nearid_reward.testing import random_images, save_tiny_nearid  # noqa: E402
from nearid_reward.testing.pipelines import (  # noqa: E402
    add_lora_adapter,
    build_tiny_sd_pipeline,
    save_tiny_sd_pipeline,
    write_lora_checkpoints,
)


def run_mode(args: argparse.Namespace, folder: Path, model: NearIDModel, hotswap: bool) -> list[dict]:
    pipe = build_tiny_sd_pipeline(seed=0)
    validator = IdentityValidator(model, random_images(4, 64, seed=1), prefix="")
    render = RenderConfig(num_inference_steps=args.steps, render_base=False, batch_size=args.batch_size)
    config = SelectionConfig(render=render, hotswap=hotswap, use_cache=False, plot=False)
    prompts = PromptSet.default().fill("sks", "dog")
    return CheckpointSelector(pipe, validator, prompts, config=config).run(folder / "run").rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=6)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = NearIDModel.from_pretrained(save_tiny_nearid(folder / "nearid"))
        pipe = build_tiny_sd_pipeline(seed=0)
        add_lora_adapter(pipe.unet, rank=4, seed=0, b_std=0.3)
        write_lora_checkpoints(folder / "run", pipe, {100 * (i + 1): (i + 1) / args.checkpoints
                                                      for i in range(args.checkpoints)})
        save_tiny_sd_pipeline(folder / "sd")
        from diffusers import DiffusionPipeline

        reloads = []
        for _ in range(3):
            start = time.perf_counter()
            DiffusionPipeline.from_pretrained(str(folder / "sd"), use_safetensors=True)
            reloads.append(time.perf_counter() - start)
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; {args.checkpoints} LoRA checkpoints, "
              f"prompt set 8 instance + 4 class prompts, {args.steps} steps, 64 px, render batch {args.batch_size}")
        print("\n| mode | load/swap s | render s | score s | total s | swap share |")
        print("|---|---|---|---|---|---|")
        for hotswap in (False, True):
            rows = run_mode(args, folder, model, hotswap)
            load = statistics.median(r["time_load_s"] for r in rows)
            render = statistics.median(r["time_render_s"] for r in rows)
            score = statistics.median(r["time_score_s"] for r in rows)
            shares = [r["time_load_s"] / (r["time_load_s"] + r["time_render_s"] + r["time_score_s"]) for r in rows]
            total = load + render + score
            print(f"| {'hotswap' if hotswap else 'load + delete'} | {load:.3f} | {render:.3f} | {score:.3f} | "
                  f"{total:.3f} | {100 * statistics.median(shares):.2f}% (max {100 * max(shares):.2f}%) |")
        print(f"\nfor comparison, reloading the pipeline from disk: median {statistics.median(reloads):.3f} s "
              "per checkpoint (tiny pipeline; a real SD pipeline takes seconds)")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
