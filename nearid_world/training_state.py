"""Checkpoint folders of a resumable training run, without pickle, and the file hashes of a finished output.

A checkpoint is a folder written whole or not at all (:func:`nearid_reward.files.replace_directory`):

* ``<module>.safetensors`` for each module's ``state_dict`` (model and EMA weights);
* ``<optimizer>.optimizer.safetensors`` for each optimizer's per-parameter state (``state.<index>.<name>``); its
  hyperparameters are rebuilt from the run's config, not stored;
* ``generators.safetensors``: the state of each CPU ``torch.Generator`` (a uint8 tensor);
* ``state.json``: the scalars (stage, step, losses, seconds), the state of each numpy bit generator (JSON-able
  integers) and whatever else the run records.

``state.json`` is written last inside the folder, and the folder is renamed into place only once complete, so every
folder named ``<stage>-<step>`` in the checkpoint directory is a complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nearid_reward.files import (
    CheckpointError,
    load_safetensors,
    replace_directory,
    save_safetensors_atomic,
    write_json_atomic,
)
from train_head.checkpointing import _optimizer_parts, _optimizer_state_dict

__all__ = ["checkpoint_name", "list_checkpoints", "latest_checkpoint", "save_training_state", "load_training_state",
           "read_scalars", "module_sha256", "file_sha256", "output_sha256"]

STATE_NAME = "state.json"
GENERATORS_NAME = "generators.safetensors"
_NAME = re.compile(r"^(?P<stage>[a-z_]+)-(?P<step>\d{6,})$")


def checkpoint_name(stage: str, step: int) -> str:
    """``"<stage>-<step>"`` with the step zero-padded to six digits: ``checkpoint_name("denoiser", 250)``."""
    if not re.fullmatch(r"[a-z_]+", stage) or step < 0:
        raise ValueError(f"checkpoint stage must be lower-case letters and step >= 0, got {stage!r} and {step}")
    return f"{stage}-{step:06d}"


def list_checkpoints(folder: str | Path, stages: Iterable[str]) -> list[Path]:
    """The complete checkpoints in ``folder``, oldest first: by the order of ``stages``, then by step.

    Hidden names (temporaries of a checkpoint being written) and folders of other stages are ignored.
    """
    order = {stage: i for i, stage in enumerate(stages)}
    root = Path(folder)
    found: list[tuple[int, int, Path]] = []
    if root.is_dir():
        for entry in root.iterdir():
            match = _NAME.match(entry.name)
            if match and match["stage"] in order and (entry / STATE_NAME).is_file():
                found.append((order[match["stage"]], int(match["step"]), entry))
    return [path for *_, path in sorted(found)]


def latest_checkpoint(folder: str | Path, stages: Iterable[str]) -> Path | None:
    """The newest complete checkpoint in ``folder`` (see :func:`list_checkpoints`), or None."""
    found = list_checkpoints(folder, stages)
    return found[-1] if found else None


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors, meta = _optimizer_parts(optimizer.state_dict())
    for index, values in meta["state"].items():
        for name, value in values.items():
            raise TypeError(f"optimizer state {index}.{name} is a {type(value).__name__}, expected a tensor")
    return tensors


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], source: Path) -> None:
    current = optimizer.state_dict()
    restored = _optimizer_state_dict(dict(tensors), {"state": {}, "param_groups": current["param_groups"]})
    expected = {i for group in current["param_groups"] for i in group["params"]}
    if restored["state"] and set(restored["state"]) != expected:
        raise CheckpointError(f"{source}: optimizer state for {len(restored['state'])} parameters, the model has "
                              f"{len(expected)}")
    optimizer.load_state_dict(restored)


def save_training_state(
    folder: str | Path, *, modules: Mapping[str, torch.nn.Module] | None = None,
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    torch_generators: Mapping[str, torch.Generator] | None = None,
    numpy_generators: Mapping[str, np.random.Generator] | None = None, scalars: Mapping[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint folder at ``folder`` (replacing one there) and return it.

    Args:
        folder: the checkpoint folder (its parent is created).
        modules: name -> module whose ``state_dict`` is saved as ``<name>.safetensors``.
        optimizers: name -> optimizer whose per-parameter state is saved as ``<name>.optimizer.safetensors``.
        torch_generators: name -> CPU generator whose state is saved in ``generators.safetensors``.
        numpy_generators: name -> numpy generator whose bit generator state is saved in ``state.json``.
        scalars: JSON-able values saved in ``state.json`` under ``"scalars"``.
    """

    def build(tmp: Path) -> None:
        for name, module in (modules or {}).items():
            save_safetensors_atomic(module.state_dict(), tmp / f"{name}.safetensors")
        for name, optimizer in (optimizers or {}).items():
            save_safetensors_atomic(_optimizer_tensors(optimizer), tmp / f"{name}.optimizer.safetensors")
        if torch_generators:
            save_safetensors_atomic({k: g.get_state() for k, g in torch_generators.items()}, tmp / GENERATORS_NAME)
        numpy_states = {k: g.bit_generator.state for k, g in (numpy_generators or {}).items()}
        write_json_atomic(tmp / STATE_NAME, {"scalars": dict(scalars or {}), "numpy_generators": numpy_states})

    return replace_directory(folder, build)


def read_scalars(folder: str | Path) -> dict[str, Any]:
    """The ``scalars`` of a checkpoint's ``state.json``."""
    path = Path(folder) / STATE_NAME
    try:
        return dict(json.loads(path.read_text(encoding="utf-8"))["scalars"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        message = f"{path} is not a readable checkpoint state (expected JSON with 'scalars'): {exc}"
        raise CheckpointError(message) from exc


def load_training_state(
    folder: str | Path, *, modules: Mapping[str, torch.nn.Module] | None = None,
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    torch_generators: Mapping[str, torch.Generator] | None = None,
    numpy_generators: Mapping[str, np.random.Generator] | None = None,
) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote into the given objects, in place; return the scalars.

    Raises:
        CheckpointError: a file is missing or unreadable, or a module, optimizer or generator does not match.
    """
    root = Path(folder)
    scalars = read_scalars(root)
    for name, module in (modules or {}).items():
        weights = load_safetensors(root / f"{name}.safetensors")
        try:
            module.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{root / name}.safetensors does not fit the model: {exc}") from exc
    for name, optimizer in (optimizers or {}).items():
        _load_optimizer(optimizer, load_safetensors(root / f"{name}.optimizer.safetensors"), root)
    if torch_generators:
        states = load_safetensors(root / GENERATORS_NAME)
        for name, generator in torch_generators.items():
            if name not in states:
                raise CheckpointError(f"{root / GENERATORS_NAME} has no state for generator {name!r}")
            generator.set_state(states[name])
    saved = json.loads((root / STATE_NAME).read_text(encoding="utf-8"))["numpy_generators"]
    for name, rng in (numpy_generators or {}).items():
        if name not in saved:
            raise CheckpointError(f"{root / STATE_NAME} has no state for numpy generator {name!r}")
        rng.bit_generator.state = saved[name]
    return scalars


def module_sha256(module: torch.nn.Module) -> str:
    """sha256 of a module's ``state_dict``: names, dtypes, shapes and bytes, in key order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: str | Path, *, chunk_bytes: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def output_sha256(folder: str | Path, *, exclude: Iterable[str] = ()) -> dict[str, str]:
    """sha256 of every file under ``folder`` by its relative POSIX path, sorted; ``exclude`` names top-level
    entries to leave out (files or folders). Hidden entries (temporaries) are left out too."""
    root = Path(folder)
    skip = set(exclude)
    hashes: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] in skip or any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        hashes[rel.as_posix()] = file_sha256(path)
    return hashes
