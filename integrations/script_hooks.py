"""Hooking an unmodified diffusers training script from the outside (no fork).

The script file is imported as a module (its ``if __name__ == "__main__"`` block does not run), two module globals
are replaced, and ``main(parse_args(argv))`` is called in the same process:

* ``log_validation`` is wrapped: the script's own function runs first and returns its images; then a listener sees
  the call's arguments (the live pipeline, ``args``, the accelerator, ...) and the images. Both signature families of
  the diffusers DreamBooth scripts are recognised by parameter names. On a machine without an accelerator a
  ``pipeline.enable_model_cpu_offload()`` inside the script's function (Flux2-klein, Z-Image) warns instead of
  raising (:func:`integrations.host_pipelines.offload_without_accelerator`).
* ``Accelerator`` is replaced by a subclass that records the true global step from every ``log(values, step=...)``
  call, registers a save-state pre-hook before the script registers its own (so it sees the models with their weights
  not yet popped), and tells the listener when training ends.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Protocol

from .host_pipelines import offload_without_accelerator

logger = logging.getLogger(__name__)

__all__ = [
    "ValidationFamily",
    "ScriptListener",
    "split_argv",
    "load_script",
    "validation_family",
    "wrap_log_validation",
    "make_accelerator_class",
    "install_hooks",
]

ValidationFamily = Literal["pipeline", "components"]


class ScriptListener(Protocol):
    """What the hooks report to (implemented by :class:`integrations.dreambooth.DreamBoothSession`)."""

    strict: bool

    def on_accelerator(self, accelerator: Any) -> None: ...

    def on_step(self, step: int) -> None: ...

    def extra_logs(self) -> dict[str, float]: ...

    def on_save_state(self, models: list[Any], weights: list[Any], output_dir: str) -> None: ...

    def on_validation(self, family: ValidationFamily, arguments: dict[str, Any], images: list[Any]) -> None: ...

    def on_end_training(self) -> None: ...


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``[ours..., "--", theirs...]``; without ``--`` every argument is ours."""
    argv = list(argv)
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1 :]
    return argv, []


def load_script(path: str | Path, *, module_name: str = "nearid_hosted_training_script") -> ModuleType:
    """Import a training script file as a module without running its ``__main__`` block.

    The script's folder is put first on ``sys.path`` so its sibling imports work, as when it is run directly.
    """
    script = Path(path).resolve()
    if not script.is_file():
        raise FileNotFoundError(f"training script not found: {script}")
    if script.suffix != ".py":
        raise ValueError(f"--script must be a Python file (.py), got {script.name}")
    folder = str(script.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(module_name, script)
    if spec is None or spec.loader is None:  # pragma: no cover - only for exotic paths
        raise ImportError(f"cannot import {script}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    for needed in ("main", "parse_args"):
        if not callable(getattr(module, needed, None)):
            raise ValueError(
                f"{script.name} has no module-level `{needed}`: the launcher hosts scripts shaped like the diffusers "
                "DreamBooth examples (parse_args(input_args) and main(args))"
            )
    return module


def validation_family(fn: Callable[..., Any]) -> ValidationFamily:
    """Which ``log_validation`` signature a script uses.

    * ``"pipeline"``: ``log_validation(pipeline, args, accelerator, pipeline_args, epoch, torch_dtype,
      is_final_validation=False)`` (the LoRA scripts: SD, SDXL, Flux, SD3, ...);
    * ``"components"``: ``log_validation(text_encoder, tokenizer, unet, vae, args, accelerator, weight_dtype,
      global_step, prompt_embeds, negative_prompt_embeds)`` (full ``train_dreambooth.py``).
    """
    params = set(inspect.signature(fn).parameters)
    if {"pipeline", "args", "accelerator"} <= params:
        return "pipeline"
    if {"unet", "vae", "args", "accelerator"} <= params:
        return "components"
    raise ValueError(
        f"unrecognised log_validation signature {sorted(params)}: expected the diffusers DreamBooth families "
        "(pipeline, args, accelerator, ...) or (text_encoder, tokenizer, unet, vae, args, accelerator, ...)"
    )


def _report(listener: ScriptListener, what: str, fn: Callable[[], None]) -> None:
    """Run a listener call; never let it kill the training run unless the listener is strict."""
    try:
        fn()
    except Exception:
        if listener.strict:
            raise
        logger.error("NearID %s failed; training continues:\n%s", what, traceback.format_exc())


def wrap_log_validation(fn: Callable[..., Any], listener: ScriptListener) -> Callable[..., Any]:
    """The script's ``log_validation``, followed by the listener seeing its arguments and returned images."""
    family = validation_family(fn)
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def log_validation(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        pipeline = bound.arguments.get("pipeline") if family == "pipeline" else None
        with offload_without_accelerator(pipeline) if pipeline is not None else contextlib.nullcontext():
            images = fn(*args, **kwargs)
        arguments = dict(bound.arguments)
        _report(listener, "validation scoring",
                lambda: listener.on_validation(family, arguments, list(images) if images is not None else []))
        return images

    log_validation.__nearid_wrapped__ = True  # type: ignore[attr-defined]
    return log_validation


def make_accelerator_class(base: type, listener: ScriptListener) -> type:
    """A subclass of the script's ``Accelerator`` that reports steps, checkpoint saves and the end of training."""

    class NearIDAccelerator(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # Registered before the script registers its own hook: ours runs first and sees unpopped weights.
            self.register_save_state_pre_hook(self._nearid_save_hook)
            listener.on_accelerator(self)

        def _nearid_save_hook(self, models: list[Any], weights: list[Any], output_dir: str) -> None:
            _report(listener, "checkpoint hook", lambda: listener.on_save_state(models, weights, output_dir))

        def log(self, values: dict[str, Any], step: int | None = None, *args: Any, **kwargs: Any) -> Any:
            if step is not None:
                _report(listener, "step tracking", lambda: listener.on_step(int(step)))
            extra = listener.extra_logs()
            return super().log({**values, **extra} if extra else values, step, *args, **kwargs)

        def end_training(self) -> None:
            _report(listener, "end-of-training report", listener.on_end_training)
            super().end_training()

    NearIDAccelerator.__name__ = f"NearID{base.__name__}"
    NearIDAccelerator.__qualname__ = NearIDAccelerator.__name__
    return NearIDAccelerator


def install_hooks(module: ModuleType, listener: ScriptListener) -> None:
    """Replace ``module.log_validation`` and ``module.Accelerator`` (both looked up at call time by ``main``)."""
    if not callable(getattr(module, "log_validation", None)):
        raise ValueError(f"{module.__file__} has no module-level log_validation to hook")
    if not isinstance(getattr(module, "Accelerator", None), type):
        raise ValueError(f"{module.__file__} does not use `from accelerate import Accelerator` at module level")
    if not getattr(module.log_validation, "__nearid_wrapped__", False):
        module.log_validation = wrap_log_validation(module.log_validation, listener)
    module.Accelerator = make_accelerator_class(module.Accelerator, listener)
