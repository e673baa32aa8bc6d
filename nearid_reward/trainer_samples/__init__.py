"""Scoring the sample images that LoRA trainers write during training, and picking their checkpoint.

kohya sd-scripts, ai-toolkit, SimpleTuner and OneTrainer render fixed prompts to disk every few steps and save
checkpoints under names that carry the same step. This package reads those folders from outside the trainer (no
trainer is imported or installed):

* :mod:`.layouts`: the sample file names of each trainer, parsed by pure functions into :class:`SampleFile`;
* :mod:`.checkpoints`: the checkpoint names of each trainer, and which one belongs to a sample round;
* :mod:`.scoring`: :class:`SampleScorer`, which scores each round against the reference photos with
  :class:`~nearid_reward.IdentityValidator`, writes the history, summary and plot, and copies the winner;
* :mod:`.prompt_formats`: the project's seeded prompt set in each trainer's own sample-prompt format.

The command-line front ends are ``nearid-samples`` and ``nearid-prompts`` (:mod:`nearid_reward.cli.samples`,
:mod:`nearid_reward.cli.prompts`).
"""

from __future__ import annotations

from .checkpoints import TrainerCheckpoint, find_trainer_checkpoints, match_checkpoint
from .layouts import TRAINERS, RoundKey, SampleFile, detect_trainer, parse_sample_path, scan_samples

__all__ = [
    "TRAINERS",
    "RoundKey",
    "SampleFile",
    "TrainerCheckpoint",
    "detect_trainer",
    "find_trainer_checkpoints",
    "match_checkpoint",
    "parse_sample_path",
    "scan_samples",
]
