"""``nearid-samples``: score the sample images a LoRA trainer writes, and pick its checkpoint by identity.

    nearid-samples --samples_dir runs/dog/sample --nearid_model nearid-siglip2 --nearid_reference_dir data/dog \\
        --copy_winner                                   # sd-scripts, after training
    nearid-samples --trainer ai-toolkit --samples_dir output/dog/samples --nearid_model ... \\
        --nearid_reference_dir data/dog --copy_winner --watch --until_file output/dog/DONE   # while it trains

The layouts of kohya sd-scripts, ai-toolkit, SimpleTuner, OneTrainer and the diffusers scripts are described in
:mod:`nearid_reward.trainer_samples.layouts` and ``docs/trainers.md``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..model import NearIDModel
from ..similarity import Aggregate
from ..trainer_samples.checkpoints import default_checkpoints_dir
from ..trainer_samples.layouts import detect_trainer
from ..trainer_samples.scoring import SamplesConfig, SampleScorer, follow, history_path
from ..validation import IdentityValidator
from .arguments import parse_arguments, parse_device, parse_dtype
from .entry_points import entry_point

PROG = "nearid-samples"
OUTPUT_SUBDIR = "nearid_samples"


@dataclass
class SamplesArguments:
    """The options of ``nearid-samples`` (one flag per field)."""

    samples_dir: str = field(metadata={"help": "the folder the trainer writes its samples to (sd-scripts sample/, "
                                       "ai-toolkit samples/, SimpleTuner's output dir or validation_images/, "
                                       "OneTrainer samples/, a diffusers script's output dir)"})
    nearid_model: str = field(metadata={"help": "NearID checkpoint folder or hub id", "aliases": ["--model"]})
    nearid_reference_dir: list[str] = field(
        metadata={"help": "the subject's reference photos (folders or files), usually the training images",
                  "aliases": ["--references"]}
    )
    trainer: Literal["auto", "kohya", "ai-toolkit", "simpletuner", "onetrainer", "diffusers"] = field(
        default="auto", metadata={"help": "the sample layout (auto: the one that recognises the most files)"}
    )
    checkpoints_dir: str | None = field(
        default=None, metadata={"help": "where the trainer saves models (None: the folder above --samples_dir's "
                                "sample/, samples/ or validation_images/, else --samples_dir)"}
    )
    output_dir: str | None = field(
        default=None, metadata={"help": f"where the history, summary and winner go (None: <checkpoints_dir>/"
                                f"{OUTPUT_SUBDIR})"}
    )
    copy_winner: bool = field(
        default=False, metadata={"help": "copy the best round's checkpoint (original file name) to --winner_dir"}
    )
    winner_dir: str | None = field(default=None, metadata={"help": "None: <output_dir>/best_identity"})
    class_prompt_start: int | None = field(
        default=None, metadata={"help": "sample prompts from this index on are class prompts, scored as leakage "
                                "(nearid-prompts prints it; None: every prompt shows the subject)"}
    )
    onetrainer_samples: Literal["default", "no-ema", "custom"] = field(
        default="default", metadata={"help": "which OneTrainer sample set to score"}
    )
    images_per_round: int | None = field(
        default=None, metadata={"help": "a round with this many images is complete (None: learnt from the first "
                                "round followed by another)"}
    )
    aggregate: Aggregate = field(default="mean", metadata={"help": "how a score combines the references"})
    threshold: float = field(
        default=0.9, metadata={"help": "fraction of the reference oracle an image must reach to count as on-identity"}
    )
    monitor: str = field(default="identity_mean", metadata={"help": "metric that ranks the rounds"})
    mode: Literal["max", "min"] = field(default="max", metadata={"help": "higher or lower monitor is better"})
    watch: bool = field(default=False, metadata={"help": "follow the folders while the trainer runs"})
    poll_interval: float = field(default=30.0, metadata={"help": "seconds between two looks at the folders"})
    until_file: str | None = field(
        default=None, metadata={"help": "with --watch: stop (after a last pass) once this file exists; without it "
                                "the watch runs until Ctrl-C"}
    )
    no_plot: bool = field(default=False, metadata={"help": "do not write identity_summary.png"})
    device: str = field(default="cpu", metadata={"help": "torch device of the NearID model"})
    nearid_dtype: str = field(default="float32", metadata={"help": "NearID backbone dtype"})
    json: bool = field(default=False, metadata={"help": "print the result as JSON instead of a table"})
    verbose: bool = field(default=False, metadata={"help": "log progress"})

    def __post_init__(self) -> None:
        parse_device(self.device, name="--device")
        parse_dtype(self.nearid_dtype, name="--nearid_dtype")
        if self.poll_interval <= 0:
            raise ValueError(f"--poll_interval must be > 0 seconds, got {self.poll_interval}")
        if self.until_file is not None and not self.watch:
            raise ValueError("--until_file needs --watch")
        if self.class_prompt_start is not None and self.class_prompt_start < 0:
            raise ValueError(f"--class_prompt_start must be >= 0, got {self.class_prompt_start}")

    def samples_config(self, trainer: str) -> SamplesConfig:
        """The scorer's configuration, with the default folders filled in for ``trainer``."""
        checkpoints = Path(self.checkpoints_dir) if self.checkpoints_dir else default_checkpoints_dir(
            self.samples_dir, trainer)
        output = Path(self.output_dir) if self.output_dir else checkpoints / OUTPUT_SUBDIR
        variant = "" if self.onetrainer_samples == "default" else self.onetrainer_samples
        return SamplesConfig(
            trainer, Path(self.samples_dir), checkpoints, output, class_prompt_start=self.class_prompt_start,
            variant=variant, images_per_round=self.images_per_round, copy_winner=self.copy_winner,  # type: ignore[arg-type]
            winner_dir=Path(self.winner_dir) if self.winner_dir else None, plot=not self.no_plot,
        )  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> SamplesArguments:
    """The options that ``argv`` (``sys.argv[1:]`` when None) gives ``nearid-samples``."""
    (args,) = parse_arguments(
        SamplesArguments, argv, prog=PROG,
        description="Score the sample images that kohya sd-scripts, ai-toolkit, SimpleTuner, OneTrainer or a "
        "diffusers script wrote during training against the subject's reference photos, one round per step, and "
        "pick (and copy) the checkpoint of the best round; --watch follows a run while it trains.",
    )  # fmt: skip
    return args


def format_rounds(result: dict[str, Any]) -> str:
    """A plain-text table of the scored rounds and the winner (what ``nearid-samples`` prints)."""
    monitor = result["monitor"]
    lines = [f"{'round':<18} {'step':>8} {monitor:>16} {'identity_gain':>14}  checkpoint", "-" * 80]
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else "-" if value is None else str(value)

    for r in result["rounds"]:
        if r["scored"]:
            lines.append(f"{r['round']:<18} {cell(r.get('step')):>8} {cell(r.get(monitor)):>16} "
                         f"{cell(r.get('identity_gain')):>14}  {r['checkpoint'] or '-'}")
    if result["best"] is not None:
        lines.append(f"best round: {result['best']['round']} ({monitor}={result['best'][monitor]:.4f})")
    if result["winner"] is not None:
        lines.append(f"winner: {result['winner']['checkpoint']} copied to {result['winner_dir']}")
    if result["without_checkpoint"]:
        lines.append(f"rounds without a checkpoint: {', '.join(result['without_checkpoint'])}")
    return "\n".join(lines)


@entry_point(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not Path(args.samples_dir).is_dir() and not args.watch:
        raise FileNotFoundError(f"--samples_dir not found: {args.samples_dir}")
    trainer = args.trainer
    while trainer == "auto":
        try:
            trainer = detect_trainer(args.samples_dir)
        except (FileNotFoundError, ValueError):
            if not args.watch or (args.until_file is not None and Path(args.until_file).exists()):
                raise  # not watching, or the run finished without a sample to recognise
            time.sleep(args.poll_interval)  # nothing to recognise yet: the trainer has not sampled
        else:
            logging.getLogger(__name__).info("--trainer auto: %s", trainer)
    config = args.samples_config(trainer)
    model = NearIDModel.from_pretrained(args.nearid_model, torch_dtype=parse_dtype(args.nearid_dtype),
                                        head_dtype=torch.float32).to(parse_device(args.device, name="--device"))
    validator = IdentityValidator(model, list(args.nearid_reference_dir), aggregate=args.aggregate,
                                  threshold=args.threshold, monitor=args.monitor, mode=args.mode,
                                  history_path=history_path(config.output_dir), prefix="nearid/")
    scorer = SampleScorer(validator, config)
    if args.watch:
        follow(scorer, poll_interval=args.poll_interval, until_file=args.until_file)
    else:
        scorer.poll(finished=True)
    result = scorer.result()
    if args.json:
        json.dump(result, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(format_rounds(result))
        print(f"results: {config.output_dir}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
