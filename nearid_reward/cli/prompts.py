"""``nearid-prompts``: write the project's seeded prompt set in a trainer's own sample-prompt format.

    nearid-prompts --format kohya --output sample_prompts.txt --instance_token sks --class_noun dog
    nearid-prompts --format ai-toolkit --output nearid_sample.yaml --instance_token sks --class_noun dog

The trainer then renders the same prompts with the same seeds at every sampling round, and ``nearid-samples``
scores the rounds (``--class_prompt_start`` tells it where the class prompts begin; the command prints it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..files import write_text_atomic
from ..rendering import PromptSet, RenderConfig
from ..trainer_samples.prompt_formats import PromptSheet, render_prompts
from .arguments import parse_arguments
from .entry_points import entry_point

PROG = "nearid-prompts"


@dataclass
class PromptsArguments:
    """The options of ``nearid-prompts`` (one flag per field)."""

    format: Literal["kohya", "ai-toolkit", "simpletuner", "onetrainer"] = field(
        metadata={"help": "the trainer's format: kohya (sd-scripts --sample_prompts text), ai-toolkit (the sample: "
                  "YAML block), simpletuner (--user_prompt_library JSON), onetrainer (sample definition JSON)"}
    )
    output: str = field(metadata={"help": "the file to write (replaced atomically)"})
    instance_token: str = field(default="sks", metadata={"help": "fills {token} in the prompts"})
    class_noun: str = field(default="", metadata={"help": "fills {class} in the prompts, e.g. dog"})
    prompts: str | None = field(
        default=None, metadata={"help": "prompt file (JSON with instance/class lists, or one per line); None: the "
                                "shipped identity prompt set"}
    )
    seed: int = field(default=RenderConfig().seed_offset, metadata={"help": "seed of the first image; image i gets "
                                                                             "seed + i"})
    images_per_prompt: int = field(default=1, metadata={"help": "images per prompt, each with its own seed"})
    width: int = field(default=1024, metadata={"help": "image width in pixels"})
    height: int = field(default=1024, metadata={"help": "image height in pixels"})
    steps: int = field(default=25, metadata={"help": "sampler steps"})
    guidance_scale: float | None = field(
        default=None, metadata={"help": "classifier-free guidance scale (None: the trainer's default)"}
    )
    negative_prompt: str | None = field(default=None, metadata={"help": "negative prompt of every image"})
    no_class_prompts: bool = field(default=False, metadata={"help": "write the identity prompts only"})


def parse_args(argv: Sequence[str] | None = None) -> PromptsArguments:
    """The options that ``argv`` (``sys.argv[1:]`` when None) gives ``nearid-prompts``."""
    (args,) = parse_arguments(
        PromptsArguments, argv, prog=PROG,
        description="Write NearID's seeded identity and class prompts in a LoRA trainer's sample-prompt format, so "
        "that every sampling round renders the same prompts with the same seeds.",
    )  # fmt: skip
    return args


@entry_point(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = PromptSet.load(args.prompts)
    if prompts.has_placeholders:
        prompts = prompts.fill(args.instance_token, args.class_noun)
    sheet = PromptSheet.from_prompt_set(prompts, seed=args.seed, images_per_prompt=args.images_per_prompt,
                                        negative_prompt=args.negative_prompt, with_class=not args.no_class_prompts)
    text = render_prompts(sheet, args.format, width=args.width, height=args.height, steps=args.steps,
                          guidance_scale=args.guidance_scale)
    write_text_atomic(args.output, text)
    print(f"{PROG}: wrote {args.output} ({len(sheet.entries)} images, {args.format} format); score the rounds with "
          f"nearid-samples --class_prompt_start {sheet.class_start}")
    if args.format == "simpletuner":
        print(f"{PROG}: SimpleTuner uses one seed for every prompt: pass --validation_seed {args.seed}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
