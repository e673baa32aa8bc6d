"""Loading diffusers pipelines and models from safetensors only.

The project never reads pickled weights (``.bin``, ``.pt``, ``.ckpt``), not even through restricted unpicklers:
every ``from_pretrained`` of a pipeline or a model goes through :func:`from_pretrained_safetensors`, which passes
``use_safetensors=True`` (so diffusers and transformers never fall back to pickles) and turns "only pickled weights
here" into a :class:`~nearid_reward.files.CheckpointError` that says which folders and files, and what to do.
diffusers is imported lazily.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from .files import CheckpointError

__all__ = ["PICKLE_SUFFIXES", "from_pretrained_safetensors", "load_pipeline"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _only_pickled(folder: Path) -> list[str]:
    """Pickled weight files of ``folder`` when it holds no safetensors file (else an empty list)."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def _pipeline_index(root: Path) -> dict[str, Any]:
    """The ``model_index.json`` of a local pipeline folder (empty for a hub id, a model folder or a broken file)."""
    try:
        index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def _pickled_components(root: Path, subfolder: str | None, given: set[str]) -> dict[str, list[str]]:
    """``{folder: pickled files}`` of the parts of a local model or pipeline folder that would be loaded."""
    if subfolder:
        folders = {subfolder: root / subfolder}
    elif (root / "model_index.json").is_file():
        index = _pipeline_index(root)
        folders = {
            name: root / name for name, spec in index.items()
            if isinstance(spec, list) and spec and spec[0] is not None and name not in given
        }  # fmt: skip
    else:
        folders = {".": root}
    found = {name: _only_pickled(folder) for name, folder in folders.items()}
    return {name: files for name, files in found.items() if files}


def _pickle_error(where: str, detail: str) -> CheckpointError:
    return CheckpointError(
        f"{where}: {detail}. This project loads weights from safetensors only and never unpickles them. Convert "
        "them once in an environment you trust (e.g. DiffusionPipeline.from_pretrained(path).save_pretrained(path), "
        "which writes safetensors) or use a safetensors release of the model."
    )


def from_pretrained_safetensors(loader: Any, path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """``loader.from_pretrained(path, use_safetensors=True, **kwargs)``, refusing pickled weights clearly.

    Args:
        loader: a diffusers/transformers class with ``from_pretrained`` (``DiffusionPipeline``, ``AutoencoderKL``,
            ...).
        path: a local folder or a hub id.
        **kwargs: passed on (components, ``subfolder``, ``torch_dtype``, ...); ``use_safetensors=False`` is refused.

    Raises:
        CheckpointError: the model (or a pipeline component to be loaded) has only pickled weights.
    """
    if kwargs.get("use_safetensors", True) is not True:
        raise ValueError(f"use_safetensors must be True: this project never loads pickled weights; got "
                         f"{kwargs['use_safetensors']!r}")
    kwargs["use_safetensors"] = True
    root = Path(path)
    if root.is_dir():
        pickled = _pickled_components(root, kwargs.get("subfolder"), set(kwargs))
        if pickled:
            listed = "; ".join(f"{name}/: {', '.join(files)}" for name, files in sorted(pickled.items()))
            raise _pickle_error(str(root), f"only pickled weights, no safetensors ({listed})")
    try:
        return loader.from_pretrained(str(path) if isinstance(path, os.PathLike) else path, **kwargs)
    except OSError as exc:  # diffusers' "no file named ....safetensors found", also for hub ids
        if "safetensors" in str(exc):
            raise _pickle_error(str(path), f"no safetensors weights found ({exc})") from exc
        raise


def load_pipeline(path: str | os.PathLike[str], *, device: Any = None, **kwargs: Any) -> Any:
    """A diffusers pipeline from safetensors only (see :func:`from_pretrained_safetensors`), ready to render images
    that are scored.

    Every pipeline of the project goes through here: the checkpoint selection's base pipeline, the DreamBooth
    launcher's scoring pipelines, the examples. The safety checker of a local pipeline folder is left out unless
    ``kwargs`` name one (it blanks images at random, which would corrupt identity scores) and the progress bar is
    silenced.

    Args:
        path: a local pipeline folder or a hub id.
        device: move the pipeline there (default: where ``from_pretrained`` puts it).
        **kwargs: passed to ``DiffusionPipeline.from_pretrained`` (``torch_dtype``, components, ...).

    Raises:
        CheckpointError: the pipeline (or a component to be loaded) has only pickled weights.

    Example:
        >>> pipe = load_pipeline("stable-diffusion-v1-5", torch_dtype=torch.float16, device="cuda")  # doctest: +SKIP
    """
    from diffusers import DiffusionPipeline

    if "safety_checker" not in kwargs and "safety_checker" in _pipeline_index(Path(path)):
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    with warnings.catch_warnings():  # newer diffusers prefer `dtype=`; `torch_dtype=` works across versions
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipeline = from_pretrained_safetensors(DiffusionPipeline, path, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline if device is None else pipeline.to(device)
