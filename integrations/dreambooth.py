"""``nearid-dreambooth``: run an unmodified diffusers DreamBooth / DreamBooth-LoRA script with NearID validation.

Usage::

    nearid-dreambooth --script train_dreambooth_lora.py --nearid_model NEARID_DIR \\
        --nearid_reference_dir SUBJECT_PHOTOS [--nearid_* options] -- <the script's own arguments>

    accelerate launch -m integrations.dreambooth --script ... -- ...      # several GPUs

The launcher's options are the fields of :class:`DreamBoothOptions`. Every word after ``--``, and every word before it
that is not a launcher option, goes to the script.

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

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch

from nearid_reward import IdentityValidator, NearIDModel, NearIDValidationCallback, ReferenceSet
from nearid_reward.callback import CallbackConfig
from nearid_reward.cli.arguments import build_parser as build_arguments_parser
from nearid_reward.cli.arguments import parse_arguments, parse_dtype
from nearid_reward.cli.entry_points import entry_point
from nearid_reward.files import read_jsonl, write_text_atomic
from nearid_reward.rendering import PromptSet, RenderConfig
from nearid_reward.results import SelectionResult, format_table, plot_identity_history, summary_markdown
from nearid_reward.run_checkpoints import checkpoint_step
from nearid_reward.selection import CheckpointSelector, SelectionConfig, load_pipeline

from .host_pipelines import TextComponents, host_conditioning, text_component_sources
from .script_hooks import ValidationFamily, install_hooks, load_script, split_argv

logger = logging.getLogger(__name__)

__all__ = [
    "DreamBoothOptions", "DreamBoothSession", "build_parser", "parse_command_line", "parse_options", "main",
    "derive_token_and_class",
]

HISTORY_NAME = "identity_history.jsonl"
SUMMARY_NAME = "identity_summary"


PROG = "nearid-dreambooth"
DESCRIPTION = (
    "Run a diffusers DreamBooth/LoRA training script unmodified, with NearID identity validation, checkpoint "
    "sidecars, best-identity keeping and an optional identity loss. The script's own arguments go after `--`; any "
    "other word the launcher does not know is passed on to the script as well."
)


@dataclass
class DreamBoothOptions:
    """The launcher's own options: ``--script`` and the ``--nearid_*`` flags, one per field, named as the field."""

    script: str = field(metadata={"help": "the diffusers training script, e.g. train_dreambooth_lora.py"})
    nearid_model: str = field(metadata={"help": "NearID checkpoint folder (release, head-only or SigLIP)"})
    nearid_reference_dir: str = field(metadata={"help": "folder of the subject's reference photos"})
    nearid_negative_dir: str | None = field(
        default=None, metadata={"help": "optional folder of near-identity distractors (look-alikes) to penalise"}
    )
    nearid_prompts: str | None = field(
        default=None,
        metadata={"help": "prompt file (JSON {'instance': [...], 'class': [...]} or one prompt per line); None: the "
                  "shipped identity prompt set"},
    )
    nearid_instance_token: str | None = field(
        default=None, metadata={"help": "fills {token} in the prompt set (None: derived from --instance_prompt)"}
    )
    nearid_class_noun: str | None = field(
        default=None,
        metadata={"help": "fills {class} in the prompt set (None: derived from --class_prompt/--instance_prompt)"},
    )
    nearid_num_inference_steps: int = field(default=25, metadata={"help": "sampler steps of NearID's renders"})
    nearid_guidance_scale: float | None = field(
        default=None, metadata={"help": "guidance scale of NearID's renders (None: the pipeline's)"}
    )
    nearid_images_per_prompt: int = field(default=1, metadata={"help": "NearID renders per prompt"})
    nearid_resolution: int | None = field(default=None, metadata={"help": "render size (None: the pipeline's)"})
    nearid_scheduler: str = field(
        default="auto",
        metadata={"help": "scheduler of NearID's renders, the same at validations, checkpoints and in "
                  "--nearid_select_after (a diffusers class name; 'auto' = DDIM unless the pipeline is flow "
                  "matching; 'pipeline' = whatever the pipeline has at that moment)"},
    )
    nearid_no_base: bool = field(
        default=False, metadata={"help": "do not render the base model (adapter disabled)"}
    )
    nearid_no_score_checkpoints: bool = field(
        default=False,
        metadata={"help": "do not render and score at checkpoint saves (sidecars then carry the last validation)"},
    )
    nearid_monitor: str = field(
        default="identity_mean",
        metadata={"help": "metric that decides the best step (e.g. identity_mean, relative_mean, identity_gain)"},
    )
    nearid_mode: Literal["max", "min"] = field(default="max", metadata={"help": "higher or lower monitor is better"})
    nearid_patience: int | None = field(
        default=None,
        metadata={"help": "warn (and set accelerate's trigger) after this many validations without improvement"},
    )
    nearid_threshold: float = field(
        default=0.9, metadata={"help": "fraction of the reference oracle an image must reach to count as on-identity"}
    )
    nearid_copy_guard: float | None = field(
        default=None,
        metadata={"help": "copy guard: a validation or checkpoint whose share of renders copying the references' "
                  "place (context_copy_fraction) exceeds this never counts as the best, in [0, 1] (None: off)"},
    )
    nearid_select_after: bool = field(
        default=False,
        metadata={"help": "after training, rank every remaining checkpoint by --nearid_monitor/--nearid_mode (as "
                  "nearid-select does), with this run's references, negatives, prompts and render settings"},
    )
    nearid_loss_weight: float = field(
        default=0.0,
        metadata={"help": "EXPERIMENTAL: weight of a ReFL-style identity loss on the x0 prediction (0 = off)"},
    )
    nearid_loss_max_timestep: int = field(
        default=400, metadata={"help": "the identity loss only uses samples with timestep below this (of 1000)"}
    )
    nearid_dtype: str = field(
        default="float32", metadata={"help": "NearID backbone dtype (float32, float16/fp16, bfloat16/bf16)"}
    )
    nearid_strict: bool = field(default=False, metadata={"help": "re-raise scoring errors instead of logging them"})

    def __post_init__(self) -> None:
        if self.nearid_loss_weight < 0:
            raise ValueError(f"--nearid_loss_weight must be >= 0, got {self.nearid_loss_weight}")
        if self.nearid_copy_guard is not None and not 0.0 <= self.nearid_copy_guard <= 1.0:
            raise ValueError(f"--nearid_copy_guard must be in [0, 1] (a share of renders), got "
                             f"{self.nearid_copy_guard}")
        if self.nearid_mode not in ("max", "min"):
            raise ValueError(f"--nearid_mode must be 'max' or 'min', got {self.nearid_mode!r}")
        parse_dtype(self.nearid_dtype, name="--nearid_dtype")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The NearID backbone's dtype (``--nearid_dtype``)."""
        return parse_dtype(self.nearid_dtype, name="--nearid_dtype")

    @property
    def render_scheduler(self) -> str | None:
        """``RenderConfig.scheduler`` of NearID's renders: None for ``--nearid_scheduler pipeline``."""
        return None if self.nearid_scheduler == "pipeline" else self.nearid_scheduler


def build_parser() -> Any:
    """The launcher's ``HfArgumentParser`` over :class:`DreamBoothOptions` (with ``--debug``)."""
    return build_arguments_parser(DreamBoothOptions, prog=PROG, description=DESCRIPTION)


def parse_options(argv: Sequence[str]) -> DreamBoothOptions:
    """The launcher's options from ``argv`` that holds only them (an unknown word is an argparse error)."""
    (options,) = parse_arguments(DreamBoothOptions, argv, prog=PROG, description=DESCRIPTION)
    return options


def parse_command_line(argv: Sequence[str]) -> tuple[DreamBoothOptions, list[str]]:
    """The launcher's options and the training script's words from a whole command line.

    The script gets every word after the first ``--`` and, before it, every word the launcher does not know, in
    their order (``--script s.py --nearid_model m --lr 1 -- --seed 0`` gives the script ``--lr 1 --seed 0``).
    """
    ours, theirs = split_argv(argv)
    options, rest = parse_arguments(DreamBoothOptions, ours, prog=PROG, description=DESCRIPTION,
                                    allow_remaining=True)
    unknown = [w.split("=", 1)[0] for w in rest if w.startswith(("--nearid_", "--nearid-"))]
    if unknown:  # a misspelt launcher flag must not reach the script, which would not know it either
        import difflib

        known = [f"--{f}" for f in DreamBoothOptions.__dataclass_fields__]
        hints = [f"{w} (did you mean {' or '.join(difflib.get_close_matches(w, known, n=2))}?)"
                 if difflib.get_close_matches(w, known, n=1) else w for w in unknown]
        raise ValueError(f"unknown NearID option(s): {', '.join(hints)}; see {PROG} --help")
    return options, [*rest, *theirs]


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
        self.strict = options.nearid_strict
        self.accelerator: Any = None
        self.args: Any = None
        self.step = 0
        self._callback: NearIDValidationCallback | None = None
        self._model: NearIDModel | None = None
        self._references: ReferenceSet | None = None
        self._checkpoint_pipeline: Any = None
        self._text_components: TextComponents | None = None
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

    def text_components(self) -> TextComponents:
        """The base model's text components, for script pipelines built without them (loaded on first need)."""
        if self._text_components is None:
            self._text_components = TextComponents(self.args.pretrained_model_name_or_path,
                                                   sources=text_component_sources(self.args))
        return self._text_components

    def nearid_model(self) -> NearIDModel:
        """The run's one NearID model, loaded on first use: backbone in ``--nearid_dtype``, head in float32."""
        if self._model is None:
            self._model = NearIDModel.from_pretrained(self.options.nearid_model, torch_dtype=self.options.torch_dtype,
                                                      head_dtype=torch.float32)
            self._model.requires_grad_(False).to(self.device)
        return self._model

    def reference_set(self) -> ReferenceSet:
        """The subject's references and negatives, embedded once with :meth:`nearid_model`."""
        if self._references is None:
            self._references = ReferenceSet.from_images(self.nearid_model(), self.options.nearid_reference_dir,
                                                        self.options.nearid_negative_dir)
        return self._references

    def callback(self) -> NearIDValidationCallback:
        """The NearID validation callback, built on first use (on the main process only)."""
        if self._callback is None:
            o = self.options
            token, noun = derive_token_and_class(getattr(self.args, "instance_prompt", None),
                                                 getattr(self.args, "class_prompt", None))
            token = o.nearid_instance_token if o.nearid_instance_token is not None else token
            noun = o.nearid_class_noun if o.nearid_class_noun is not None else noun
            validator = IdentityValidator(
                self.nearid_model(), self.reference_set(), history_path=self.output_dir / HISTORY_NAME,
                accelerator=self.accelerator, monitor=o.nearid_monitor, mode=o.nearid_mode, patience=o.nearid_patience,
                threshold=o.nearid_threshold, copy_guard=o.nearid_copy_guard,
            )  # fmt: skip
            try:
                conditioning, guidance = host_conditioning(self.args, self.args.pretrained_model_name_or_path)
            except Exception as exc:  # e.g. a hub id not in the local cache: render with the pipeline's defaults
                logger.warning("could not read the base model's pipeline class and transformer config (%s); NearID "
                               "renders with the pipeline's default conditioning", exc)
                conditioning, guidance = {}, None
            render = RenderConfig(
                num_inference_steps=o.nearid_num_inference_steps,
                guidance_scale=o.nearid_guidance_scale if o.nearid_guidance_scale is not None else guidance,
                images_per_prompt=o.nearid_images_per_prompt, height=o.nearid_resolution, width=o.nearid_resolution,
                render_base=not o.nearid_no_base, render_class=bool(getattr(self.args, "class_prompt", None)),
                scheduler=o.render_scheduler, pipeline_kwargs=conditioning,
            )  # fmt: skip
            self._callback = NearIDValidationCallback(
                validator, output_dir=self.output_dir, prompts=PromptSet.load(o.nearid_prompts),
                config=CallbackConfig(instance_token=token, class_noun=noun, render=render, strict=o.nearid_strict),
            )  # fmt: skip
            logger.info("NearID validation: token=%r class=%r, %d instance prompts, references %s", token, noun,
                        len(self._callback.prompts.instance), o.nearid_reference_dir)
        return self._callback

    # ------------------------------------------------------------------ hook events
    def on_accelerator(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        if self.options.nearid_loss_weight > 0:
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
        callback = self.callback()
        extra: dict[str, float] = {}
        if images:  # scored first: a failure of the prompt-set render below cannot lose them
            script_metrics = callback.validator.compute(list(images))
            extra = {"script/" + k: v for k, v in script_metrics.items()}  # logged as nearid/script/...
            self.script_scores.append({"step": step, **extra})
        source = "final" if bool(arguments.get("is_final_validation", False)) else "validation"
        metrics = None
        try:
            if family == "pipeline":
                pipeline = arguments.get("pipeline")
                with self.text_components().filled(pipeline):
                    metrics = callback.on_validation(pipeline, step, extra_metrics=extra, source=source,
                                                     reuse_render=True)
            else:
                metrics = callback.on_validation(self._pipeline_from_components(arguments), step,
                                                 extra_metrics=extra, source=source, reuse_render=True)
        finally:
            if metrics is None and extra:  # the prompt set failed (logged): the line keeps the script's scores
                callback.validator.record(extra, step=step, source=source)
            self.validations += 1

    def on_save_state(self, models: list[Any], weights: list[Any], output_dir: str) -> None:
        if not self.is_main or self.args is None:
            return
        callback = self.callback()
        step = _checkpoint_step(output_dir, self.step)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        if not self.options.nearid_no_score_checkpoints:
            pipeline = self._pipeline_for_models(models)
            if pipeline is not None:
                callback.on_validation(pipeline, step, source="checkpoint")
        callback.on_checkpoint(output_dir, step)

    def on_end_training(self) -> None:
        if not self.is_main or self._callback is None:
            return
        write_summary(self.output_dir, self._callback.validator)
        if self.options.nearid_select_after:
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
            if self._text_components is not None:  # already loaded for the script's pipelines: not twice
                parts.update({k: v for k, v in self._text_components.loaded.items() if k not in parts})
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
        config = SelectionConfig(monitor=self.options.nearid_monitor, mode=self.options.nearid_mode,
                                 render=callback.config.render, copy_guard=self.options.nearid_copy_guard)
        pipeline = load_pipeline(self.args.pretrained_model_name_or_path, torch_dtype=torch.float32,
                                 device=self.device)
        selector = CheckpointSelector(pipeline, callback.validator, callback.prompts, config=config,
                                      state=_THIS_PROCESS_ONLY)
        result = selector.run(self.output_dir)
        print(format_table(result))
        return result


def _checkpoint_step(output_dir: str, fallback: int) -> int:
    step = checkpoint_step(output_dir, being_written=True)
    return fallback if step is None else step


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


@entry_point(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    options, theirs = parse_command_line(sys.argv[1:] if argv is None else argv)
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
