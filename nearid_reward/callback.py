"""``NearIDValidationCallback``: identity validation and best-adapter keeping for custom training loops.

Call :meth:`NearIDValidationCallback.on_validation` where the loop validates (with the pipeline, or with images
already rendered) and :meth:`NearIDValidationCallback.on_checkpoint` after each ``accelerator.save_state``. The
callback never stops a training run: an exception while rendering, scoring or saving is logged with its traceback
and the loop continues (``strict=True`` re-raises instead).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapters import save_pipeline_adapter
from .config import with_overrides
from .files import remove_stale_temporaries, replace_directory, write_json_atomic
from .images import ImageInput
from .rendering import PromptSet, RenderConfig, RenderedSet, render_validation_set
from .run_checkpoints import checkpoint_step, copy_checkpoint_weights, inspect_checkpoint
from .validation import IdentityValidator

logger = logging.getLogger(__name__)

__all__ = ["CallbackConfig", "NearIDValidationCallback", "save_pipeline_adapter"]

SCORES_FILE_NAME = "identity_scores.json"
BEST_DIR_NAME = "best_identity"


@dataclass
class CallbackConfig:
    """Options of :class:`NearIDValidationCallback`.

    Attributes:
        instance_token: fills ``{token}`` in the prompt set (e.g. ``"sks"``).
        class_noun: fills ``{class}`` (e.g. ``"dog"``).
        render: how validation images are rendered from a pipeline.
        save_best: keep the best adapter in ``output_dir/best_identity/``.
        best_dir_name: folder name of the best adapter inside ``output_dir``.
        strict: re-raise exceptions instead of logging them.
    """

    instance_token: str = "sks"
    class_noun: str = ""
    render: RenderConfig = field(default_factory=RenderConfig)
    save_best: bool = True
    best_dir_name: str = BEST_DIR_NAME
    strict: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.render, RenderConfig):
            raise TypeError(f"CallbackConfig.render must be a RenderConfig, got {type(self.render).__name__}")
        if not self.best_dir_name or "/" in self.best_dir_name or self.best_dir_name.startswith("checkpoint-"):
            raise ValueError(
                f"CallbackConfig.best_dir_name must be a plain folder name not starting with 'checkpoint-' (so "
                f"checkpoint pruning never removes it), got {self.best_dir_name!r}"
            )


def _is_pipeline(obj: Any) -> bool:
    return callable(obj) and any(isinstance(getattr(obj, a, None), torch.nn.Module) for a in ("unet", "transformer"))


class NearIDValidationCallback:
    """Identity validation for a custom diffusers training loop.

    Args:
        validator: the :class:`~nearid_reward.IdentityValidator` (references, metrics, history, trackers).
        output_dir: the run's output folder (holds ``checkpoint-N/`` and ``best_identity/``); None disables
            saving the best adapter. Temporaries that a killed earlier run of the callback left in it (and in its
            ``checkpoint-N/`` folders) are removed on the main process.
        prompts: a :class:`~nearid_reward.PromptSet` (default: the shipped identity prompt set), filled with
            ``config.instance_token`` and ``config.class_noun`` when it has placeholders.
        config: a :class:`CallbackConfig`; keyword ``overrides`` replace its fields.

    Example:
        >>> callback = NearIDValidationCallback(validator, output_dir=out_dir, class_noun="dog")  # doctest: +SKIP
        >>> callback.on_validation(pipeline, global_step)  # renders, scores, logs, keeps the best  # doctest: +SKIP
        >>> accelerator.save_state(ckpt_dir)                                                       # doctest: +SKIP
        >>> callback.on_checkpoint(out_dir, global_step)                                           # doctest: +SKIP
    """

    def __init__(
        self,
        validator: IdentityValidator,
        *,
        output_dir: str | os.PathLike[str] | None = None,
        prompts: PromptSet | None = None,
        config: CallbackConfig | None = None,
        **overrides: Any,
    ) -> None:
        if not isinstance(validator, IdentityValidator):
            raise TypeError(f"`validator` must be an IdentityValidator, got {type(validator).__name__}")
        base = with_overrides(config, CallbackConfig, overrides, "NearIDValidationCallback")
        self.config = base
        self.validator = validator
        self.output_dir = Path(output_dir) if output_dir is not None else None
        template = prompts if prompts is not None else PromptSet.default()
        self.prompts = template.fill(base.instance_token, base.class_noun) if template.has_placeholders else template
        self.best_saved_step: int | None = None
        self.last_error: BaseException | None = None
        self._last_render: tuple[int, RenderedSet] | None = None
        self._cleaned: set[Path] = set()
        if self.output_dir is not None:
            self._remove_stale_temporaries(self.output_dir)

    @property
    def best_dir(self) -> Path | None:
        return None if self.output_dir is None else self.output_dir / self.config.best_dir_name

    # ------------------------------------------------------------------ hooks
    def on_validation(
        self,
        pipeline_or_images: Any,
        step: int,
        *,
        prompts: list[str] | None = None,
        class_images: ImageInput | None = None,
        base_images: ImageInput | None = None,
        value_range: tuple[float, float] = (0.0, 1.0),
        extra_metrics: dict[str, float] | None = None,
        source: str | None = None,
        reuse_render: bool = False,
    ) -> dict[str, float] | None:
        """Validate at global step ``step``.

        Args:
            pipeline_or_images: a diffusers pipeline (the prompt set is rendered with fixed seeds, plus the base
                model when an adapter is active and the class prompts), or generated images
                (``[B, 3, H, W]`` in ``value_range``, PIL images or paths).
            step: the global training step.
            prompts, class_images, base_images, value_range: as in :meth:`IdentityValidator.validate` (images only).
            extra_metrics, source: stored in the same history line (see :meth:`IdentityValidator.validate`).
            reuse_render: when the pipeline was already rendered at this very step (the weights have not changed
                since), score those images again instead of rendering the prompt set a second time.

        Returns:
            The metrics, or None when validation failed (the error is logged; see ``strict``).
        """
        try:
            if _is_pipeline(pipeline_or_images):
                if reuse_render and self._last_render is not None and self._last_render[0] == int(step):
                    rendered = self._last_render[1]
                else:
                    rendered = render_validation_set(pipeline_or_images, self.prompts, config=self.config.render)
                    self._last_render = (int(step), rendered)
                metrics = self.validator.validate(
                    rendered.images, step=step, prompts=rendered.prompts, class_images=rendered.class_images,
                    base_images=rendered.base_images, extra_metrics=extra_metrics, source=source,
                )  # fmt: skip
                if self._should_save(step):
                    self._save_best(step, lambda tmp: save_pipeline_adapter(pipeline_or_images, tmp), "pipeline")
            else:
                metrics = self.validator.validate(
                    pipeline_or_images, step=step, prompts=prompts, class_images=class_images,
                    base_images=base_images, value_range=value_range, extra_metrics=extra_metrics, source=source,
                )  # fmt: skip
                checkpoint = None if self.output_dir is None else self.output_dir / f"checkpoint-{step}"
                if self._should_save(step) and checkpoint is not None and checkpoint.is_dir():
                    self._save_from_checkpoint(checkpoint, step)
            return metrics
        except Exception as exc:
            return self._failed("validation", step, exc)

    def on_checkpoint(self, output_dir: str | os.PathLike[str], step: int) -> Path | None:
        """After a checkpoint save: write ``identity_scores.json`` into it; keep it as best when it is.

        Args:
            output_dir: the run's output folder (the checkpoint is ``output_dir/checkpoint-{step}``), or the
                ``checkpoint-{step}`` folder itself (what accelerate's save-state hooks receive), or the temporary
                folder it is being written to before it is renamed into place.
            step: the global step of the checkpoint.

        Returns:
            The written ``identity_scores.json``, or None on failure (logged; see ``strict``).
        """
        try:
            folder = Path(output_dir)
            if checkpoint_step(folder, being_written=True) == int(step):  # the checkpoint, maybe under its temporary
                checkpoint, run_dir = folder, folder.parent
            else:
                checkpoint, run_dir = folder / f"checkpoint-{step}", folder
            if self.output_dir is None:
                self.output_dir = run_dir
                self._remove_stale_temporaries(run_dir)
            if not checkpoint.is_dir():
                raise FileNotFoundError(f"checkpoint folder not found: {checkpoint}")
            record = self.validator.last_validation(at_or_before=int(step))
            path = checkpoint / SCORES_FILE_NAME
            write_json_atomic(path, self._scores_payload(int(step), record))
            if record is not None and int(record["step"]) == int(step) and self._should_save(int(step)):
                self._save_from_checkpoint(checkpoint, int(step))
            return path
        except Exception as exc:
            return self._failed("checkpoint", step, exc)

    # ------------------------------------------------------------------ internals
    def _remove_stale_temporaries(self, run_dir: Path) -> None:
        if run_dir in self._cleaned or not self.validator.is_main_process or not run_dir.is_dir():
            return
        self._cleaned.add(run_dir)
        for folder in [run_dir, *sorted(p for p in run_dir.iterdir() if checkpoint_step(p) is not None)]:
            remove_stale_temporaries(folder)

    def _should_save(self, step: int) -> bool:
        return (
            self.config.save_best
            and self.output_dir is not None
            and self.validator.best_step == step
            and self.validator.last_validation(at_or_before=step) is not None
            and bool(self.validator.last_validation(at_or_before=step).get("is_best"))  # type: ignore[union-attr]
            and self.best_saved_step != step
            and self.validator.is_main_process
        )

    def _scores_payload(self, step: int, record: dict[str, Any] | None) -> dict[str, Any]:
        cfg = self.validator.config
        return {
            "step": step,
            "validation_step": None if record is None else int(record["step"]),
            "metrics": {} if record is None else {k: v for k, v in record.items() if k not in ("step", "time")},
            "monitor": self.validator.monitor_key,
            "mode": cfg.mode,
            "best_step": self.validator.best_step,
            "best_value": self.validator.best_value,
        }

    def _save_from_checkpoint(self, checkpoint: Path, step: int) -> None:
        found = inspect_checkpoint(checkpoint)
        self._save_best(step, lambda tmp: copy_checkpoint_weights(found, tmp), str(checkpoint))

    def _save_best(self, step: int, write: Any, source: str) -> None:
        if self.best_dir is None:
            return
        record = self.validator.last_validation(at_or_before=step)

        def build(tmp: Path) -> None:
            write(tmp)
            payload = self._scores_payload(step, record)
            payload["source"] = source
            write_json_atomic(tmp / SCORES_FILE_NAME, payload)

        replace_directory(self.best_dir, build)
        self.best_saved_step = step
        logger.info("kept the best identity weights (step %d, %s=%.4f) in %s", step, self.validator.monitor_key,
                    self.validator.best_value or float("nan"), self.best_dir)

    def _failed(self, what: str, step: int, exc: BaseException) -> None:
        self.last_error = exc
        if self.config.strict:
            raise exc
        logger.exception("NearID %s at step %s failed; training continues (strict=True re-raises)", what, step)
        return None
