"""The ``checkpoint-N`` folders of a diffusers training run: finding them, telling LoRA from full checkpoints,
hashing their weights, and copying the weights of one of them somewhere safe.

Two layouts are recognised:

* LoRA (``train_dreambooth_lora*.py``): ``checkpoint-N/pytorch_lora_weights.safetensors``;
* full fine-tune (``train_dreambooth.py``): ``checkpoint-N/unet/`` or ``checkpoint-N/transformer/`` with
  ``config.json`` and safetensors weights (one file or shards with an index).

Only safetensors are read or hashed: pickled ``.bin`` weights are refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .files import CheckpointError, replace_directory, temporary_target

__all__ = [
    "CHECKPOINT_PATTERN",
    "LORA_WEIGHT_NAME",
    "RunCheckpoint",
    "checkpoint_step",
    "inspect_checkpoint",
    "find_checkpoints",
    "content_hash",
    "copy_checkpoint_weights",
    "replace_directory",  # moved to nearid_reward.files; kept here for existing imports
]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
_FULL_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")

CheckpointKind = Literal["lora", "unet", "transformer"]


@dataclass(frozen=True)
class RunCheckpoint:
    """One ``checkpoint-N`` folder.

    Attributes:
        name: folder name, e.g. ``checkpoint-500``.
        step: ``N``.
        path: the folder.
        kind: ``"lora"``, ``"unet"`` or ``"transformer"``.
        files: the files that define its weights (hashed for the selection cache), sorted.
    """

    name: str
    step: int
    path: Path
    kind: CheckpointKind
    files: tuple[Path, ...]

    @property
    def weights_dir(self) -> Path:
        """The folder to load from: the checkpoint itself (LoRA) or its ``unet/``/``transformer/`` subfolder."""
        return self.path if self.kind == "lora" else self.path / self.kind


def checkpoint_step(path: str | os.PathLike[str], *, being_written: bool = False) -> int | None:
    """``N`` when the last component of ``path`` is named ``checkpoint-N``, else None (the name alone is read).

    This is the project's one parser of checkpoint folder names.

    Args:
        path: a folder path or name.
        being_written: also accept the temporary folder a ``checkpoint-N`` is written to before it is renamed into
            place (``.checkpoint-N.tmp-<host>-<pid>-<random>``, see :func:`nearid_reward.files.temporary_path`), as
            accelerate's save-state hooks see it. Never use it to list finished checkpoints.

    Example:
        >>> checkpoint_step("run/checkpoint-500"), checkpoint_step("run/checkpoint-last")
        (500, None)
        >>> tmp = "run/.checkpoint-500.tmp-0a1b2c3d-812-deadbeef"
        >>> checkpoint_step(tmp), checkpoint_step(tmp, being_written=True)
        (None, 500)
    """
    name = Path(path).name
    if being_written:
        name = temporary_target(name) or name
    match = CHECKPOINT_PATTERN.match(name)
    return None if match is None else int(match.group(1))


def _step_of(path: Path) -> int:
    step = checkpoint_step(path)
    if step is None:
        raise CheckpointError(f"{path} is not a checkpoint folder: expected a name like checkpoint-500")
    return step


def _full_files(folder: Path) -> tuple[Path, ...]:
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{folder} has no config.json: the full-model checkpoint is incomplete")
    single, index = (folder / n for n in _FULL_WEIGHTS)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{folder} is missing weight shards listed in {index.name}: {missing}")
        return (config, index, *(folder / s for s in shards))
    if single.is_file():
        return (config, single)
    pickled = sorted(p.name for p in folder.glob("*.bin"))
    if pickled:
        raise CheckpointError(
            f"{folder} holds only pickled weights {pickled}; only safetensors are loaded (re-save with "
            "safe_serialization=True)"
        )
    raise CheckpointError(f"{folder} has no {_FULL_WEIGHTS[0]} (or a sharded index)")


def inspect_checkpoint(path: str | os.PathLike[str], *, weight_name: str = LORA_WEIGHT_NAME) -> RunCheckpoint:
    """Classify one ``checkpoint-N`` folder.

    Raises:
        CheckpointError: the folder is missing, badly named, or holds no recognised weights.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    step = _step_of(folder)
    lora = folder / weight_name
    if lora.is_file():
        return RunCheckpoint(folder.name, step, folder, "lora", (lora,))
    for kind in ("unet", "transformer"):
        sub = folder / kind
        if sub.is_dir():
            return RunCheckpoint(folder.name, step, folder, kind, _full_files(sub))  # type: ignore[arg-type]
    present = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(
        f"{folder} holds no weights: expected {weight_name} (LoRA) or a unet/ or transformer/ folder; found {present}"
    )


def find_checkpoints(
    output_dir: str | os.PathLike[str],
    *,
    names: Sequence[str] | None = None,
    skip_invalid: bool = False,
    weight_name: str = LORA_WEIGHT_NAME,
) -> list[RunCheckpoint]:
    """The run's checkpoints sorted by step.

    Args:
        output_dir: the training run's ``--output_dir``.
        names: only these checkpoint folders (names or paths relative to ``output_dir``); each must exist.
        skip_invalid: log and skip folders without usable weights instead of raising.
        weight_name: the LoRA weights file name.

    Raises:
        CheckpointError: ``output_dir`` is missing, holds no ``checkpoint-*`` folder, a named checkpoint is missing,
            or (unless ``skip_invalid``) a checkpoint folder holds no usable weights.
    """
    import logging

    root = Path(output_dir)
    if not root.is_dir():
        raise CheckpointError(f"output_dir not found: {root}")
    if names:
        folders = [root / n if not Path(n).is_absolute() else Path(n) for n in names]
        missing = [str(f) for f in folders if not f.is_dir()]
        if missing:
            raise CheckpointError(f"checkpoint folders not found: {missing}")
    else:
        folders = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
        if not folders:
            raise CheckpointError(f"{root} contains no checkpoint-* folders (is it the training run's --output_dir?)")
    found: list[RunCheckpoint] = []
    for folder in folders:
        try:
            found.append(inspect_checkpoint(folder, weight_name=weight_name))
        except CheckpointError as exc:
            if not skip_invalid:
                raise
            logging.getLogger(__name__).warning("skipping %s: %s", folder.name, exc)
    if not found:
        raise CheckpointError(f"no usable checkpoint in {root}")
    return sorted(found, key=lambda c: c.step)


def content_hash(checkpoint: RunCheckpoint, *, chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 of the checkpoint's weight files (relative names and bytes): the key of the selection cache."""
    digest = hashlib.sha256()
    base = checkpoint.path
    for file in sorted(checkpoint.files):
        if not file.is_file():
            raise CheckpointError(f"checkpoint file missing: {file}")
        digest.update(str(file.relative_to(base)).encode() + b"\0")
        with open(file, "rb") as handle:
            while block := handle.read(chunk_bytes):
                digest.update(block)
    return digest.hexdigest()


def copy_checkpoint_weights(checkpoint: RunCheckpoint, dest_dir: str | os.PathLike[str]) -> list[Path]:
    """Copy the checkpoint's weights into ``dest_dir`` (which must exist): the LoRA file, or the model subfolder."""
    dest = Path(dest_dir)
    if checkpoint.kind == "lora":
        out = dest / checkpoint.files[0].name
        shutil.copy2(checkpoint.files[0], out)
        return [out]
    sub = dest / checkpoint.kind
    shutil.copytree(checkpoint.weights_dir, sub)
    return sorted(p for p in sub.rglob("*") if p.is_file())
