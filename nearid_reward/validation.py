"""``IdentityValidator``: identity metrics of generated images, a crash-safe history, best-step tracking and
early stopping. Framework-free; given an accelerate ``Accelerator`` it also logs to its trackers.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .config import with_overrides
from .files import append_jsonl, read_jsonl
from .images import ImageInput, check_value_range
from .metrics import METRICS, MetricSpec, metric_names
from .metrics import identity_metrics as _identity_metrics
from .model import NearIDModel, as_nearid_model
from .references import ReferenceSet, embed_images, embed_images_with_context
from .results import image_grid, log_scored_images
from .reward import IdentityReward, RewardConfig
from .similarity import Aggregate

logger = logging.getLogger(__name__)

__all__ = ["ValidationConfig", "IdentityValidator", "identity_metrics", "image_grid"]


@dataclass
class ValidationConfig:
    """Options of :class:`IdentityValidator`.

    Attributes:
        aggregate: reference aggregation (``"mean"``, ``"max"``, ``"centroid"``); None uses the given reward's or
            reference set's, else ``"mean"``.
        threshold: the bar for ``frac_above_threshold``.
        threshold_kind: ``"relative"`` (the bar is ``threshold x reference oracle``; needs >= 2 references) or
            ``"cosine"`` (the bar is the cosine ``threshold`` itself).
        copy_margin: a generation counts as a suspected copy of reference ``r`` when its similarity to ``r``
            exceeds ``r``'s similarity to its nearest other reference by more than this margin.
        copy_guard: the copy guard (None: off). When set, :meth:`IdentityValidator.compute` also returns
            ``context_copy_fraction``, the share of generations whose scene (mean-pooled backbone tokens, from the
            same forward pass) is as close to the references' as theirs are to each other (the training place
            copied; :func:`~nearid_reward.metrics.context_copy_scores`), and a validation whose
            ``context_copy_fraction`` exceeds ``copy_guard`` never becomes the best step. In [0, 1]; 1.0 logs the
            signal without guarding. Meant for references taken in one place and prompts that ask for others.
        context_margin: a generation counts as a copy when its scene similarity is above the references' band
            minus this margin. Generated images never reach the band of real photos of one place (the generator's
            own texture sets them apart), so the margin is needed; 0.2 was chosen in the generation world
            (docs/world.md), where a copying sample sits about 0.1-0.15 below the band and a sample of another
            place 0.3-0.5 below it.
        monitor: the metric (without prefix) that decides the best step, e.g. ``"identity_mean"``,
            ``"relative_mean"`` or ``"identity_gain"``.
        mode: ``"max"`` (higher monitor is better) or ``"min"``.
        min_delta: an improvement must beat the best by more than this.
        patience: raise the early-stop signal after this many validations without improvement (None: never).
        prefix: added to every metric name when logging (trackers, history, the dict :meth:`IdentityValidator.validate`
            returns): ``"nearid/"`` logs ``identity_mean`` as ``nearid/identity_mean``.
        log_images: send an image grid with scores to tensorboard/wandb trackers of the accelerator.
        max_logged_images: at most this many images in the logged grid.
    """

    aggregate: Aggregate | None = None
    threshold: float = 0.9
    threshold_kind: Literal["relative", "cosine"] = "relative"
    copy_margin: float = 0.0
    copy_guard: float | None = None
    context_margin: float = 0.2
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
        if not self.context_margin >= 0:
            raise ValueError(f"ValidationConfig.context_margin must be >= 0, got {self.context_margin}")
        if self.copy_guard is not None and not 0.0 <= self.copy_guard <= 1.0:
            raise ValueError(f"ValidationConfig.copy_guard must be in [0, 1] or None, got {self.copy_guard}")
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ValueError(f"ValidationConfig.monitor must be a metric name, got {self.monitor!r}")


# ---------------------------------------------------------------------------------------------- metrics
def identity_metrics(*args: Any, **kwargs: Any) -> dict[str, float]:
    """:func:`nearid_reward.metrics.identity_metrics` (``embeddings, references, ...``).

    The former call ``identity_metrics(scorer, embeddings, ...)`` with an :class:`~nearid_reward.IdentityReward`
    still works and warns (``DeprecationWarning``).
    """
    if args and isinstance(args[0], IdentityReward):
        warnings.warn(
            "identity_metrics(scorer, embeddings, ...) is deprecated: call nearid_reward.metrics.identity_metrics("
            "embeddings, scorer.references, ...)", DeprecationWarning, stacklevel=2,
        )  # fmt: skip
        scorer, embeddings, *rest = args
        kwargs.setdefault("negative_weight", scorer.config.negative_weight)
        kwargs.setdefault("reward_kind", scorer.config.kind)
        return _identity_metrics(embeddings, scorer.references, *rest, **kwargs)
    return _identity_metrics(*args, **kwargs)


class _Metrics(dict):  # type: ignore[type-arg]
    """The metrics of :meth:`IdentityValidator.compute`; a key with the logging prefix still works, with a warning.

    ``compute`` returned prefixed keys (``nearid/identity_mean``) before the prefix moved to logging only.
    """

    def __init__(self, metrics: dict[str, float], prefix: str) -> None:
        super().__init__(metrics)
        self._prefix = prefix

    def __missing__(self, key: str) -> float:
        if self._prefix and isinstance(key, str) and key.startswith(self._prefix) and key[len(self._prefix):] in self:
            warnings.warn(
                f"IdentityValidator.compute() returns unprefixed metric names: use {key[len(self._prefix):]!r}, not "
                f"{key!r} (the {self._prefix!r} prefix is added only when logging)", DeprecationWarning, stacklevel=2,
            )  # fmt: skip
            return self[key[len(self._prefix) :]]
        raise KeyError(key)


# ---------------------------------------------------------------------------------------------- validator
class IdentityValidator:
    """Identity validation for personalisation runs: metrics, JSONL history, best step and early stopping.

    Args:
        model: a :class:`~nearid_reward.NearIDModel`, a checkpoint path, or an existing
            :class:`~nearid_reward.IdentityReward` (its model and :class:`~nearid_reward.ReferenceSet` are shared;
            pass ``references=None``).
        references: the subject's reference photos (tensor ``[R, 3, H, W]`` in [0, 1], PIL, paths or a folder), or a
            :class:`~nearid_reward.ReferenceSet` embedded with ``model`` (shared, not copied).
        negatives: optional near-identity distractors (adds ``negative_max_mean`` and ``reward_mean``); not with a
            reward or a ``ReferenceSet``, which carry their own.
        config: a :class:`ValidationConfig`; keyword ``overrides`` replace its fields.
        history_path: JSONL file with one line per validation (appended and fsynced). An existing file is read
            back, so a resumed run keeps its best step and patience counter; a torn last line is ignored. A
            validation counts (best step, patience) only once its line is on disk: when the append fails, the
            error propagates and the file and the in-memory state stay as they were.
        accelerator: an ``accelerate.Accelerator``: scalars go to ``accelerator.log(..., step=step)``, image grids
            to its tensorboard/wandb trackers, the early-stop signal to ``accelerator.set_trigger()``; only the main
            process writes the history.

    :meth:`compute` returns the metrics by name (``identity_mean``; see :data:`~nearid_reward.metrics.METRICS` for
    each one's direction); :meth:`validate` logs them with ``config.prefix`` (``nearid/identity_mean``) to the
    trackers and the history, and returns that logged dict. Identity scores are cosines in [-1, 1].

    Example:
        >>> from nearid_reward.testing import random_images, tiny_nearid_model
        >>> photos = random_images(3, 48, seed=1)  # or a folder; add history_path="out/identity_history.jsonl"
        >>> validator = IdentityValidator(tiny_nearid_model(), photos, patience=1)
        >>> first = validator.validate(random_images(2, 48, seed=7), step=100)  # generations [B, 3, H, W] in [0, 1]
        >>> second = validator.validate(photos, step=200)  # as close to the subject as its own photos
        >>> second["nearid/identity_mean"] > first["nearid/identity_mean"], validator.best_step
        (True, 200)
        >>> third = validator.validate(random_images(2, 48, seed=7), step=300)
        >>> validator.best_step, validator.should_stop  # no improvement at step 300: patience 1 is used up
        (200, True)
        >>> validator.compute(photos)["identity_mean"] == second["nearid/identity_mean"]  # names without prefix
        True
    """

    def __init__(
        self,
        model: NearIDModel | IdentityReward | str | os.PathLike[str],
        references: ImageInput | ReferenceSet | None = None,
        *,
        negatives: ImageInput | None = None,
        config: ValidationConfig | None = None,
        history_path: str | os.PathLike[str] | None = None,
        accelerator: Any = None,
        **overrides: Any,
    ) -> None:
        base = with_overrides(config, ValidationConfig, overrides, "IdentityValidator")
        self.config = base
        self._reward: IdentityReward | None = None
        if isinstance(model, IdentityReward):
            if references is not None or negatives is not None:
                raise ValueError(
                    "pass `references`/`negatives` to the IdentityReward, not to the validator, when reusing one"
                )
            self._check_aggregate(model.config.aggregate, "the reward's")
            self._reward = model
            self.model: NearIDModel = model.model
            self.references: ReferenceSet = model.references
            self.reward_config = model.config
        else:
            if references is None:
                raise ValueError("`references` is required (the subject's reference photos)")
            self.model = as_nearid_model(model)
            self.model.requires_grad_(False)
            self.model.train(False)
            if isinstance(references, ReferenceSet):
                if negatives is not None:
                    raise ValueError("`negatives` must not be given with a ReferenceSet: it carries its own negatives")
                self._check_aggregate(references.aggregate, "the ReferenceSet's")
                self.references = references
            else:
                self.references = ReferenceSet.from_images(self.model, references, negatives,
                                                           aggregate=base.aggregate or "mean")
            self.reward_config = RewardConfig(aggregate=self.references.aggregate)
        self.accelerator = accelerator
        self.history_path = Path(history_path) if history_path is not None else None
        self.history: list[dict[str, Any]] = []
        self.best_step: int | None = None
        self.best_value: float | None = None
        self.last_is_best = False
        self.last_scores: torch.Tensor | None = None  # [B] identity score of each image of the last compute()
        self.validations_without_improvement = 0
        self._warned_monitor = False
        spec = METRICS.get(base.monitor)
        if spec is not None and spec.higher_is_better is not None and spec.higher_is_better != (base.mode == "max"):
            logger.warning("monitor %r is %s-is-better but mode=%r: the best step will be its %s", base.monitor,
                           "higher" if spec.higher_is_better else "lower", base.mode,
                           "maximum" if base.mode == "max" else "minimum")  # fmt: skip
        if base.copy_guard is not None and (not self.references.has_contexts or self.references.num_references < 2):
            raise ValueError(
                "copy_guard needs the context features of >= 2 references: give the reference photos (or a "
                f"ReferenceSet built with ReferenceSet.from_images); got {self.references.num_references} "
                f"reference(s), context features {'present' if self.references.has_contexts else 'absent'}"
            )
        if base.threshold_kind == "relative" and not math.isfinite(self.references.oracle):
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

    def _check_aggregate(self, aggregate: str, whose: str) -> None:
        if self.config.aggregate is not None and self.config.aggregate != aggregate:
            raise ValueError(
                f"ValidationConfig.aggregate={self.config.aggregate!r} differs from {whose} aggregate "
                f"{aggregate!r}; leave it None to use {whose}"
            )

    def to(self, device: torch.device | str) -> IdentityValidator:
        """Move the model and the reference set to ``device`` (both may be shared with a reward)."""
        self.model.to(device)
        self.references.to(device)
        return self

    # ------------------------------------------------------------------ properties
    @property
    def scorer(self) -> IdentityReward:
        """Deprecated: an :class:`~nearid_reward.IdentityReward` over :attr:`model` and :attr:`references`."""
        warnings.warn(
            "IdentityValidator.scorer is deprecated: use validator.references (the ReferenceSet) and validator.model",
            DeprecationWarning, stacklevel=2,
        )  # fmt: skip
        if self._reward is None:
            self._reward = IdentityReward(self.model, self.references, config=self.reward_config)
        return self._reward

    @property
    def threshold(self) -> float | None:
        """The cosine bar of ``frac_above_threshold`` (None when it cannot be computed)."""
        if self.config.threshold_kind == "cosine":
            return self.config.threshold
        oracle = self.references.oracle
        return self.config.threshold * oracle if math.isfinite(oracle) else None

    @property
    def should_stop(self) -> bool:
        """True once ``patience`` validations in a row did not improve the monitored metric."""
        patience = self.config.patience
        return patience is not None and self.validations_without_improvement >= patience

    @property
    def monitor_key(self) -> str:
        """The monitored metric as logged (``config.prefix + config.monitor``)."""
        return self.config.prefix + self.config.monitor

    @property
    def is_main_process(self) -> bool:
        return bool(getattr(self.accelerator, "is_main_process", True))

    def metric_names(self, *, class_images: bool = False, base_images: bool = False,
                     paired_base: bool = True) -> dict[str, MetricSpec]:
        """The metrics :meth:`compute` returns with these inputs (unprefixed names, each with its direction)."""
        return metric_names(
            oracle=self.references.num_references >= 2 and math.isfinite(self.references.oracle),
            threshold=self.threshold is not None, negatives=self.references.num_negatives > 0,
            class_images=class_images, base_images=base_images, paired_base=paired_base,
            contexts=self.config.copy_guard is not None,
        )  # fmt: skip

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
        return embed_images(self.model, images, value_range=value_range, name=name,
                            chunk_size=self.reward_config.reference_chunk_size, check_inputs=True)

    def compute(
        self,
        images: ImageInput,
        *,
        class_images: ImageInput | None = None,
        base_images: ImageInput | None = None,
        value_range: tuple[float, float] = (0.0, 1.0),
    ) -> dict[str, float]:
        """Metrics of one set of generations, by name (no prefix), without touching the history.

        Every image is embedded and scored once; the per-image identity scores are kept in :attr:`last_scores`.
        """
        value_range = check_value_range(value_range)
        contexts = None
        if self.config.copy_guard is None:
            emb = self.embed(images, value_range=value_range, name="images")
        else:  # the scene features come from the same backbone pass as the identity embeddings
            emb, contexts = embed_images_with_context(self.model, images, value_range=value_range, name="images",
                                                      chunk_size=self.reward_config.reference_chunk_size)
        class_emb = base_emb = None
        if class_images is not None:
            class_emb = self.embed(class_images, value_range=value_range, name="class_images")
        if base_images is not None:
            base_emb = self.embed(base_images, value_range=value_range, name="base_images")
        with torch.no_grad():
            identity = self.references.scores(emb)  # [B]
            metrics = _identity_metrics(
                emb, self.references, threshold=self.threshold, copy_margin=self.config.copy_margin,
                class_embeddings=class_emb, base_embeddings=base_emb, identity=identity,
                negative_weight=self.reward_config.negative_weight, reward_kind=self.reward_config.kind,
                contexts=contexts, context_margin=self.config.context_margin,
            )  # fmt: skip
        self.last_scores = identity.detach().float().cpu()
        return _Metrics(metrics, self.config.prefix)

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
            extra_metrics: more scalars, by name like the metrics (e.g. ``"script/identity_mean"`` for images the
                training script rendered itself), stored in the same history line and logged with the prefix; they
                do not take part in best tracking unless monitored.
            source: what triggered this validation (e.g. ``"validation"``, ``"checkpoint"``), kept in the history.

        Returns:
            The logged dict: every metric as ``{prefix}{name}``, plus ``{prefix}best_value`` and ``{prefix}is_best``.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"`step` must be a non-negative int (the global training step), got {step!r}")
        step = int(step)
        value_range = check_value_range(value_range)
        if prompts is not None and isinstance(images, torch.Tensor) and len(prompts) != images.shape[0]:
            raise ValueError(f"`prompts` has {len(prompts)} entries but `images` has {images.shape[0]} images")
        named = dict(self.compute(images, class_images=class_images, base_images=base_images, value_range=value_range))
        named.update({k: float(v) for k, v in (extra_metrics or {}).items()})
        p = self.config.prefix
        metrics = {p + k: v for k, v in named.items()}  # the only place the logging prefix is added
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

    def record(self, metrics: dict[str, float], *, step: int, source: str | None = None) -> dict[str, float]:
        """Append a history line of scalars scored elsewhere, without images of the prompt set.

        For a validation whose prompt-set render failed: the line keeps what was scored (e.g. the training
        script's own images as ``script/...``), so no validation loses its line. The monitor is usually not among
        ``metrics``; the line then takes no part in best tracking or patience.

        Args:
            metrics: scalars by name (no prefix), e.g. ``{"script/identity_mean": 0.41}``.
            step: the true global training step.
            source: what triggered this validation, kept in the history.

        Returns:
            The logged dict, every name with the prefix.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"`step` must be a non-negative int (the global training step), got {step!r}")
        p = self.config.prefix
        logged = {p + k: float(v) for k, v in metrics.items()}
        line: dict[str, Any] = {"step": int(step), "time": time.time(), **logged}
        if source is not None:
            line["source"] = str(source)
        monitored = self.monitor_key in line or self.config.monitor in line
        is_best, value = self._judge(line) if monitored else (False, None)
        line["is_best"] = is_best
        if self.history_path is not None and self.is_main_process:
            append_jsonl(self.history_path, line)
        self._commit(line, is_best, value)
        if self.accelerator is not None:
            self.accelerator.log(logged, step=int(step))
        return logged

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
        guard = self.config.copy_guard
        if guard is not None:  # a copying validation is never the best, whatever its identity score
            signal = record.get(self.config.prefix + "context_copy_fraction", record.get("context_copy_fraction"))
            if isinstance(signal, (int, float)) and float(signal) > guard:  # counts as a validation without gain
                finite = isinstance(value, (int, float)) and math.isfinite(float(value))
                return False, float(value) if finite else None
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
        if self.last_scores is None:
            return
        log_scored_images(self.accelerator, images, self.last_scores.tolist(), prompts, step=step,
                          tag=self.config.prefix + "validation", value_range=value_range,
                          max_images=self.config.max_logged_images)
