"""``IdentityValidator``: identity metrics of generated images, a crash-safe history, best-step tracking and
early stopping. Framework-free; given an accelerate ``Accelerator`` it also logs to its trackers.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .config import with_overrides
from .images import ImageInput, check_value_range
from .io import append_jsonl, read_jsonl
from .model import NearIDModel
from .reward import IdentityReward
from .similarity import Aggregate, cosine_matrix

logger = logging.getLogger(__name__)

__all__ = ["ValidationConfig", "IdentityValidator", "identity_metrics", "image_grid"]


@dataclass
class ValidationConfig:
    """Options of :class:`IdentityValidator`.

    Attributes:
        aggregate: reference aggregation (``"mean"``, ``"max"``, ``"centroid"``); None uses the scorer's (mean).
        threshold: the bar for ``frac_above_threshold``.
        threshold_kind: ``"relative"`` (the bar is ``threshold x reference oracle``; needs >= 2 references) or
            ``"cosine"`` (the bar is the cosine ``threshold`` itself).
        copy_margin: a generation counts as a suspected copy of reference ``r`` when its similarity to ``r``
            exceeds ``r``'s similarity to its nearest other reference by more than this margin.
        monitor: the metric (without prefix) that decides the best step, e.g. ``"identity_mean"``,
            ``"relative_mean"`` or ``"identity_gain"``.
        mode: ``"max"`` (higher monitor is better) or ``"min"``.
        min_delta: an improvement must beat the best by more than this.
        patience: raise the early-stop signal after this many validations without improvement (None: never).
        prefix: prefix of every metric key (e.g. ``"nearid/"`` gives ``nearid/identity_mean``).
        log_images: send an image grid with scores to tensorboard/wandb trackers of the accelerator.
        max_logged_images: at most this many images in the logged grid.
    """

    aggregate: Aggregate | None = None
    threshold: float = 0.9
    threshold_kind: Literal["relative", "cosine"] = "relative"
    copy_margin: float = 0.0
    monitor: str = "identity_mean"
    mode: Literal["max", "min"] = "max"
    min_delta: float = 0.0
    patience: int | None = None
    prefix: str = "nearid/"
    log_images: bool = True
    max_logged_images: int = 16

    def __post_init__(self) -> None:
        if self.aggregate is not None and self.aggregate not in ("mean", "max", "centroid"):
            raise ValueError(
                f"ValidationConfig.aggregate must be 'mean', 'max', 'centroid' or None, got {self.aggregate!r}"
            )
        if self.threshold_kind not in ("relative", "cosine"):
            raise ValueError(
                f"ValidationConfig.threshold_kind must be 'relative' or 'cosine', got {self.threshold_kind!r}"
            )
        if self.mode not in ("max", "min"):
            raise ValueError(f"ValidationConfig.mode must be 'max' or 'min', got {self.mode!r}")
        if not self.min_delta >= 0:
            raise ValueError(f"ValidationConfig.min_delta must be >= 0, got {self.min_delta}")
        if self.patience is not None and int(self.patience) < 1:
            raise ValueError(f"ValidationConfig.patience must be >= 1 or None, got {self.patience}")
        if int(self.max_logged_images) < 1:
            raise ValueError(f"ValidationConfig.max_logged_images must be >= 1, got {self.max_logged_images}")
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ValueError(f"ValidationConfig.monitor must be a metric name, got {self.monitor!r}")


# ---------------------------------------------------------------------------------------------- stateless metrics
def identity_metrics(
    scorer: IdentityReward,
    embeddings: torch.Tensor,
    *,
    threshold: float | None,
    copy_margin: float = 0.0,
    class_embeddings: torch.Tensor | None = None,
    base_embeddings: torch.Tensor | None = None,
) -> dict[str, float]:
    """Identity metrics of ``embeddings`` ``[B, E]`` against ``scorer``'s cached references (unprefixed keys).

    Keys: ``identity_mean/min/max/std`` (aggregated cosine to the references), ``num_images``;
    with >= 2 references ``reference_oracle``, ``relative_mean`` (mean / oracle), ``copy_fraction`` (share of
    generations closer to one reference than that reference is to its nearest other reference, plus
    ``copy_margin``) and ``copy_max_excess``; ``frac_above_threshold`` when ``threshold`` is given (a cosine);
    with negatives ``negative_max_mean`` and ``reward_mean``; with class images ``class_leakage_mean`` (identity
    score of class-prompt images, lower is better) and ``class_leakage_relative``; with base images
    ``base_identity_mean``, ``identity_gain`` (mean minus base mean) and, when paired, ``base_similarity`` (mean
    cosine between each image and its base-model twin: 1.0 means the adapter changed nothing).
    """
    out = scorer.score_embeddings(embeddings)
    identity = out.identity.float()  # [B]
    metrics: dict[str, float] = {
        "identity_mean": float(identity.mean()),
        "identity_min": float(identity.min()),
        "identity_max": float(identity.max()),
        "identity_std": float(identity.std(unbiased=False)),
        "num_images": float(identity.shape[0]),
    }
    refs = scorer.reference_embeddings.float()
    oracle = scorer.oracle
    if threshold is not None:
        metrics["frac_above_threshold"] = float((identity >= threshold).float().mean())
    if refs.shape[0] >= 2 and math.isfinite(oracle):
        metrics["reference_oracle"] = oracle
        metrics["relative_mean"] = metrics["identity_mean"] / oracle
        ref_sims = cosine_matrix(refs, refs)  # [R, R]
        ref_sims.fill_diagonal_(-float("inf"))
        nearest_other = ref_sims.max(dim=1).values  # [R]
        excess = (cosine_matrix(embeddings.float(), refs) - nearest_other[None, :]).max(dim=1).values  # [B]
        metrics["copy_fraction"] = float((excess > copy_margin).float().mean())
        metrics["copy_max_excess"] = float(excess.max())
    if out.negative is not None:
        metrics["negative_max_mean"] = float(out.negative.mean())
        metrics["reward_mean"] = float(out.reward.mean())
    if class_embeddings is not None:
        leak = scorer.score_embeddings(class_embeddings).identity.float()
        metrics["class_leakage_mean"] = float(leak.mean())
        if "reference_oracle" in metrics:
            metrics["class_leakage_relative"] = metrics["class_leakage_mean"] / oracle
    if base_embeddings is not None:
        base = scorer.score_embeddings(base_embeddings).identity.float()
        metrics["base_identity_mean"] = float(base.mean())
        metrics["identity_gain"] = metrics["identity_mean"] - metrics["base_identity_mean"]
        if base_embeddings.shape == embeddings.shape:
            metrics["base_similarity"] = float((embeddings.float() * base_embeddings.float()).sum(-1).mean())
    return metrics


def image_grid(
    images: torch.Tensor, captions: Sequence[str] | None = None, *, value_range: tuple[float, float] = (0.0, 1.0)
) -> np.ndarray:
    """Tile ``images`` ``[N, 3, H, W]`` into one uint8 ``[rows*H, cols*W, 3]`` array, captions drawn on the tiles."""
    from PIL import Image, ImageDraw

    lo, hi = check_value_range(value_range)
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    arr = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # [N, H, W, 3]
    n, h, w = arr.shape[:3]
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i in range(n):
        tile = arr[i]
        if captions is not None and i < len(captions):
            pil = Image.fromarray(tile)
            draw = ImageDraw.Draw(pil)
            draw.rectangle((0, 0, w, 11), fill=(0, 0, 0))
            draw.text((1, 0), captions[i], fill=(255, 255, 255))
            tile = np.asarray(pil)
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = tile
    return grid


# ---------------------------------------------------------------------------------------------- validator
class IdentityValidator:
    """Identity validation for personalisation runs: metrics, JSONL history, best step and early stopping.

    Args:
        model: a :class:`~nearid_reward.NearIDModel`, a checkpoint path, or an existing
            :class:`~nearid_reward.IdentityReward` (its cached references are reused; pass ``references=None``).
        references: the subject's reference photos (tensor ``[R, 3, H, W]`` in [0, 1], PIL, paths or a folder).
        negatives: optional near-identity distractors (adds ``negative_max_mean`` and ``reward_mean``).
        config: a :class:`ValidationConfig`; keyword ``overrides`` replace its fields.
        history_path: JSONL file with one line per validation (appended and fsynced). An existing file is read
            back, so a resumed run keeps its best step and patience counter; a torn last line is ignored. A
            validation counts (best step, patience) only once its line is on disk: when the append fails, the
            error propagates and the file and the in-memory state stay as they were.
        accelerator: an ``accelerate.Accelerator``: scalars go to ``accelerator.log(..., step=step)``, image grids
            to its tensorboard/wandb trackers, the early-stop signal to ``accelerator.set_trigger()``; only the main
            process writes the history.

    Every metric is a float in a flat ``dict[str, float]`` whose keys start with ``config.prefix``; identity scores
    are cosines in [-1, 1], higher is better (except ``class_leakage_*`` and ``copy_*``, lower is better).

    Example:
        >>> validator = IdentityValidator("nearid/", "subject/", history_path="out/history.jsonl")  # doctest: +SKIP
        >>> metrics = validator.validate(images, step=global_step)  # [B, 3, H, W] in [0, 1]    # doctest: +SKIP
        >>> validator.best_step, validator.should_stop                                          # doctest: +SKIP
    """

    def __init__(
        self,
        model: NearIDModel | IdentityReward | str | os.PathLike[str],
        references: ImageInput | None = None,
        *,
        negatives: ImageInput | None = None,
        config: ValidationConfig | None = None,
        history_path: str | os.PathLike[str] | None = None,
        accelerator: Any = None,
        **overrides: Any,
    ) -> None:
        base = with_overrides(config, ValidationConfig, overrides, "IdentityValidator")
        self.config = base
        if isinstance(model, IdentityReward):
            if references is not None or negatives is not None:
                raise ValueError(
                    "pass `references`/`negatives` to the IdentityReward, not to the validator, when reusing one"
                )
            if base.aggregate is not None and base.aggregate != model.config.aggregate:
                raise ValueError(
                    f"ValidationConfig.aggregate={base.aggregate!r} differs from the reward's aggregate "
                    f"{model.config.aggregate!r}; leave it None to use the reward's"
                )
            self.scorer = model
        else:
            if references is None:
                raise ValueError("`references` is required (the subject's reference photos)")
            self.scorer = IdentityReward(model, references, negatives=negatives, aggregate=base.aggregate or "mean")
        self.accelerator = accelerator
        self.history_path = Path(history_path) if history_path is not None else None
        self.history: list[dict[str, Any]] = []
        self.best_step: int | None = None
        self.best_value: float | None = None
        self.last_is_best = False
        self.last_scores: torch.Tensor | None = None  # [B] identity score of each image of the last compute()
        self.validations_without_improvement = 0
        self._warned_monitor = False
        if base.threshold_kind == "relative" and not math.isfinite(self.scorer.oracle):
            logger.warning(
                "threshold_kind='relative' needs at least 2 references for the oracle; frac_above_threshold is skipped"
            )
        if self.history_path is not None and self.history_path.exists():
            for record in read_jsonl(self.history_path):
                self._track(record, replay=True)
            if self.history:
                logger.info(
                    "resumed identity history %s: %d validations, best step %s (%s=%.4f)", self.history_path,
                    len(self.history), self.best_step, self.config.monitor, self.best_value or float("nan"),
                )  # fmt: skip

    # ------------------------------------------------------------------ properties
    @property
    def threshold(self) -> float | None:
        """The cosine bar of ``frac_above_threshold`` (None when it cannot be computed)."""
        if self.config.threshold_kind == "cosine":
            return self.config.threshold
        oracle = self.scorer.oracle
        return self.config.threshold * oracle if math.isfinite(oracle) else None

    @property
    def should_stop(self) -> bool:
        """True once ``patience`` validations in a row did not improve the monitored metric."""
        patience = self.config.patience
        return patience is not None and self.validations_without_improvement >= patience

    @property
    def monitor_key(self) -> str:
        return self.config.prefix + self.config.monitor

    @property
    def is_main_process(self) -> bool:
        return bool(getattr(self.accelerator, "is_main_process", True))

    def last_validation(self, at_or_before: int | None = None) -> dict[str, Any] | None:
        """The latest history record (with ``step <= at_or_before`` when given)."""
        for record in reversed(self.history):
            if at_or_before is None or int(record.get("step", -1)) <= at_or_before:
                return record
        return None

    # ------------------------------------------------------------------ scoring
    def embed(
        self, images: ImageInput, *, value_range: tuple[float, float] = (0.0, 1.0), name: str = "images"
    ) -> torch.Tensor:
        """Embeddings ``[N, E]`` without gradients; NaN/Inf and value-range mistakes raise ``ValueError``."""
        return self.scorer.embed_images(images, value_range=value_range, name=name, check_inputs=True)

    def compute(
        self,
        images: ImageInput,
        *,
        class_images: ImageInput | None = None,
        base_images: ImageInput | None = None,
        value_range: tuple[float, float] = (0.0, 1.0),
    ) -> dict[str, float]:
        """Metrics of one set of generations without touching the history (flat ``dict[str, float]``, prefixed)."""
        value_range = check_value_range(value_range)
        emb = self.embed(images, value_range=value_range, name="images")
        class_emb = base_emb = None
        if class_images is not None:
            class_emb = self.embed(class_images, value_range=value_range, name="class_images")
        if base_images is not None:
            base_emb = self.embed(base_images, value_range=value_range, name="base_images")
        with torch.no_grad():
            metrics = identity_metrics(
                self.scorer, emb, threshold=self.threshold, copy_margin=self.config.copy_margin,
                class_embeddings=class_emb, base_embeddings=base_emb,
            )  # fmt: skip
            self.last_scores = self.scorer.score_embeddings(emb).identity.detach().float().cpu()  # [B]
        return {self.config.prefix + k: v for k, v in metrics.items()}

    def validate(
        self,
        images: ImageInput,
        *,
        step: int,
        prompts: Sequence[str] | None = None,
        class_images: ImageInput | None = None,
        base_images: ImageInput | None = None,
        value_range: tuple[float, float] = (0.0, 1.0),
        extra_metrics: dict[str, float] | None = None,
        source: str | None = None,
    ) -> dict[str, float]:
        """Score one validation at training step ``step``, append it to the history, update best and patience.

        Args:
            images: generations of the instance prompts (``[B, 3, H, W]`` in ``value_range``, PIL, paths).
            step: the true global training step (the x axis of every tracker).
            prompts: the prompt of each image (captions of the logged grid).
            class_images: generations of class prompts with the adapter (class-prompt leakage).
            base_images: the same prompts and seeds rendered by the base model (identity gain).
            value_range: ``(low, high)`` of tensor pixel values.
            extra_metrics: more scalars to store in the same history line and log (e.g. scores of images the
                training script rendered itself); they do not take part in best tracking unless monitored.
            source: what triggered this validation (e.g. ``"validation"``, ``"checkpoint"``), kept in the history.

        Returns:
            The flat metrics dict, plus ``{prefix}best_value`` and ``{prefix}is_best``.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"`step` must be a non-negative int (the global training step), got {step!r}")
        step = int(step)
        value_range = check_value_range(value_range)
        if prompts is not None and isinstance(images, torch.Tensor) and len(prompts) != images.shape[0]:
            raise ValueError(f"`prompts` has {len(prompts)} entries but `images` has {images.shape[0]} images")
        metrics = self.compute(images, class_images=class_images, base_images=base_images, value_range=value_range)
        if extra_metrics:
            metrics.update({k: float(v) for k, v in extra_metrics.items()})
        record: dict[str, Any] = {"step": step, "time": time.time(), **metrics}
        if source is not None:
            record["source"] = str(source)
        # The history line reaches the disk first: if that fails (e.g. a full disk) the error propagates and the
        # in-memory best/patience state stays that of the file.
        is_best, value = self._judge(record)
        record["is_best"] = is_best
        if self.history_path is not None and self.is_main_process:
            append_jsonl(self.history_path, record)
        self._commit(record, is_best, value)
        p = self.config.prefix
        if self.best_value is not None:
            metrics[p + "best_value"] = float(self.best_value)
        metrics[p + "is_best"] = float(self.last_is_best)
        if self.accelerator is not None:
            self._log(metrics, step, images, prompts, value_range)
            if self.should_stop and hasattr(self.accelerator, "set_trigger"):
                self.accelerator.set_trigger()
        if self.should_stop:
            logger.warning(
                "identity early stop: %s has not improved for %d validations (best %.4f at step %s)",
                self.monitor_key, self.validations_without_improvement, self.best_value or float("nan"),
                self.best_step,
            )  # fmt: skip
        return metrics

    # ------------------------------------------------------------------ best tracking
    def _track(self, record: dict[str, Any], *, replay: bool) -> None:
        is_best, value = self._judge(record)
        record["is_best"] = is_best
        self._commit(record, is_best, value)

    def _judge(self, record: dict[str, Any]) -> tuple[bool, float | None]:
        """Whether ``record`` improves on the best so far, and its monitored value (None when it has none)."""
        value = record.get(self.monitor_key)
        if value is None:
            value = record.get(self.config.monitor)
        if value is None or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            if not self._warned_monitor:
                logger.warning("monitor %r is not among the metrics of step %s; best tracking skips it",
                               self.monitor_key, record.get("step"))
                self._warned_monitor = True
            return False, None
        value = float(value)
        if self.best_value is None:
            return True, value
        if self.config.mode == "max":
            return value > self.best_value + self.config.min_delta, value
        return value < self.best_value - self.config.min_delta, value

    def _commit(self, record: dict[str, Any], is_best: bool, value: float | None) -> None:
        """Record a judged validation in memory: history, best step and value, patience counter."""
        if value is not None:
            if is_best:
                self.best_value, self.best_step = value, int(record.get("step", -1))
                self.validations_without_improvement = 0
            else:
                self.validations_without_improvement += 1
        self.last_is_best = is_best
        self.history.append(record)

    # ------------------------------------------------------------------ trackers
    def _log(
        self,
        metrics: dict[str, float],
        step: int,
        images: ImageInput,
        prompts: Sequence[str] | None,
        value_range: tuple[float, float],
    ) -> None:
        self.accelerator.log(metrics, step=step)
        if not self.config.log_images or not isinstance(images, torch.Tensor) or not self.is_main_process:
            return
        names = ("tensorboard", "wandb")
        trackers = [t for t in getattr(self.accelerator, "trackers", []) if getattr(t, "name", None) in names]
        if not trackers or self.last_scores is None:
            return
        n = min(images.shape[0], self.config.max_logged_images)
        scores = self.last_scores[:n].tolist()
        captions = [
            f"{i}: {s:.3f}" + (f" | {prompts[i]}" if prompts is not None else "") for i, s in enumerate(scores)
        ]
        tag = self.config.prefix + "validation"
        for tracker in trackers:
            try:
                if tracker.name == "tensorboard":
                    grid = image_grid(images[:n], [f"{s:.3f}" for s in scores], value_range=value_range)
                    tracker.log_images({tag: grid[None]}, step=step, dataformats="NHWC")
                    tracker.log({tag + "_captions": "\n\n".join(captions)}, step=step)
                else:
                    import wandb

                    lo, hi = value_range
                    x = ((images[:n].detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
                    arrays = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
                    tracker.log({tag: [wandb.Image(a, caption=c) for a, c in zip(arrays, captions)]}, step=step)
            except Exception:  # a tracker problem must never stop validation
                logger.exception("could not log validation images to the %s tracker", tracker.name)
