"""``nearid-select``: rank the ``checkpoint-N`` folders of a DreamBooth/LoRA run by NearID identity score.

    nearid-select --output_dir runs/dog-lora --pretrained_model_name_or_path stable-diffusion-v1-5 \\
        --nearid_model nearid-siglip2 --nearid_reference_dir data/dog --instance_token sks --class_noun dog

Several GPUs: ``accelerate launch -m nearid_reward.cli.select ...`` (or ``accelerate launch --no_python
nearid-select ...``) splits the checkpoints between the processes; the main process writes the results.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

import torch

from ..model import NearIDModel
from ..pipelines import load_pipeline
from ..rendering import PromptSet, RenderConfig
from ..reward import IdentityReward
from ..selection import CheckpointSelector, SelectionConfig, format_table
from ..validation import IdentityValidator
from .entry_points import add_debug_flag, entry_point, torch_device

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nearid-select",
        description="Render a fixed prompt/seed set for every checkpoint-N of a training run, score identity with "
        "NearID against the subject's reference photos, and rank the checkpoints.",
    )
    p.add_argument("--output_dir", "--output-dir", required=True, help="the training run's output folder")
    p.add_argument("--pretrained_model_name_or_path", "--pipeline", required=True,
                   help="the base diffusers pipeline the run was trained from (folder or hub id)")
    p.add_argument("--nearid_model", "--model", required=True, help="NearID checkpoint folder or hub id")
    p.add_argument("--nearid_reference_dir", "--references", nargs="+", required=True,
                   help="the subject's reference photos (folders or files), usually the --instance_data_dir")
    p.add_argument("--instance_token", default="sks", help="fills {token} in the prompts (default: sks)")
    p.add_argument("--class_noun", default="", help="fills {class} in the prompts, e.g. dog")
    p.add_argument("--prompts", default=None, help="prompt file (JSON with instance/class lists, or one per line)")
    p.add_argument("--checkpoints", nargs="+", default=None, help="only these checkpoint folder names")
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=None, help="default: the pipeline's")
    p.add_argument("--resolution", type=int, default=None, help="image size in pixels (default: the pipeline's)")
    p.add_argument("--images_per_prompt", type=int, default=1)
    p.add_argument("--seed_offset", type=int, default=10**8, help="first validation seed (disjoint from training)")
    p.add_argument("--render_batch_size", type=int, default=4)
    p.add_argument("--scheduler", default=None,
                   help="render with this diffusers scheduler class ('auto': DDIM unless flow matching; default: the "
                   "pipeline's own)")
    p.add_argument("--no_class_prompts", action="store_true", help="skip the class prompts (no leakage metric)")
    p.add_argument("--no_base", action="store_true", help="skip rendering the base model (no identity_gain)")
    p.add_argument("--aggregate", choices=["mean", "max", "centroid"], default="mean")
    p.add_argument("--monitor", default="identity_mean", help="metric that ranks checkpoints (default identity_mean)")
    p.add_argument("--mode", choices=["max", "min"], default="max")
    p.add_argument("--hotswap", action="store_true", help="swap LoRA weights in place instead of delete + load")
    p.add_argument("--no_cache", action="store_true", help="rescore every checkpoint")
    p.add_argument("--skip_invalid", action="store_true", help="skip checkpoint folders without usable weights")
    p.add_argument("--no_plot", action="store_true", help="do not write identity_selection.png")
    p.add_argument("--copy_winner", action="store_true", help="copy the winner's weights to --winner_dir")
    p.add_argument("--link_winner", action="store_true", help="symlink --winner_dir to the winning checkpoint")
    p.add_argument("--winner_dir", default=None, help="default: <output_dir>/best_identity")
    p.add_argument("--device", type=torch_device, default=None,
                   help="torch device (default: the process's accelerate device or cpu)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="pipeline dtype (default float32)")
    p.add_argument("--nearid_dtype", choices=sorted(_DTYPES), default="float32", help="NearID backbone dtype")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.add_argument("--verbose", action="store_true", help="log progress")
    add_debug_flag(p)
    return p


@entry_point("nearid-select")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.copy_winner and args.link_winner:
        raise SystemExit("nearid-select: --copy_winner and --link_winner are exclusive")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from accelerate import PartialState

    # On CPU, accelerate needs cpu=True to see a multi-process (gloo) launch such as torchrun --nproc_per_node 2.
    state = PartialState(cpu=args.device is not None and args.device.type == "cpu")
    device = args.device if args.device is not None else state.device
    render = RenderConfig(
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, height=args.resolution,
        width=args.resolution, images_per_prompt=args.images_per_prompt, seed_offset=args.seed_offset,
        batch_size=args.render_batch_size, render_base=not args.no_base, render_class=not args.no_class_prompts,
        scheduler=args.scheduler,
    )  # fmt: skip
    config = SelectionConfig(
        monitor=args.monitor, mode=args.mode, render=render, hotswap=args.hotswap, use_cache=not args.no_cache,
        skip_invalid=args.skip_invalid, plot=not args.no_plot,
        winner="copy" if args.copy_winner else "symlink" if args.link_winner else None, winner_dir=args.winner_dir,
    )  # fmt: skip
    prompts = PromptSet.load(args.prompts)
    prompts = prompts.fill(args.instance_token, args.class_noun) if prompts.has_placeholders else prompts
    model = NearIDModel.from_pretrained(
        args.nearid_model, torch_dtype=_DTYPES[args.nearid_dtype], head_dtype=torch.float32
    ).to(device)
    scorer = IdentityReward(model, list(args.nearid_reference_dir), aggregate=args.aggregate)
    validator = IdentityValidator(scorer, prefix="")
    pipeline = load_pipeline(args.pretrained_model_name_or_path, torch_dtype=_DTYPES[args.dtype], device=device)
    result = CheckpointSelector(pipeline, validator, prompts, config=config, state=state).run(
        args.output_dir, checkpoints=args.checkpoints
    )
    if state.is_main_process:
        if args.json:
            json.dump({"winner": result.winner, "checkpoints": result.rows, "base": result.base,
                       "files": {k: str(v) for k, v in result.files.items()}}, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print(format_table(result))
            for role, path in sorted(result.files.items()):
                print(f"{role}: {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
