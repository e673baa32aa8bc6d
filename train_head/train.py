"""``nearid-train-head`` (also ``python -m train_head``): train the NearID MAP head on a frozen SigLIP backbone.

Runs on the CPU, one GPU or several GPUs through ``accelerate`` (launch it with ``accelerate launch -m train_head``
for DDP). The head starts from the backbone's own pooling head, so step 0 is the frozen baseline. With the default
feature cache the frozen backbone encodes every image once and later steps train the head on cached tokens.

Output folder::

    checkpoint-<step>/      accelerate state (head, optimizer, scheduler, RNG) + head/ + trainer_state.json
    best/                   head with the best validation SSR so far (head-only format)
    final/                  head after the last step (head-only format)
    splits/                 the identity splits used ({"indices": [...]})
    history.jsonl           training and validation records (appended, fsynced)
    train_config.json       the full configuration
    logs/                   tracker output (tensorboard / wandb)

Every head folder loads with ``NearIDModel.from_pretrained``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nearid_reward import NearIDModel
from nearid_reward.cli.entry_points import add_debug_flag, entry_point
from nearid_reward.files import (
    append_jsonl,
    remove_stale_temporaries,
    replace_directory,
    swap_directory,
    temporary_path,
    write_json_atomic,
)

from .batching import (
    AugmentConfig,
    CachedBatcher,
    PixelBatcher,
    TrainCollate,
    batch_tokens,
    embed_references,
    scatter_embeddings,
)
from .data import (
    BadDataReport,
    EpochShuffleSampler,
    NearIDData,
    NearIDTrainDataset,
    load_data,
    load_mtg,
    read_index_file,
    split_by_identity,
    write_index_file,
)
from .eval import ValidationSet, evaluate_embeddings
from .fast_head import FastMAPHead
from .losses import nearid_loss_terms

logger = logging.getLogger(__name__)

__all__ = ["TrainConfig", "build_parser", "main", "train", "find_latest_checkpoint"]

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainConfig:
    """Configuration of a head-training run (the CLI flags of the same names; see ``nearid-train-head --help``)."""

    backbone: str
    output_dir: str
    train_data: str
    distractors: list[str] = field(default_factory=list)
    data_format: str = "auto"
    view_prefix: str | None = None
    max_views: int = 3
    train_indices: str | None = None
    val_data: str | None = None
    val_distractors: list[str] = field(default_factory=list)
    val_indices: str | None = None
    val_fraction: float = 0.0
    split_seed: int | None = None
    mtg_data: str | None = None
    mtg_repeat: int = 4
    data_cache_dir: str | None = None
    strict: bool = False
    seed: int = 42
    train_batch_size: int = 128
    num_train_epochs: int = 11
    max_train_steps: int | None = None
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 100
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    temperature: float = 0.07
    alpha: float = 0.5
    cohesion_weight: float = 0.0
    feature_cache: str | None = None
    no_feature_cache: bool = False
    flip_prob: float = 0.0
    color_jitter_prob: float = 0.0
    translate_prob: float = 0.0
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    validation_steps: int = 100
    logging_steps: int = 10
    report_to: str = "auto"
    tracker_project_name: str = "nearid-head"
    dataloader_num_workers: int = 0
    encode_batch_size: int = 64
    attn_implementation: str = "sdpa"

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
        if self.mixed_precision not in _DTYPES:
            raise ValueError(f"--mixed_precision must be one of {sorted(_DTYPES)}, got {self.mixed_precision!r}")
        if self.data_format not in ("auto", "nearid", "folder", "manifest"):
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


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(backbone="", output_dir="", train_data="")
    p = argparse.ArgumentParser(
        prog="nearid-train-head",
        description="Train the NearID MAP head on a frozen SigLIP backbone (accelerate: CPU, one GPU or DDP).",
    )
    g = p.add_argument_group("model and output")
    g.add_argument("--backbone", "--pretrained_model_name_or_path", dest="backbone", required=True,
                   help="SigLIP / SigLIP2 folder (or hub id) whose own pooling head initialises the NearID head")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--attn_implementation", default=d.attn_implementation, choices=["sdpa", "eager"])
    g = p.add_argument_group("data")
    g.add_argument("--train_data", required=True,
                   help="positives table folder (NearID schema), a folder-format root, or a .jsonl manifest")
    g.add_argument("--distractors", nargs="*", default=[], help="distractor tables (NearID schema), one per setting")
    g.add_argument("--data_format", default=d.data_format, choices=["auto", "nearid", "folder", "manifest"])
    g.add_argument("--view_prefix", default=None, choices=["images", "img"],
                   help="view column prefix of the positives table (default: auto-detect)")
    g.add_argument("--max_views", type=int, default=d.max_views)
    g.add_argument("--train_indices", default=None, help="index file of training rows ({\"indices\": [...]})")
    g.add_argument("--val_data", default=None, help="a separate validation dataset (same formats)")
    g.add_argument("--val_distractors", nargs="*", default=[])
    g.add_argument("--val_indices", default=None, help="index file of validation rows")
    g.add_argument("--val_fraction", type=float, default=d.val_fraction,
                   help="hold out this fraction of training identities for validation (seeded split, saved)")
    g.add_argument("--split_seed", type=int, default=None, help="seed of the identity split (default: --seed)")
    g.add_argument("--mtg_data", default=None, help="MTG part-edit pairs as a second training source")
    g.add_argument("--mtg_repeat", type=int, default=d.mtg_repeat)
    g.add_argument("--data_cache_dir", default=None, help="`datasets` cache folder")
    g.add_argument("--strict", action="store_true", help="raise on bad data instead of skipping it")
    g.add_argument("--dataloader_num_workers", type=int, default=d.dataloader_num_workers)
    g = p.add_argument_group("optimisation")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--train_batch_size", type=int, default=d.train_batch_size, help="identities per process and step")
    g.add_argument("--num_train_epochs", type=int, default=d.num_train_epochs)
    g.add_argument("--max_train_steps", type=int, default=None)
    g.add_argument("--gradient_accumulation_steps", type=int, default=d.gradient_accumulation_steps)
    g.add_argument("--learning_rate", type=float, default=d.learning_rate)
    g.add_argument("--weight_decay", type=float, default=d.weight_decay)
    g.add_argument("--adam_beta1", type=float, default=d.adam_beta1)
    g.add_argument("--adam_beta2", type=float, default=d.adam_beta2)
    g.add_argument("--adam_epsilon", type=float, default=d.adam_epsilon)
    g.add_argument("--lr_scheduler", default=d.lr_scheduler,
                   choices=["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts"])
    g.add_argument("--lr_warmup_steps", type=int, default=d.lr_warmup_steps)
    g.add_argument("--max_grad_norm", type=float, default=d.max_grad_norm)
    g.add_argument("--mixed_precision", default=d.mixed_precision, choices=sorted(_DTYPES),
                   help="fp16/bf16: frozen backbone in that dtype, head in fp32 under autocast")
    g = p.add_argument_group("objective")
    g.add_argument("--temperature", type=float, default=d.temperature)
    g.add_argument("--alpha", type=float, default=d.alpha, help="weight of the ranking tier (0 = InfoNCE only)")
    g.add_argument("--cohesion_weight", type=float, default=d.cohesion_weight)
    g = p.add_argument_group("feature cache and augmentation")
    g.add_argument("--feature_cache", default=None, help="cache folder (default: <output_dir>/feature_cache)")
    g.add_argument("--no_feature_cache", action="store_true", help="run the backbone on every step instead")
    g.add_argument("--flip_prob", type=float, default=0.0)
    g.add_argument("--color_jitter_prob", type=float, default=0.0)
    g.add_argument("--translate_prob", type=float, default=0.0)
    g.add_argument("--encode_batch_size", type=int, default=d.encode_batch_size)
    g = p.add_argument_group("checkpoints, validation and logging")
    g.add_argument("--checkpointing_steps", type=int, default=d.checkpointing_steps)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder or 'latest'")
    g.add_argument("--validation_steps", type=int, default=d.validation_steps)
    g.add_argument("--logging_steps", type=int, default=d.logging_steps)
    g.add_argument("--report_to", default=d.report_to,
                   help="tensorboard, wandb (comma-separated), all, none, or auto (tensorboard when installed)")
    g.add_argument("--tracker_project_name", default=d.tracker_project_name)
    add_debug_flag(p)
    return p


def find_latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The ``checkpoint-<step>`` folder with the highest step (complete ones only), or None."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("checkpoint-") and (p / TRAINER_STATE).is_file():
            try:
                found.append((int(p.name.split("-", 1)[1]), p))
            except ValueError:
                continue
    return max(found)[1] if found else None


def _trackers(report_to: str) -> list[str]:
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    if not names or names == ["none"]:
        return []
    if names == ["auto"]:
        return ["tensorboard"] if _installed("tensorboard") else []
    if names == ["all"]:
        names = ["tensorboard", "wandb"]
        return [n for n in names if _installed(n)]
    for name in names:
        if name not in ("tensorboard", "wandb"):
            raise ValueError(f"--report_to must name tensorboard, wandb, all, auto or none, got {name!r}")
        if not _installed(name):
            raise ImportError(f"--report_to {name} needs the '{name}' package (pip install {name})")
    return names


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _rows_for(data: NearIDData, indices: list[int], report: BadDataReport, what: str) -> list[int]:
    usable = set(data.rows.tolist())
    rows = [r for r in indices if r in usable]
    dropped = [r for r in indices if r not in usable]
    if any(not 0 <= r < len(data) for r in indices):
        raise ValueError(f"{what} lists rows outside the table's {len(data)} rows")
    if dropped:
        report.add(f"{what} rows with fewer than 2 views", f"rows {dropped[:5]}", count=len(dropped))
    return rows


def _flat_config(config: TrainConfig) -> dict[str, Any]:
    out = {}
    for k, v in dataclasses.asdict(config).items():
        out[k] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


def _save_head(model: NearIDModel, dest: Path, extra: dict[str, Any]) -> None:
    replace_directory(dest, lambda tmp: model.save_pretrained(tmp, format="head", extra=extra))


def train(config: TrainConfig) -> dict[str, Any]:
    """Run a training job; returns a summary (final step, best validation SSR, output folders)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    out = Path(config.output_dir)
    trackers = _trackers(config.report_to)
    # A previous run in this process (tests, benchmarks, notebooks) leaves accelerate's singleton state behind;
    # start from a clean one. The process-level state (device, process group) is kept.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    if config.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ValueError("--mixed_precision fp16 needs a GPU; use bf16 (or no) on the CPU")
    set_seed(config.seed)
    main_process = accelerator.is_main_process
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        for folder in (out, out / "splits"):  # what a killed earlier run in this folder left half-written
            remove_stale_temporaries(folder)
        write_json_atomic(out / "train_config.json", dataclasses.asdict(config))

    # ---------------------------------------------------------------- data
    data = load_data(config.train_data, config.distractors, data_format=config.data_format,
                     view_prefix=config.view_prefix, max_views=config.max_views, strict=config.strict,
                     cache_dir=config.data_cache_dir, name="train")
    report = data.report
    split_seed = config.seed if config.split_seed is None else config.split_seed
    if config.train_indices:
        train_rows = _rows_for(data, read_index_file(config.train_indices, num_rows=len(data)), report,
                               "--train_indices")
    else:
        train_rows = data.rows.tolist()
    vset: ValidationSet | None = None
    if config.val_fraction > 0:
        split = split_by_identity(data.ids, train_rows, val_fraction=config.val_fraction, seed=split_seed)
        train_rows = split["train"]
        vset = ValidationSet.build(data, split["val"])
        if main_process:
            for name in ("train", "val"):
                write_index_file(out / "splits" / f"{name}.json", split[name], seed=split_seed, split=name)
    elif config.val_data:
        vdata = load_data(config.val_data, config.val_distractors, data_format=config.data_format,
                          view_prefix=config.view_prefix, max_views=config.max_views, strict=config.strict,
                          cache_dir=config.data_cache_dir, name="val")
        vrows = (read_index_file(config.val_indices, num_rows=len(vdata)) if config.val_indices
                 else vdata.rows.tolist())
        vset = ValidationSet.build(vdata, vrows)
        vdata.report.warn()
    elif config.val_indices:
        vset = ValidationSet.build(data, _rows_for(data, read_index_file(config.val_indices, num_rows=len(data)),
                                                   report, "--val_indices"))
    if vset is not None and not vset.rows:
        logger.warning("the validation set has no usable identities (at least 2 views each): validation is off")
        vset = None
    if vset is not None and vset.data is data:
        overlap = {data.ids[r] for r in vset.rows} & {data.ids[r] for r in train_rows}
        if overlap:
            logger.warning("%d validation identities are also training identities (e.g. %s): the validation "
                           "scores are not held-out scores", len(overlap), sorted(map(str, overlap))[:3])
    sources: list[tuple[NearIDData, Sequence[int]]] = [(data, train_rows)]
    if config.mtg_data:
        mtg = load_mtg(config.mtg_data, strict=config.strict, cache_dir=config.data_cache_dir)
        sources += [(mtg, mtg.rows.tolist())] * config.mtg_repeat
        mtg.report.warn()
    dataset = NearIDTrainDataset(sources, seed=config.seed, num_views=max(d.num_views for d, _ in sources))
    if len(dataset) < config.train_batch_size * accelerator.num_processes:
        raise ValueError(
            f"only {len(dataset)} training identities for a global batch of {config.train_batch_size} x "
            f"{accelerator.num_processes} process(es): lower --train_batch_size"
        )
    report.warn()

    # ---------------------------------------------------------------- model
    backbone_dtype = _DTYPES[config.mixed_precision]
    model = NearIDModel.from_pretrained(config.backbone, torch_dtype=backbone_dtype, head_dtype=torch.float32,
                                        attn_implementation=config.attn_implementation)
    head = model.head
    head.requires_grad_(True)
    model.train()  # the head trains; the backbone stays in eval mode
    use_cache = not config.no_feature_cache
    if use_cache and config.augment.enabled:
        logger.warning("feature cache disabled: augmentations (--flip_prob/--color_jitter_prob/--translate_prob) "
                       "change the pixels every epoch, so the backbone must run on every step")
        use_cache = False
    registry = dataset.registry()
    if vset is not None:
        registry.update(vset.data.registry())
    fingerprint = None
    if use_cache:
        from .cache import FeatureStore, build_feature_cache, model_fingerprint

        fingerprint = model_fingerprint(model, backbone_dtype)
    model.to(accelerator.device)
    if use_cache:
        cache_dir = Path(config.feature_cache) if config.feature_cache else out / "feature_cache"
        meta = {"backbone": str(config.backbone), "backbone_type": model.backbone_type,
                "encode_dtype": str(backbone_dtype)}
        if main_process:
            FeatureStore.open(cache_dir, fingerprint, meta, rank=0)  # type: ignore[arg-type]
        accelerator.wait_for_everyone()
        store = FeatureStore.open(cache_dir, fingerprint, meta, rank=accelerator.process_index)  # type: ignore[arg-type]
        refs = dataset.all_refs() + ([] if vset is None else vset.refs())
        started = time.perf_counter()
        keys = build_feature_cache(store, model, list(dict.fromkeys(refs)), registry, accelerator=accelerator,
                                   batch_size=config.encode_batch_size, num_workers=config.dataloader_num_workers,
                                   report=report)
        report.warn()
        logger.info("feature cache ready in %.1f s: %d images", time.perf_counter() - started, len(keys))
        train_batcher: Any = CachedBatcher(store, keys, registry)
        val_batcher: Any = train_batcher
    else:
        train_batcher = PixelBatcher(registry, model.preprocess, augment=config.augment, seed=config.seed)
        val_batcher = PixelBatcher(registry, model.preprocess)

    sampler = EpochShuffleSampler(len(dataset), seed=config.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.train_batch_size, sampler=sampler, drop_last=True,
        collate_fn=TrainCollate(train_batcher, dataset.num_views), num_workers=config.dataloader_num_workers,
    )
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    # The head trains through its exact factorised single-query forward (much cheaper; same parameters).
    head_ddp, optimizer, loader = accelerator.prepare(FastMAPHead(head), optimizer, loader)
    # The schedule length is computed from the *prepared* loader (its length per process is right under DDP).
    steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    max_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                              num_training_steps=max_steps)
    accelerator.register_for_checkpointing(scheduler)  # stepped once per optimizer step, saved with the state

    global_step, best_ssr, first_epoch, skip_batches = 0, float("-inf"), 0, 0
    if config.resume_from_checkpoint:
        path = (find_latest_checkpoint(out) if config.resume_from_checkpoint == "latest"
                else Path(config.resume_from_checkpoint))
        if path is None:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting from scratch", out)
        else:
            if not (path / TRAINER_STATE).is_file():
                raise ValueError(f"{path} is not a complete checkpoint of this trainer (no {TRAINER_STATE})")
            state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
            if state.get("steps_per_epoch") != steps_per_epoch:
                raise ValueError(
                    f"{path} was written with {state.get('steps_per_epoch')} steps per epoch, this run has "
                    f"{steps_per_epoch}: resume with the same data, batch size and number of processes"
                )
            accelerator.load_state(str(path))
            global_step = int(state["global_step"])
            best_ssr = float(state.get("best_val_ssr", float("-inf")))
            first_epoch = global_step // steps_per_epoch
            skip_batches = (global_step % steps_per_epoch) * config.gradient_accumulation_steps
            logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, global_step, first_epoch,
                        skip_batches)

    if trackers:
        accelerator.init_trackers(config.tracker_project_name, config=_flat_config(config))
    history = out / "history.jsonl"
    device = accelerator.device
    v = dataset.num_views
    last_val: dict[str, float] = {}

    def validate(step: int) -> None:
        nonlocal best_ssr, last_val
        if vset is None:
            return
        if main_process:
            started = time.perf_counter()
            module = accelerator.unwrap_model(head_ddp)
            module.eval()

            def pool(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
                return F.normalize(module(tokens, mask).float(), dim=-1)

            emb, failed = embed_references(vset.refs(), val_batcher, pool, model=model, device=device,
                                           batch_size=config.encode_batch_size)
            module.train()
            for ref, why in failed:
                vset.data.report.add("unreadable images", why, key=ref)
            vset.data.report.warn()
            results = evaluate_embeddings(vset, emb, model.embed_dim)
            pooled = results["pooled"]
            logs = {"val/ssr": pooled["ssr"], "val/pa": pooled["pa"], "val/pa_pairwise": pooled["pa_pairwise"]}
            for setting, res in results.items():
                if setting != "pooled":
                    logs[f"val/{setting}/ssr"] = res["ssr"]
                    logs[f"val/{setting}/pa"] = res["pa"]
            accelerator.log(logs, step=step)
            append_jsonl(history, {"step": step, "kind": "validation", "seconds": time.perf_counter() - started,
                                   **{k: round(x, 6) for k, x in logs.items()}})
            last_val = logs
            logger.info("step %d: validation SSR %.2f PA %.2f (%d identities)", step, pooled["ssr"], pooled["pa"],
                        pooled["n_samples"])
            if pooled["ssr"] > best_ssr:
                best_ssr = pooled["ssr"]
                _save_head(model, out / "best", {"step": step, "val_ssr": pooled["ssr"], "val_pa": pooled["pa"]})
        accelerator.wait_for_everyone()

    def save_checkpoint(step: int) -> None:
        final = out / f"checkpoint-{step}"
        # every process writes its part of the state into the main process's temporary folder
        tmp = Path(broadcast_object_list([str(temporary_path(final))])[0])
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if main_process:
            model.save_pretrained(tmp / "head", format="head", extra={"step": step})
            write_json_atomic(tmp / TRAINER_STATE, {
                "global_step": step, "best_val_ssr": best_ssr, "steps_per_epoch": steps_per_epoch,
                "train_batch_size": config.train_batch_size, "num_processes": accelerator.num_processes,
            })
            swap_directory(tmp, final)
            if config.checkpoints_total_limit:
                ckpts = sorted((int(p.name.split("-", 1)[1]), p) for p in out.glob("checkpoint-*")
                               if p.name.split("-", 1)[1].isdigit())
                for _, old in ckpts[: max(0, len(ckpts) - config.checkpoints_total_limit)]:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    if global_step == 0:
        validate(0)  # the frozen baseline: the head is still the backbone's own head
    progress = tqdm(total=max_steps, initial=global_step, desc="train head",
                    disable=not accelerator.is_local_main_process)
    started = time.perf_counter()
    done = global_step >= max_steps
    for epoch in range(first_epoch, num_epochs):
        if done:
            break
        dataset.set_epoch(epoch)
        loader.set_epoch(epoch)
        epoch_started, epoch_steps = time.perf_counter(), 0
        epoch_loader = loader
        if epoch == first_epoch and skip_batches:
            epoch_loader = accelerator.skip_first_batches(loader, skip_batches)
            epoch_loader.set_epoch(epoch)
        for batch in epoch_loader:
            with accelerator.accumulate(head_ddp):
                for ref, why in batch["failed"]:
                    report.add("unreadable images", why, key=ref)  # each image counts once, whatever the epochs
                tokens, mask = batch_tokens(batch, model, device)
                pooled = F.normalize(head_ddp(tokens, mask).float(), dim=-1)  # [n, E]
                b = batch["batch_size"]
                emb = scatter_embeddings(pooled, batch["slot_index"], b * 2 * v).view(b, 2 * v, -1)
                pos_mask = batch["pos_mask"].to(device)
                neg_mask = batch["neg_mask"].to(device)
                terms = nearid_loss_terms(
                    emb[:, 0], emb[:, 1:v], emb[:, v:], pos_mask[:, 1:], neg_mask,
                    temperature=config.temperature, alpha=config.alpha, cohesion_weight=config.cohesion_weight,
                )
                accelerator.backward(terms.loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(head_ddp.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients:
                    scheduler.step()
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            epoch_steps += 1
            progress.update(1)
            if global_step % config.logging_steps == 0 or global_step == 1 or global_step == max_steps:
                # the mean over processes is the loss of the global batch (the losses are normalised globally)
                monitors = torch.stack([terms.loss.detach(), terms.discrimination.detach(), terms.ranking.detach(),
                                        terms.accuracy.float(), terms.distractor_gap.float()])
                monitors = accelerator.reduce(monitors, reduction="mean").tolist()
                logs = {
                    "train/loss": monitors[0],
                    "train/discrimination": monitors[1],
                    "train/ranking": monitors[2],
                    "train/accuracy": monitors[3],
                    "train/distractor_gap": monitors[4],
                    "lr": scheduler.get_last_lr()[0],
                }
                if grad_norm is not None:
                    logs["train/grad_norm"] = float(grad_norm)
                if config.cohesion_weight > 0:
                    logs["train/cohesion"] = terms.cohesion.item()
                accelerator.log(logs, step=global_step)
                progress.set_postfix(loss=f"{logs['train/loss']:.4f}")
                if main_process:
                    append_jsonl(history, {"step": global_step, "epoch": epoch, "kind": "train",
                                           **{k: round(x, 6) for k, x in logs.items()}})
                report.warn()
            if global_step % config.validation_steps == 0 or global_step == max_steps:
                validate(global_step)
            if global_step % config.checkpointing_steps == 0:
                save_checkpoint(global_step)
            if global_step >= max_steps:
                done = True
                break
        if main_process:
            append_jsonl(history, {"kind": "epoch", "epoch": epoch, "steps": epoch_steps, "step": global_step,
                                   "seconds": round(time.perf_counter() - epoch_started, 4),
                                   "complete": epoch_steps == steps_per_epoch})
    progress.close()
    seconds = time.perf_counter() - started
    accelerator.wait_for_everyone()
    summary = {"global_step": global_step, "best_val_ssr": None if best_ssr == float("-inf") else best_ssr,
               "final": str(out / "final"), "best": str(out / "best") if (out / "best").exists() else None,
               "train_seconds": round(seconds, 3), "feature_cache": use_cache,
               "bad_data": report.to_dict(), **{k: v for k, v in last_val.items()}}
    if report.total:
        logger.info("%s", report.summary())
    if main_process:
        _save_head(model, out / "final", {"step": global_step, **last_val})
        write_json_atomic(out / "train_summary.json", summary)
    accelerator.end_training()
    return summary


@entry_point("nearid-train-head")
def main(argv: Sequence[str] | None = None) -> int:
    options = vars(build_parser().parse_args(argv))
    options.pop("debug")  # read by entry_point
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = train(TrainConfig(**options))
    logger.info("done: %s", json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
