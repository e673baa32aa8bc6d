"""Reward LoRA fine-tuning on a tiny SD pipeline: DRaFT-K step cost for K=1 and K=all, and a reward curve.

Reproduce: ``python benchmarks/bench_reward_finetune.py [--curve-steps 50] [--repeats 3]``.

1. One DRaFT-K step (sample with DDIM, backpropagate the NearID identity reward through the last K steps into the
   LoRA) for K=1 and K=all, with and without per-step gradient checkpointing: median wall time and the memory autograd
   keeps for the backward pass (exact, via saved-tensor hooks; on CUDA also the allocator's peak).
2. ``examples/train_lora_identity_reward.py --mode draft`` for ``--curve-steps`` steps: the mean reward per block of
   10 steps (it should rise), and the validation identity of the kept checkpoints against the base model.
Everything is built offline from configs (tiny SD, tiny NearID with a random head, random reference images).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, median_time, peak_memory_mib, saved_for_backward_mib  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]


def step_costs(args: argparse.Namespace, nearid: Path, refs: Path) -> None:
    from nearid_reward import IdentityReward
    from nearid_reward.diffusion import SamplerConfig, sample_images
    from nearid_reward.testing.pipelines import add_lora_adapter, build_tiny_sd_pipeline

    pipe = build_tiny_sd_pipeline(seed=0)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    add_lora_adapter(pipe.unet, rank=8, seed=0, target_modules=TARGETS)
    reward = IdentityReward(nearid, refs)
    prompts = ["a photo of sks dog"] * args.batch
    n = args.sampler_steps
    print(f"DRaFT-K step: batch {args.batch}, 64 px, {n} DDIM steps, LoRA rank 8; median of {args.repeats}")
    print(f"{'K':>4} {'ckpt':>5} {'step s':>8} {'saved MiB':>10} {'peak MiB':>9}")
    for k in (1, n):
        for ckpt in (False, True):
            cfg = SamplerConfig(num_inference_steps=n, grad_steps=k, gradient_checkpointing=ckpt)

            def forward(cfg: SamplerConfig = cfg) -> torch.Tensor:
                gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
                return (1 - reward(sample_images(pipe, prompts, config=cfg, generator=gens))).mean()

            def one_step(forward=forward) -> None:  # noqa: ANN001
                forward().backward()
                pipe.unet.zero_grad(set_to_none=True)

            seconds = median_time(one_step, repeats=args.repeats)
            saved = saved_for_backward_mib(forward)
            peak, _ = peak_memory_mib(one_step)
            print(f"{k:>4} {'yes' if ckpt else 'no':>5} {seconds:>8.3f} {saved:>10.1f} {peak:>9.1f}")


def reward_curve(args: argparse.Namespace, root: Path, sd: Path, nearid: Path, refs: Path) -> None:
    spec = importlib.util.spec_from_file_location("ex", ROOT / "examples" / "train_lora_identity_reward.py")
    example = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(example)  # type: ignore[union-attr]
    out = root / "curve"
    prompts = root / "prompts.json"
    prompts.write_text(json.dumps({"instance": ["a photo of {token} {class}"], "class": []}))
    argv = ["--pretrained_model_name_or_path", str(sd), "--nearid_model", str(nearid), "--reference_dir", str(refs),
            "--class_noun", "dog", "--prompts", str(prompts), "--mode", "draft",
            "--num_inference_steps", str(args.sampler_steps), "--backprop_num_steps", str(args.sampler_steps),
            "--max_train_steps", str(args.curve_steps), "--train_batch_size", str(args.batch),
            "--learning_rate", "1e-2", "--rank", "8", "--lora_target_modules", *TARGETS,
            "--checkpointing_steps", str(args.curve_steps // 2), "--validation_steps", str(args.curve_steps // 2),
            "--validation_inference_steps", str(args.sampler_steps), "--output_dir", str(out)]  # fmt: skip
    import logging

    logging.disable(logging.INFO)
    result = example.main(argv)
    rewards = [h["reward"] for h in result["history"]]
    print(f"\nreward curve: draft K=all, {args.sampler_steps} steps, batch {args.batch}, lr 1e-2, "
          f"{args.curve_steps} optimiser steps (mean reward per block of 10 steps)")
    for i in range(0, len(rewards), 10):
        block = rewards[i : i + 10]
        print(f"  steps {i + 1:>3}-{i + len(block):<3} {sum(block) / len(block):.4f}")
    records = [json.loads(line) for line in (out / "identity_history.jsonl").read_text().splitlines()]
    for r in records:
        print(f"  validation at step {r['step']}: identity {r['nearid/identity_mean']:.4f} "
              f"(base model {r.get('nearid/base_identity_mean', float('nan')):.4f}, "
              f"gain {r.get('nearid/identity_gain', float('nan')):+.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--sampler-steps", type=int, default=4)
    parser.add_argument("--curve-steps", type=int, default=50)
    parser.add_argument("--skip-curve", action="store_true")
    args = parser.parse_args()

    from nearid_reward.testing import save_tiny_nearid, write_random_images
    from nearid_reward.testing.pipelines import save_tiny_sd_pipeline

    torch.manual_seed(0)
    root = Path(tempfile.mkdtemp())
    write_random_images(root / "refs", 3, 64, seed=1)
    nearid = save_tiny_nearid(root / "nearid")
    print(environment(), "\n")
    step_costs(args, nearid, root / "refs")
    if not args.skip_curve:
        reward_curve(args, root, save_tiny_sd_pipeline(root / "sd", seed=0), nearid, root / "refs")


if __name__ == "__main__":
    main()
