"""Set-up of a head-training run: the accelerator (with its trackers), the training and validation data, and the
batchers that turn image references into model inputs (the feature cache, built here, or pixels).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nearid_reward import NearIDModel

from .batching import CachedBatcher, PixelBatcher
from .config import TrainConfig
from .data import (
    BadDataReport,
    NearIDData,
    NearIDTrainDataset,
    load_data,
    load_mtg,
    read_index_file,
    split_by_identity,
    write_index_file,
)
from .eval import ValidationSet

logger = logging.getLogger(__name__)

__all__ = ["load_datasets", "make_accelerator", "make_batchers"]


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


def make_accelerator(config: TrainConfig, out: Path) -> tuple[Any, list[str]]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    trackers = _trackers(config.report_to)
    # A previous run in this process (tests, benchmarks, notebooks) leaves accelerate's singleton state behind;
    # start from a clean one. The process-level state (device, process group) is kept.
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
    return accelerator, trackers


def load_datasets(config: TrainConfig, out: Path, main_process: bool, num_processes: int
                   ) -> tuple[NearIDTrainDataset, ValidationSet | None, BadDataReport]:
    """The training dataset, the validation set (or None) and the bad-data report of the training data."""
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
    if len(dataset) < config.train_batch_size * num_processes:
        raise ValueError(
            f"only {len(dataset)} training identities for a global batch of {config.train_batch_size} x "
            f"{num_processes} process(es): lower --train_batch_size"
        )
    report.warn()
    return dataset, vset, report


def make_batchers(config: TrainConfig, out: Path, accelerator: Any, model: NearIDModel, dataset: NearIDTrainDataset,
              vset: ValidationSet | None, report: BadDataReport) -> tuple[Any, Any, bool]:
    """Move the model to its device and return ``(train batcher, validation batcher, whether the cache is used)``.

    With the feature cache every image is encoded once here (each process its share) and both batchers read tokens.
    """
    use_cache = not config.no_feature_cache
    if use_cache and config.augment.enabled:
        logger.warning("feature cache disabled: augmentations (--flip_prob/--color_jitter_prob/--translate_prob) "
                       "change the pixels every epoch, so the backbone must run on every step")
        use_cache = False
    registry = dataset.registry()
    if vset is not None:
        registry.update(vset.data.registry())
    backbone_dtype = config.backbone_dtype
    fingerprint = None
    if use_cache:
        from .cache import FeatureStore, build_feature_cache, model_fingerprint

        fingerprint = model_fingerprint(model, backbone_dtype)
    model.to(accelerator.device)
    if not use_cache:
        return (PixelBatcher(registry, model.preprocess, augment=config.augment, seed=config.seed),
                PixelBatcher(registry, model.preprocess), False)
    cache_dir = Path(config.feature_cache) if config.feature_cache else out / "feature_cache"
    meta = {"backbone": str(config.backbone), "backbone_type": model.backbone_type,
            "encode_dtype": str(backbone_dtype)}
    if accelerator.is_main_process:
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
    batcher = CachedBatcher(store, keys, registry)
    return batcher, batcher, True
