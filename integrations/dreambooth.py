"""``nearid-dreambooth``: run an unmodified diffusers DreamBooth / DreamBooth-LoRA script with NearID validation.

Usage::

    nearid-dreambooth --script train_dreambooth_lora.py --nearid_model NEARID_DIR \\
        --nearid_reference_dir SUBJECT_PHOTOS [--nearid_* options] -- <the script's own arguments>

    accelerate launch -m integrations.dreambooth --script ... -- ...      # several GPUs

The script file is imported as a module and its ``main`` called in this process (see
:mod:`integrations.script_hooks`). In the script's ``--output_dir`` the launcher writes:

* at each of the script's validations: the script's own images and NearID's prompt set (plus the base model with the
  adapter disabled, and class prompts when the script has ``--class_prompt``) scored; scalars logged to the script's
  trackers at the true global step; one line appended to ``identity_history.jsonl``;
* at each checkpoint: ``checkpoint-N/identity_scores.json`` (rendered and scored at that very step with
  ``--nearid_score_checkpoints``, the default) and the best weights in ``best_identity/``, which checkpoint pruning
  never touches;
* at the end: ``identity_summary.md`` and ``identity_summary.png``, and with ``--nearid_select_after`` a
  checkpoint selection over every remaining checkpoint (``identity_selection.json``/``.csv``/``.png``), ranked by
  ``--nearid_monitor``/``--nearid_mode`` with this run's references, negatives, prompts and render settings.

One NearID model (backbone in ``--nearid_dtype``) and one reference set serve validation, checkpoint scoring, the
identity loss and the selection.

Scoring runs on the main process only and makes no collective call. Errors while scoring are logged and training
continues (``--nearid_strict`` re-raises).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from nearid_reward import IdentityValidator, NearIDModel, NearIDValidationCallback, ReferenceSet
from nearid_reward.callback import CallbackConfig
from nearid_reward.cli.entry_points import add_debug_flag, entry_point
from nearid_reward.files import read_jsonl, write_text_atomic
from nearid_reward.rendering import PromptSet, RenderConfig
from nearid_reward.results import SelectionResult, format_table, plot_identity_history, summary_markdown
from nearid_reward.selection import CheckpointSelector, SelectionConfig, load_pipeline

from .script_hooks import ValidationFamily, install_hooks, load_script, split_argv

logger = logging.getLogger(__name__)

__all__ = ["DreamBoothOptions", "DreamBoothSession", "build_parser", "main", "derive_token_and_class"]

HISTORY_NAME = "identity_history.jsonl"
SUMMARY_NAME = "identity_summary"


@dataclass
class DreamBoothOptions:
    """The launcher's own options (the ``--nearid_*`` flags)."""

    script: str
    model: str
    reference_dir: str
    negative_dir: str | None = None
    prompts: str | None = None
    instance_token: str | None = None
    class_noun: str | None = None
    num_inference_steps: int = 25
    guidance_scale: float | None = None
    images_per_prompt: int = 1
    resolution: int | None = None
    scheduler: str | None = "auto"
    render_base: bool = True
    score_checkpoints: bool = True
    monitor: str = "identity_mean"
    mode: str = "max"
    patience: int | None = None
    threshold: float = 0.9
    select_after: bool = False
    loss_weight: float = 0.0
    loss_max_timestep: int = 400
    dtype: str = "float32"
    strict: bool = False

    def __post_init__(self) -> None:
        if self.loss_weight < 0:
            raise ValueError(f"--nearid_loss_weight must be >= 0, got {self.loss_weight}")
        if self.mode not in ("max", "min"):
            raise ValueError(f"--nearid_mode must be 'max' or 'min', got {self.mode!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"--nearid_dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nearid-dreambooth",
        description="Run a diffusers DreamBooth/LoRA training script unmodified, with NearID identity validation, "
        "checkpoint sidecars, best-identity keeping and an optional identity loss. Put the script's own arguments "
        "after `--`.",
    )
    p.add_argument("--script", required=True, help="the diffusers training script, e.g. train_dreambooth_lora.py")
    p.add_argument("--nearid_model", required=True, help="NearID checkpoint folder (release, head-only or SigLIP)")
    p.add_argument("--nearid_reference_dir", required=True, help="folder of the subject's reference photos")
    p.add_argument("--nearid_negative_dir", default=None,
                   help="optional folder of near-identity distractors (look-alikes) to penalise")
    p.add_argument("--nearid_prompts", default=None,
                   help="prompt file (JSON {'instance': [...], 'class': [...]} or one prompt per line); "
                   "default: the shipped identity prompt set")
    p.add_argument("--nearid_instance_token", default=None,
                   help="fills {token} in the prompt set (default: derived from --instance_prompt)")
    p.add_argument("--nearid_class_noun", default=None,
                   help="fills {class} in the prompt set (default: derived from --class_prompt/--instance_prompt)")
    p.add_argument("--nearid_num_inference_steps", type=int, default=25)
    p.add_argument("--nearid_guidance_scale", type=float, default=None)
    p.add_argument("--nearid_images_per_prompt", type=int, default=1)
    p.add_argument("--nearid_resolution", type=int, default=None, help="render size (default: the pipeline's)")
    p.add_argument("--nearid_scheduler", default="auto",
                   help="scheduler of NearID's renders, the same at validations, checkpoints and in --nearid_select_"
                   "after (a diffusers class name; 'auto' = DDIM unless the pipeline is flow matching; 'pipeline' = "
                   "whatever the pipeline has at that moment)")
    p.add_argument("--nearid_no_base", action="store_true", help="do not render the base model (adapter disabled)")
    p.add_argument("--nearid_no_score_checkpoints", action="store_true",
                   help="do not render and score at checkpoint saves (sidecars then carry the last validation)")
    p.add_argument("--nearid_monitor", default="identity_mean",
                   help="metric that decides the best step (e.g. identity_mean, relative_mean, identity_gain)")
    p.add_argument("--nearid_mode", default="max", choices=["max", "min"])
    p.add_argument("--nearid_patience", type=int, default=None,
                   help="warn (and set accelerate's trigger) after this many validations without improvement")
    p.add_argument("--nearid_threshold", type=float, default=0.9,
                   help="fraction of the reference oracle an image must reach to count as on-identity")
    p.add_argument("--nearid_select_after", action="store_true",
                   help="after training, rank every remaining checkpoint by --nearid_monitor/--nearid_mode (as "
                   "nearid-select does), with this run's references, negatives, prompts and render settings")
    p.add_argument("--nearid_loss_weight", type=float, default=0.0,
                   help="EXPERIMENTAL: weight of a ReFL-style identity loss on the x0 prediction (0 = off)")
    p.add_argument("--nearid_loss_max_timestep", type=int, default=400,
                   help="the identity loss only uses samples with timestep below this (of 1000)")
    p.add_argument("--nearid_dtype", default="float32", choices=sorted(_DTYPES), help="NearID backbone dtype")
    p.add_argument("--nearid_strict", action="store_true", help="re-raise scoring errors instead of logging them")
    add_debug_flag(p)
    return p


def parse_options(argv: Sequence[str]) -> DreamBoothOptions:
    ns = build_parser().parse_args(list(argv))
    return DreamBoothOptions(
        script=ns.script, model=ns.nearid_model, reference_dir=ns.nearid_reference_dir,
        negative_dir=ns.nearid_negative_dir, prompts=ns.nearid_prompts, instance_token=ns.nearid_instance_token,
        class_noun=ns.nearid_class_noun, num_inference_steps=ns.nearid_num_inference_steps,
        guidance_scale=ns.nearid_guidance_scale, images_per_prompt=ns.nearid_images_per_prompt,
        resolution=ns.nearid_resolution, render_base=not ns.nearid_no_base,
        scheduler=None if ns.nearid_scheduler == "pipeline" else ns.nearid_scheduler,
        score_checkpoints=not ns.nearid_no_score_checkpoints, monitor=ns.nearid_monitor, mode=ns.nearid_mode,
        patience=ns.nearid_patience, threshold=ns.nearid_threshold, select_after=ns.nearid_select_after,
        loss_weight=ns.nearid_loss_weight, loss_max_timestep=ns.nearid_loss_max_timestep, dtype=ns.nearid_dtype,
        strict=ns.nearid_strict,
    )  # fmt: skip


def derive_token_and_class(instance_prompt: str | None, class_prompt: str | None) -> tuple[str, str]:
    """Instance token and class noun from the script's prompts.

    ``("a photo of sks dog", "a photo of dog")`` gives ``("sks", "dog")``: the token is what the instance prompt adds
    to the class prompt, the class noun the word that follows the token (or the class prompt's last word). Without a
    class prompt the instance prompt's last two words are taken as token and noun. ``--nearid_instance_token`` and
    ``--nearid_class_noun`` override both.
    """
    words = (instance_prompt or "").split()
    if not words:
        return "", ""
    if class_prompt:
        class_words = class_prompt.split()
        extra = [i for i, w in enumerate(words) if w not in class_words]
        if extra:
            token = " ".join(words[i] for i in extra)
            after = extra[-1] + 1
            noun = words[after] if after < len(words) and words[after] in class_words else class_words[-1]
            return token, noun
        return "", class_words[-1] if class_words else ""
    if len(words) == 1:
        return words[0], ""
    return words[-2], words[-1]


# Scoring runs on the main process only: the selector must neither split its work nor gather across processes.
_THIS_PROCESS_ONLY = SimpleNamespace(num_processes=1, process_index=0, is_main_process=True)


class DreamBoothSession:
    """Receives the hooks' events and turns them into NearID validation (main process only)."""

    def __init__(self, options: DreamBoothOptions) -> None:
        self.options = options
        self.strict = options.strict
        self.accelerator: Any = None
        self.args: Any = None
        self.step = 0
        self._callback: NearIDValidationCallback | None = None
        self._model: NearIDModel | None = None
        self._references: ReferenceSet | None = None
        self._checkpoint_pipeline: Any = None
        self._identity_loss: Any = None
        self.validations = 0
        self.script_scores: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ set-up
    def bind_args(self, args: Any) -> None:
        self.args = args

    @property
    def output_dir(self) -> Path:
        return Path(getattr(self.args, "output_dir", "."))

    @property
    def is_main(self) -> bool:
        return bool(getattr(self.accelerator, "is_main_process", True))

    @property
    def device(self) -> torch.device:
        return torch.device(self.accelerator.device) if self.accelerator is not None else torch.device("cpu")

    def nearid_model(self) -> NearIDModel:
        """The run's one NearID model, loaded on first use: backbone in ``--nearid_dtype``, head in float32."""
        if self._model is None:
            dtype = _DTYPES[self.options.dtype]
            self._model = NearIDModel.from_pretrained(self.options.model, torch_dtype=dtype, head_dtype=torch.float32)
            self._model.requires_grad_(False).to(self.device)
        return self._model

    def reference_set(self) -> ReferenceSet:
        """The subject's references and negatives, embedded once with :meth:`nearid_model`."""
        if self._references is None:
            self._references = ReferenceSet.from_images(self.nearid_model(), self.options.reference_dir,
                                                        self.options.negative_dir)
        return self._references

    def callback(self) -> NearIDValidationCallback:
        """The NearID validation callback, built on first use (on the main process only)."""
        if self._callback is None:
            o = self.options
            token, noun = derive_token_and_class(getattr(self.args, "instance_prompt", None),
                                                 getattr(self.args, "class_prompt", None))
            token = o.instance_token if o.instance_token is not None else token
            noun = o.class_noun if o.class_noun is not None else noun
            validator = IdentityValidator(
                self.nearid_model(), self.reference_set(), history_path=self.output_dir / HISTORY_NAME,
                accelerator=self.accelerator, monitor=o.monitor, mode=o.mode, patience=o.patience,
                threshold=o.threshold,
            )  # fmt: skip
            render = RenderConfig(
                num_inference_steps=o.num_inference_steps, guidance_scale=o.guidance_scale,
                images_per_prompt=o.images_per_prompt, height=o.resolution, width=o.resolution,
                render_base=o.render_base, render_class=bool(getattr(self.args, "class_prompt", None)),
                scheduler=o.scheduler,
            )  # fmt: skip
            self._callback = NearIDValidationCallback(
                validator, output_dir=self.output_dir, prompts=PromptSet.load(o.prompts),
                config=CallbackConfig(instance_token=token, class_noun=noun, render=render, strict=o.strict),
            )  # fmt: skip
            logger.info("NearID validation: token=%r class=%r, %d instance prompts, references %s", token, noun,
                        len(self._callback.prompts.instance), o.reference_dir)
        return self._callback

    # ------------------------------------------------------------------ hook events
    def on_accelerator(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        if self.options.loss_weight > 0:
            from .identity_loss import attach_identity_loss

            self._identity_loss = attach_identity_loss(accelerator, self)

    def on_step(self, step: int) -> None:
        self.step = step

    def extra_logs(self) -> dict[str, float]:
        """Values added to the script's next ``accelerator.log`` call (the identity loss of the last step)."""
        hook = self._identity_loss
        if hook is None or hook.last_value is None:
            return {}
        value, hook.last_value = hook.last_value, None
        return {"nearid/train_identity_loss": value}

    def on_validation(self, family: ValidationFamily, arguments: dict[str, Any], images: list[Any]) -> None:
        if not self.is_main:
            return
        args = arguments.get("args", self.args)
        if self.args is None:
            self.args = args
        step = int(arguments["global_step"]) if family == "components" else self.step
        pipeline = arguments.get("pipeline") if family == "pipeline" else self._pipeline_from_components(arguments)
        callback = self.callback()
        extra: dict[str, float] = {}
        if images:
            script_metrics = callback.validator.compute(list(images))
            extra = {"script/" + k: v for k, v in script_metrics.items()}  # logged as nearid/script/...
            self.script_scores.append({"step": step, **extra})
        final = bool(arguments.get("is_final_validation", False))
        callback.on_validation(pipeline, step, extra_metrics=extra, source="final" if final else "validation",
                               reuse_render=True)
        self.validations += 1

    def on_save_state(self, models: list[Any], weights: list[Any], output_dir: str) -> None:
        if not self.is_main or self.args is None:
            return
        callback = self.callback()
        step = _checkpoint_step(output_dir, self.step)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        if self.options.score_checkpoints:
            pipeline = self._pipeline_for_models(models)
            if pipeline is not None:
                callback.on_validation(pipeline, step, source="checkpoint")
        callback.on_checkpoint(output_dir, step)

    def on_end_training(self) -> None:
        if not self.is_main or self._callback is None:
            return
        write_summary(self.output_dir, self._callback.validator)
        if self.options.select_after:
            self._select_after()

    # ------------------------------------------------------------------ pipelines
    def _unwrap(self, component: Any) -> Any:
        """The module inside an accelerate/DDP wrapper; anything else (a tokenizer) as it is.

        accelerate's ``unwrap_model`` only handles modules: given a tokenizer it raises ``AttributeError``.
        """
        if self.accelerator is None or not isinstance(component, torch.nn.Module):
            return component
        return self.accelerator.unwrap_model(component)

    def _pipeline_from_components(self, arguments: dict[str, Any]) -> Any:
        """A pipeline over the live models that ``train_dreambooth.py`` passes to its ``log_validation``."""
        args = arguments["args"]
        parts = {k: self._unwrap(arguments[k]) for k in ("unet", "vae", "text_encoder", "tokenizer")
                 if arguments.get(k) is not None}
        pipeline = load_pipeline(args.pretrained_model_name_or_path, **parts)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline.to(self.accelerator.device if self.accelerator is not None else "cpu")

    def _pipeline_for_models(self, models: list[Any]) -> Any:
        """A pipeline (cached) whose trained components are the live models being checkpointed."""
        live = [self._unwrap(m) for m in models]
        base = self.args.pretrained_model_name_or_path
        index = json.loads((Path(base) / "model_index.json").read_text()) if Path(base).is_dir() else None
        if self._checkpoint_pipeline is None:
            parts: dict[str, Any] = {}
            if index is not None:
                for model in live:
                    for name, spec in index.items():
                        if (isinstance(spec, list) and len(spec) == 2 and spec[1] == type(model).__name__
                                and name not in parts):
                            parts[name] = model
                            break
            if not any(k in parts for k in ("unet", "transformer")):
                logger.warning("could not match the checkpointed models %s to pipeline components; checkpoint "
                               "scoring is skipped", [type(m).__name__ for m in live])
                return None
            pipeline = load_pipeline(base, **parts)
            pipeline.set_progress_bar_config(disable=True)
            device = self.accelerator.device if self.accelerator is not None else torch.device("cpu")
            for component in pipeline.components.values():  # never move or cast the shared trained models
                if isinstance(component, torch.nn.Module) and component not in live:
                    component.to(device)
            self._checkpoint_pipeline = pipeline
        return self._checkpoint_pipeline

    def _select_after(self) -> SelectionResult:
        """Rank every remaining checkpoint with the session's validator, prompts and render settings."""
        callback = self.callback()
        config = SelectionConfig(monitor=self.options.monitor, mode=self.options.mode, render=callback.config.render)
        pipeline = load_pipeline(self.args.pretrained_model_name_or_path, torch_dtype=torch.float32,
                                 device=self.device)
        selector = CheckpointSelector(pipeline, callback.validator, callback.prompts, config=config,
                                      state=_THIS_PROCESS_ONLY)
        result = selector.run(self.output_dir)
        print(format_table(result))
        return result


def _checkpoint_step(output_dir: str, fallback: int) -> int:
    name = Path(output_dir).name
    if name.startswith("checkpoint-"):
        try:
            return int(name.split("-", 1)[1])
        except ValueError:
            pass
    return fallback


def write_summary(output_dir: Path, validator: Any) -> tuple[Path, Path | None]:
    """Write ``identity_summary.md`` (a table of every validation) and ``identity_summary.png`` (score vs step).

    The PNG needs matplotlib (the ``plot`` extra); without it only the table is written.
    """
    records = read_jsonl(output_dir / HISTORY_NAME) or list(validator.history)
    prefix = validator.config.prefix
    text = summary_markdown(records, prefix=prefix, title=f"NearID identity summary: {output_dir}",
                            best_step=validator.best_step, best_value=validator.best_value,
                            monitor_key=validator.monitor_key)  # fmt: skip
    md = output_dir / f"{SUMMARY_NAME}.md"
    write_text_atomic(md, text)
    png = plot_identity_history(records, output_dir / f"{SUMMARY_NAME}.png", prefix=prefix,
                                oracle=validator.references.oracle, best_step=validator.best_step)
    logger.info("NearID summary written to %s", md)
    print(text, end="")
    return md, png


@entry_point("nearid-dreambooth")
def main(argv: Sequence[str] | None = None) -> int:
    ours, theirs = split_argv(sys.argv[1:] if argv is None else argv)
    options = parse_options(ours)
    module = load_script(options.script)
    session = DreamBoothSession(options)
    install_hooks(module, session)
    args = module.parse_args(theirs)
    # Run as `python script.py`, the script's `__main__` block leaves `args` as a module global, and some of the
    # diffusers scripts read it outside `main` (e.g. DreamBoothDataset in train_dreambooth_lora.py): recreate it.
    module.args = args
    session.bind_args(args)
    module.main(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
