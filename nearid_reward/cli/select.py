"""``nearid-select``: rank the ``checkpoint-N`` folders of a DreamBooth/LoRA run by NearID identity score.

    nearid-select --output_dir runs/dog-lora --pretrained_model_name_or_path stable-diffusion-v1-5 \\
        --nearid_model nearid-siglip2 --nearid_reference_dir data/dog --instance_token sks --class_noun dog

Several GPUs: ``accelerate launch -m nearid_reward.cli.select ...`` (or ``accelerate launch --no_python
nearid-select ...``) splits the checkpoints between the processes; the main process writes the results.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..model import NearIDModel
from ..pipelines import load_pipeline
from ..rendering import PromptSet, RenderConfig
from ..reward import IdentityReward
from ..selection import CheckpointSelector, SelectionConfig, format_table
from ..similarity import Aggregate
from ..validation import IdentityValidator
from .arguments import parse_arguments, parse_device, parse_dtype
from .entry_points import entry_point

PROG = "nearid-select"
_RENDER = RenderConfig()
_SELECTION = SelectionConfig()


@dataclass
class SelectArguments:
    """The options of ``nearid-select`` (one flag per field); defaults come from RenderConfig and SelectionConfig."""

    output_dir: str = field(metadata={"help": "the training run's output folder"})
    pretrained_model_name_or_path: str = field(
        metadata={"help": "the base diffusers pipeline the run was trained from (folder or hub id)",
                  "aliases": ["--pipeline"]}
    )
    nearid_model: str = field(metadata={"help": "NearID checkpoint folder or hub id", "aliases": ["--model"]})
    nearid_reference_dir: list[str] = field(
        metadata={"help": "the subject's reference photos (folders or files), usually the --instance_data_dir",
                  "aliases": ["--references"]}
    )
    instance_token: str = field(default="sks", metadata={"help": "fills {token} in the prompts"})
    class_noun: str = field(default="", metadata={"help": "fills {class} in the prompts, e.g. dog"})
    prompts: str | None = field(
        default=None, metadata={"help": "prompt file (JSON with instance/class lists, or one per line)"}
    )
    checkpoints: list[str] | None = field(default=None, metadata={"help": "only these checkpoint folder names"})
    num_inference_steps: int = field(default=_RENDER.num_inference_steps, metadata={"help": "sampler steps"})
    guidance_scale: float | None = field(
        default=_RENDER.guidance_scale, metadata={"help": "classifier-free guidance scale (None: the pipeline's)"}
    )
    resolution: int | None = field(
        default=_RENDER.height, metadata={"help": "image size in pixels (None: the pipeline's)"}
    )
    images_per_prompt: int = field(default=_RENDER.images_per_prompt, metadata={"help": "images per prompt"})
    seed_offset: int = field(
        default=_RENDER.seed_offset, metadata={"help": "first validation seed (disjoint from training)"}
    )
    render_batch_size: int = field(default=_RENDER.batch_size, metadata={"help": "images per pipeline call"})
    scheduler: str | None = field(
        default=_RENDER.scheduler,
        metadata={"help": "render with this diffusers scheduler class ('auto': DDIM unless flow matching; None: the "
                  "pipeline's own)"},
    )
    no_class_prompts: bool = field(default=False, metadata={"help": "skip the class prompts (no leakage metric)"})
    no_base: bool = field(default=False, metadata={"help": "skip rendering the base model (no identity_gain)"})
    aggregate: Aggregate = field(default="mean", metadata={"help": "how a score combines the references"})
    monitor: str = field(default=_SELECTION.monitor, metadata={"help": "metric that ranks checkpoints"})
    mode: Literal["max", "min"] = field(default=_SELECTION.mode, metadata={"help": "higher or lower is better"})
    copy_guard: float | None = field(
        default=_SELECTION.copy_guard,
        metadata={"help": "skip checkpoints whose copy signal context_copy_fraction (share of renders that copy the "
                  "references' place) exceeds this, in [0, 1]; for photos taken in one place (None: off)"},
    )
    hotswap: bool = field(
        default=_SELECTION.hotswap, metadata={"help": "swap LoRA weights in place instead of delete + load"}
    )
    no_cache: bool = field(default=not _SELECTION.use_cache, metadata={"help": "rescore every checkpoint"})
    skip_invalid: bool = field(
        default=_SELECTION.skip_invalid, metadata={"help": "skip checkpoint folders without usable weights"}
    )
    no_plot: bool = field(default=not _SELECTION.plot, metadata={"help": "do not write identity_selection.png"})
    copy_winner: bool = field(default=False, metadata={"help": "copy the winner's weights to --winner_dir"})
    link_winner: bool = field(default=False, metadata={"help": "symlink --winner_dir to the winning checkpoint"})
    winner_dir: str | None = field(
        default=_SELECTION.winner_dir, metadata={"help": "where the winner goes (None: <output_dir>/best_identity)"}
    )
    device: str | None = field(
        default=None, metadata={"help": "torch device (None: the process's accelerate device or cpu)"}
    )
    dtype: str = field(default="float32", metadata={"help": "pipeline dtype (float32, float16/fp16, bfloat16/bf16)"})
    nearid_dtype: str = field(default="float32", metadata={"help": "NearID backbone dtype"})
    json: bool = field(default=False, metadata={"help": "print the result as JSON instead of a table"})
    verbose: bool = field(default=False, metadata={"help": "log progress"})

    def __post_init__(self) -> None:
        if self.copy_guard is not None and not 0.0 <= self.copy_guard <= 1.0:
            raise ValueError(f"--copy_guard must be in [0, 1] (a share of renders), got {self.copy_guard}")
        if self.copy_winner and self.link_winner:
            raise ValueError("--copy_winner and --link_winner are exclusive: give one of them")
        if self.device is not None:
            parse_device(self.device, name="--device")
        parse_dtype(self.dtype, name="--dtype")
        parse_dtype(self.nearid_dtype, name="--nearid_dtype")
        for name in ("num_inference_steps", "images_per_prompt", "render_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")

    @property
    def torch_device(self) -> torch.device | None:
        return None if self.device is None else parse_device(self.device, name="--device")

    def render_config(self) -> RenderConfig:
        """The rendering these options describe."""
        return RenderConfig(
            num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale, height=self.resolution,
            width=self.resolution, images_per_prompt=self.images_per_prompt, seed_offset=self.seed_offset,
            batch_size=self.render_batch_size, render_base=not self.no_base, render_class=not self.no_class_prompts,
            scheduler=self.scheduler,
        )  # fmt: skip

    def selection_config(self) -> SelectionConfig:
        """The selection these options describe."""
        return SelectionConfig(
            monitor=self.monitor, mode=self.mode, render=self.render_config(), hotswap=self.hotswap,
            use_cache=not self.no_cache, skip_invalid=self.skip_invalid, plot=not self.no_plot,
            winner="copy" if self.copy_winner else "symlink" if self.link_winner else None, winner_dir=self.winner_dir,
            copy_guard=self.copy_guard,
        )  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> SelectArguments:
    """The options that ``argv`` (``sys.argv[1:]`` when None) gives ``nearid-select``."""
    (args,) = parse_arguments(
        SelectArguments, argv, prog=PROG,
        description="Render a fixed prompt/seed set for every checkpoint-N of a training run, score identity with "
        "NearID against the subject's reference photos, and rank the checkpoints.",
    )  # fmt: skip
    return args


@entry_point(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from accelerate import PartialState

    # On CPU, accelerate needs cpu=True to see a multi-process (gloo) launch such as torchrun --nproc_per_node 2.
    chosen = args.torch_device
    state = PartialState(cpu=chosen is not None and chosen.type == "cpu")
    device = chosen if chosen is not None else state.device
    config = args.selection_config()
    prompts = PromptSet.load(args.prompts)
    prompts = prompts.fill(args.instance_token, args.class_noun) if prompts.has_placeholders else prompts
    model = NearIDModel.from_pretrained(
        args.nearid_model, torch_dtype=parse_dtype(args.nearid_dtype), head_dtype=torch.float32
    ).to(device)
    scorer = IdentityReward(model, list(args.nearid_reference_dir), aggregate=args.aggregate)
    validator = IdentityValidator(scorer, prefix="", copy_guard=args.copy_guard)
    pipeline = load_pipeline(args.pretrained_model_name_or_path, torch_dtype=parse_dtype(args.dtype), device=device)
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
