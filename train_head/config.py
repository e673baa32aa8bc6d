"""The configuration of a head-training run: one dataclass that is also the declaration of ``nearid-train-head``'s
command line (each field a ``--<name>`` flag, its help in the field's metadata), parsed by
:func:`nearid_reward.cli.arguments.parse_arguments`. ``__post_init__`` validates the values and raises a
``ValueError`` that names the flag, whether the config comes from the command line or from Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from nearid_reward.cli.arguments import build_parser as build_dataclass_parser
from nearid_reward.cli.arguments import parse_arguments, parse_dtype

from .batching import AugmentConfig

__all__ = ["PROG", "TrainConfig", "build_parser", "parse_train_config"]

PROG = "nearid-train-head"
DESCRIPTION = "Train the NearID MAP head on a frozen SigLIP backbone (accelerate: CPU, one GPU or DDP)."
MIXED_PRECISION = ("no", "fp16", "bf16")  # accelerate's names
DATA_FORMATS = ("auto", "nearid", "folder", "manifest")


def _help(text: str, **more: Any) -> Any:
    return {"help": text, **more}


@dataclass
class TrainConfig:
    """Configuration of a head-training run (the CLI flags of the same names; see ``nearid-train-head --help``)."""

    # model and output
    backbone: str = field(metadata=_help(
        "SigLIP / SigLIP2 folder (or hub id) whose own pooling head initialises the NearID head",
        aliases=["--pretrained_model_name_or_path"]))
    output_dir: str = field(metadata=_help("run folder: checkpoints, best/ and final/ heads, history, logs"))
    # data
    train_data: str = field(metadata=_help(
        "positives table folder (NearID schema), a folder-format root, or a .jsonl manifest"))
    distractors: list[str] = field(default_factory=list, metadata=_help(
        "distractor tables (NearID schema), one per setting"))
    data_format: Literal["auto", "nearid", "folder", "manifest"] = field(default="auto", metadata=_help(
        "format of --train_data and --val_data (auto: detected from the path)"))
    view_prefix: Literal["images", "img"] | None = field(default=None, metadata=_help(
        "view column prefix of the positives table (default: auto-detect)"))
    max_views: int = field(default=3, metadata=_help("views per identity used at most"))
    train_indices: str | None = field(default=None, metadata=_help(
        'index file of training rows ({"indices": [...]})'))
    val_data: str | None = field(default=None, metadata=_help("a separate validation dataset (same formats)"))
    val_distractors: list[str] = field(default_factory=list, metadata=_help(
        "distractor tables of --val_data, one per setting"))
    val_indices: str | None = field(default=None, metadata=_help("index file of validation rows"))
    val_fraction: float = field(default=0.0, metadata=_help(
        "hold out this fraction of training identities for validation (seeded split, saved)"))
    split_seed: int | None = field(default=None, metadata=_help("seed of the identity split (default: --seed)"))
    mtg_data: str | None = field(default=None, metadata=_help(
        "MTG part-edit pairs as a second training source"))
    mtg_repeat: int = field(default=4, metadata=_help("times the MTG pairs are repeated among the training sources"))
    data_cache_dir: str | None = field(default=None, metadata=_help("`datasets` cache folder"))
    strict: bool = field(default=False, metadata=_help("raise on bad data instead of skipping it"))
    # optimisation
    seed: int = field(default=42, metadata=_help("seed of the run (sampling, augmentation, head init)"))
    train_batch_size: int = field(default=128, metadata=_help("identities per process and step"))
    num_train_epochs: int = field(default=11, metadata=_help("epochs (ignored when --max_train_steps is given)"))
    max_train_steps: int | None = field(default=None, metadata=_help("optimizer steps (default: the epochs')"))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("batches per optimizer step"))
    learning_rate: float = field(default=1e-4, metadata=_help("AdamW learning rate"))
    weight_decay: float = field(default=1e-4, metadata=_help("AdamW weight decay"))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1"))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW beta2"))
    adam_epsilon: float = field(default=1e-8, metadata=_help("AdamW epsilon"))
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts"] = field(
        default="cosine", metadata=_help("learning-rate schedule (transformers.get_scheduler)"))
    lr_warmup_steps: int = field(default=100, metadata=_help("warm-up optimizer steps of the schedule"))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping norm"))
    mixed_precision: Literal["bf16", "fp16", "no"] = field(default="no", metadata=_help(
        "fp16/bf16: frozen backbone in that dtype, head in fp32 under autocast"))
    # objective
    temperature: float = field(default=0.07, metadata=_help("softmax temperature of the loss"))
    alpha: float = field(default=0.5, metadata=_help("weight of the ranking tier (0 = InfoNCE only)"))
    cohesion_weight: float = field(default=0.0, metadata=_help("weight of the view-cohesion term"))
    # feature cache and augmentation
    feature_cache: str | None = field(default=None, metadata=_help(
        "cache folder (default: <output_dir>/feature_cache)"))
    no_feature_cache: bool = field(default=False, metadata=_help("run the backbone on every step instead"))
    flip_prob: float = field(default=0.0, metadata=_help("horizontal flip probability (disables the cache)"))
    color_jitter_prob: float = field(default=0.0, metadata=_help("colour jitter probability (disables the cache)"))
    translate_prob: float = field(default=0.0, metadata=_help("shift/scale probability (disables the cache)"))
    encode_batch_size: int = field(default=64, metadata=_help("images per batch when encoding without gradient"))
    # checkpoints, validation and logging
    checkpointing_steps: int = field(default=500, metadata=_help("save a checkpoint-<step> every so many steps"))
    checkpoints_total_limit: int | None = field(default=None, metadata=_help(
        "keep at most this many checkpoint-<step> folders (the oldest are removed)"))
    resume_from_checkpoint: str | None = field(default=None, metadata=_help("a checkpoint folder or 'latest'"))
    validation_steps: int = field(default=100, metadata=_help("validate every so many steps"))
    logging_steps: int = field(default=10, metadata=_help("log the training losses every so many steps"))
    report_to: str = field(default="auto", metadata=_help(
        "tensorboard, wandb (comma-separated), all, none, or auto (tensorboard when installed)"))
    tracker_project_name: str = field(default="nearid-head", metadata=_help("project name given to the trackers"))
    dataloader_num_workers: int = field(default=0, metadata=_help("DataLoader worker processes"))
    attn_implementation: Literal["sdpa", "eager"] = field(default="sdpa", metadata=_help(
        "attention implementation of the backbone"))

    def __post_init__(self) -> None:
        positive_ints = ("train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "checkpointing_steps",
                         "validation_steps", "logging_steps", "encode_batch_size", "max_views")
        for name in positive_ints:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ValueError(f"--max_train_steps must be >= 1, got {self.max_train_steps}")
        for name in ("learning_rate", "temperature", "max_grad_norm", "adam_epsilon"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "alpha", "cohesion_weight", "lr_warmup_steps", "mtg_repeat",
                     "dataloader_num_workers"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"--mixed_precision must be one of {sorted(MIXED_PRECISION)}, got "
                             f"{self.mixed_precision!r}")
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"--data_format must be auto, nearid, folder or manifest, got {self.data_format!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_fraction > 0 and (self.val_data or self.val_indices):
            raise ValueError("--val_fraction splits the training data; do not combine it with --val_data or "
                             "--val_indices")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"--checkpoints_total_limit must be >= 1, got {self.checkpoints_total_limit}")
        AugmentConfig(self.flip_prob, self.color_jitter_prob, self.translate_prob)  # validates the ranges

    @property
    def augment(self) -> AugmentConfig:
        return AugmentConfig(self.flip_prob, self.color_jitter_prob, self.translate_prob)

    @property
    def backbone_dtype(self) -> torch.dtype:
        """The frozen backbone's dtype: that of ``--mixed_precision`` (float32 for ``no``)."""
        return parse_dtype(self.mixed_precision, name="--mixed_precision")


def build_parser() -> Any:
    """The ``nearid-train-head`` parser (an ``HfArgumentParser`` over :class:`TrainConfig`, with ``--debug``)."""
    return build_dataclass_parser(TrainConfig, prog=PROG, description=DESCRIPTION)


def parse_train_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse ``nearid-train-head``'s command line (``sys.argv[1:]`` when None) into a :class:`TrainConfig`."""
    (config,) = parse_arguments(TrainConfig, argv, prog=PROG, description=DESCRIPTION)
    return config
