"""The head-training loop: :func:`setup` builds the run (accelerator, data, model, feature cache, optimizer, schedule,
resume; the parts come from :mod:`train_head.run_setup`), then epochs of optimizer steps with logging, validation and
checkpoints.

Everything the loop changes or reads back lives in one :class:`TrainState`; the step, validation and checkpoint
functions take it explicitly. Set-up runs in a fixed order (seeding, data, model, cache, loader, optimizer, schedule,
resume) that the seeded runs and the bit-for-bit resume depend on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nearid_reward import NearIDModel
from nearid_reward.files import append_jsonl, remove_stale_temporaries, write_json_atomic

from .batching import (
    TrainCollate,
    batch_tokens,
    embed_references,
    scatter_embeddings,
)
from .checkpointing import (
    find_latest_checkpoint,
    load_training_state,
    read_trainer_state,
    save_checkpoint,
    save_head,
)
from .config import TrainConfig
from .data import (
    BadDataReport,
    EpochShuffleSampler,
    NearIDTrainDataset,
)
from .eval import ValidationSet, evaluate_embeddings
from .fast_head import FastMAPHead
from .losses import LossTerms, nearid_loss_terms
from .run_setup import load_datasets, make_accelerator, make_batchers

logger = logging.getLogger(__name__)

__all__ = ["TrainState", "train"]


@dataclass
class TrainState:
    """What a run holds while it trains: its parts (accelerator, model, optimizer, schedule, data) and its progress.

    ``global_step`` counts optimizer steps, ``epoch`` is the current epoch, ``first_epoch`` / ``skip_batches`` say
    where a resumed run starts, ``best_val_ssr`` is the best validation SSR so far (saved in ``best/``) and
    ``last_val`` the latest validation record.
    """

    config: TrainConfig
    output_dir: Path
    accelerator: Any
    model: NearIDModel
    head: Any  # the prepared (DDP-wrapped under several processes) FastMAPHead
    optimizer: Any
    scheduler: Any
    loader: Any
    dataset: NearIDTrainDataset
    report: BadDataReport
    validation: ValidationSet | None
    val_batcher: Any
    use_cache: bool
    trackers: list[str]
    steps_per_epoch: int
    max_steps: int
    num_epochs: int
    global_step: int = 0
    epoch: int = 0
    first_epoch: int = 0
    skip_batches: int = 0
    best_val_ssr: float = float("-inf")
    last_val: dict[str, float] = field(default_factory=dict)

    @property
    def history(self) -> Path:
        return self.output_dir / "history.jsonl"

    @property
    def main_process(self) -> bool:
        return bool(self.accelerator.is_main_process)

    def trainer_state(self) -> dict[str, Any]:
        """What ``trainer_state.json`` records to resume from this point."""
        return {"global_step": self.global_step, "best_val_ssr": self.best_val_ssr,
                "steps_per_epoch": self.steps_per_epoch, "train_batch_size": self.config.train_batch_size,
                "num_processes": self.accelerator.num_processes}


def _flat_config(config: TrainConfig) -> dict[str, Any]:
    out = {}
    for k, v in dataclasses.asdict(config).items():
        out[k] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


def _resume(state: TrainState) -> None:
    """Load ``--resume_from_checkpoint`` into the state (nothing when ``latest`` finds no checkpoint)."""
    config, out = state.config, state.output_dir
    path = (find_latest_checkpoint(out) if config.resume_from_checkpoint == "latest"
            else Path(str(config.resume_from_checkpoint)))
    if path is None:
        logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting from scratch", out)
        return
    saved = read_trainer_state(path)
    if saved.get("steps_per_epoch") != state.steps_per_epoch:
        raise ValueError(
            f"{path} was written with {saved.get('steps_per_epoch')} steps per epoch, this run has "
            f"{state.steps_per_epoch}: resume with the same data, batch size and number of processes"
        )
    load_training_state(state.accelerator, state.model, state.optimizer, state.scheduler, Path(path))
    state.global_step = int(saved["global_step"])
    state.best_val_ssr = float(saved.get("best_val_ssr", float("-inf")))
    state.first_epoch = state.global_step // state.steps_per_epoch
    state.skip_batches = (state.global_step % state.steps_per_epoch) * config.gradient_accumulation_steps
    logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, state.global_step, state.first_epoch,
                state.skip_batches)


def validate(state: TrainState, step: int) -> None:
    """Score the validation set with the current head (main process), log it and keep the best head in ``best/``."""
    vset = state.validation
    if vset is None:
        return
    accelerator, model, config = state.accelerator, state.model, state.config
    if state.main_process:
        started = time.perf_counter()
        module = accelerator.unwrap_model(state.head)
        module.eval()

        def pool(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            return F.normalize(module(tokens, mask).float(), dim=-1)

        emb, failed = embed_references(vset.refs(), state.val_batcher, pool, model=model, device=accelerator.device,
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
        append_jsonl(state.history, {"step": step, "kind": "validation", "seconds": time.perf_counter() - started,
                                     **{k: round(x, 6) for k, x in logs.items()}})
        state.last_val = logs
        logger.info("step %d: validation SSR %.2f PA %.2f (%d identities)", step, pooled["ssr"], pooled["pa"],
                    pooled["n_samples"])
        if pooled["ssr"] > state.best_val_ssr:
            state.best_val_ssr = pooled["ssr"]
            save_head(model, state.output_dir / "best", {"step": step, "val_ssr": pooled["ssr"],
                                                         "val_pa": pooled["pa"]})
    accelerator.wait_for_everyone()


def train_step(state: TrainState, batch: dict[str, Any]) -> tuple[LossTerms, Any]:
    """Forward, backward and (at the end of an accumulation) clip, step the optimizer and the schedule.

    Returns the loss terms and the gradient norm before clipping (None between accumulation steps).
    """
    accelerator, config, device = state.accelerator, state.config, state.accelerator.device
    v = state.dataset.num_views
    with accelerator.accumulate(state.head):
        for ref, why in batch["failed"]:
            state.report.add("unreadable images", why, key=ref)  # each image counts once, whatever the epochs
        tokens, mask = batch_tokens(batch, state.model, device)
        pooled = F.normalize(state.head(tokens, mask).float(), dim=-1)  # [n, E]
        b = batch["batch_size"]
        emb = scatter_embeddings(pooled, batch["slot_index"], b * 2 * v).view(b, 2 * v, -1)  # [B, 2V, E]
        pos_mask = batch["pos_mask"].to(device)
        neg_mask = batch["neg_mask"].to(device)
        terms = nearid_loss_terms(
            emb[:, 0], emb[:, 1:v], emb[:, v:], pos_mask[:, 1:], neg_mask,
            temperature=config.temperature, alpha=config.alpha, cohesion_weight=config.cohesion_weight,
        )
        accelerator.backward(terms.loss)
        grad_norm = None
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(state.head.parameters(), config.max_grad_norm)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            state.scheduler.step()
    return terms, grad_norm


def log_train(state: TrainState, terms: LossTerms, grad_norm: Any) -> dict[str, float]:
    """Log the losses of the global batch (mean over processes) to the trackers and ``history.jsonl``."""
    accelerator = state.accelerator
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
        "lr": state.scheduler.get_last_lr()[0],
    }
    if grad_norm is not None:
        logs["train/grad_norm"] = float(grad_norm)
    if state.config.cohesion_weight > 0:
        logs["train/cohesion"] = terms.cohesion.item()
    accelerator.log(logs, step=state.global_step)
    if state.main_process:
        append_jsonl(state.history, {"step": state.global_step, "epoch": state.epoch, "kind": "train",
                                     **{k: round(x, 6) for k, x in logs.items()}})
    state.report.warn()
    return logs


def checkpoint(state: TrainState) -> None:
    """Save ``checkpoint-<global_step>`` (all processes)."""
    save_checkpoint(state.accelerator, state.model, state.optimizer, state.scheduler, state.output_dir,
                    state.global_step, state.trainer_state(), total_limit=state.config.checkpoints_total_limit)


def run_epochs(state: TrainState) -> None:
    """Train from ``state.global_step`` to ``state.max_steps``, validating and checkpointing on schedule."""
    from tqdm.auto import tqdm

    accelerator, config = state.accelerator, state.config
    progress = tqdm(total=state.max_steps, initial=state.global_step, desc="train head",
                    disable=not accelerator.is_local_main_process)
    done = state.global_step >= state.max_steps
    for epoch in range(state.first_epoch, state.num_epochs):
        if done:
            break
        state.epoch = epoch
        state.dataset.set_epoch(epoch)
        state.loader.set_epoch(epoch)
        epoch_started, epoch_steps = time.perf_counter(), 0
        epoch_loader = state.loader
        if epoch == state.first_epoch and state.skip_batches:
            epoch_loader = accelerator.skip_first_batches(state.loader, state.skip_batches)
            epoch_loader.set_epoch(epoch)
        for batch in epoch_loader:
            terms, grad_norm = train_step(state, batch)
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            epoch_steps += 1
            progress.update(1)
            step = state.global_step
            if step % config.logging_steps == 0 or step == 1 or step == state.max_steps:
                logs = log_train(state, terms, grad_norm)
                progress.set_postfix(loss=f"{logs['train/loss']:.4f}")
            if step % config.validation_steps == 0 or step == state.max_steps:
                validate(state, step)
            if step % config.checkpointing_steps == 0:
                checkpoint(state)
            if step >= state.max_steps:
                done = True
                break
        if state.main_process:
            append_jsonl(state.history, {"kind": "epoch", "epoch": epoch, "steps": epoch_steps,
                                         "step": state.global_step,
                                         "seconds": round(time.perf_counter() - epoch_started, 4),
                                         "complete": epoch_steps == state.steps_per_epoch})
    progress.close()


def setup(config: TrainConfig) -> TrainState:
    """Build the run: accelerator, output folder, data, model, feature cache, loader, optimizer, schedule, resume."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    out = Path(config.output_dir)
    accelerator, trackers = make_accelerator(config, out)
    set_seed(config.seed)
    main_process = accelerator.is_main_process
    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        for folder in (out, out / "splits"):  # what a killed earlier run in this folder left half-written
            remove_stale_temporaries(folder)
        write_json_atomic(out / "train_config.json", dataclasses.asdict(config))

    dataset, vset, report = load_datasets(config, out, main_process, accelerator.num_processes)

    model = NearIDModel.from_pretrained(config.backbone, torch_dtype=config.backbone_dtype,
                                        head_dtype=torch.float32, attn_implementation=config.attn_implementation)
    head = model.head
    head.requires_grad_(True)
    model.train()  # the head trains; the backbone stays in eval mode
    train_batcher, val_batcher, use_cache = make_batchers(config, out, accelerator, model, dataset, vset, report)

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
    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                              num_training_steps=max_steps)
    # stepped once per optimizer step; saved as JSON by train_head.checkpointing (never registered with accelerate,
    # whose custom-state files are pickles it loads with weights_only=False)

    state = TrainState(config=config, output_dir=out, accelerator=accelerator, model=model, head=head_ddp,
                       optimizer=optimizer, scheduler=scheduler, loader=loader, dataset=dataset, report=report,
                       validation=vset, val_batcher=val_batcher, use_cache=use_cache, trackers=trackers,
                       steps_per_epoch=steps_per_epoch, max_steps=max_steps,
                       num_epochs=math.ceil(max_steps / steps_per_epoch))
    if config.resume_from_checkpoint:
        _resume(state)
    return state


def train(config: TrainConfig) -> dict[str, Any]:
    """Run a training job; returns a summary (final step, best validation SSR, output folders)."""
    state = setup(config)
    accelerator, out, report = state.accelerator, state.output_dir, state.report
    if state.trackers:
        accelerator.init_trackers(config.tracker_project_name, config=_flat_config(config))
    if state.global_step == 0:
        validate(state, 0)  # the frozen baseline: the head is still the backbone's own head
    started = time.perf_counter()
    run_epochs(state)
    seconds = time.perf_counter() - started
    accelerator.wait_for_everyone()
    best_ssr = state.best_val_ssr
    summary = {"global_step": state.global_step, "best_val_ssr": None if best_ssr == float("-inf") else best_ssr,
               "final": str(out / "final"), "best": str(out / "best") if (out / "best").exists() else None,
               "train_seconds": round(seconds, 3), "feature_cache": state.use_cache,
               "bad_data": report.to_dict(), **state.last_val}
    if report.total:
        logger.info("%s", report.summary())
    if state.main_process:
        save_head(state.model, out / "final", {"step": state.global_step, **state.last_val})
        write_json_atomic(out / "train_summary.json", summary)
    accelerator.end_training()
    return summary
