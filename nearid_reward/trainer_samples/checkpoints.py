"""The checkpoints each LoRA trainer saves, and which one holds the weights of a sample round.

Names (see ``docs/trainers.md``):

* ``kohya``: ``<name>-step<step:08d>.safetensors``, epoch files ``<name>-<epoch:06d>.safetensors`` and the final
  ``<name>.safetensors``. The step of an epoch or final file is read from its safetensors header (``ss_steps``,
  with ``ss_epoch``), so an epoch-only sample round (``e000005``) finds its step through its epoch file.
* ``ai-toolkit``: ``<job>[_LoRA]_<step:09d>.safetensors`` and the final ``<job>.safetensors``.
* ``simpletuner`` and ``diffusers``: ``checkpoint-<step>/`` (the LoRA file or ``unet/`` / ``transformer/``), and
  the final ``pytorch_lora_weights.safetensors`` in the run folder.
* ``onetrainer``: ``save/[<prefix>]<YYYY-mm-dd_HH-MM-SS>-save-<global_step>-<epoch>-<epoch_step>[<ext>]`` (a file, or
  a folder for the diffusers format) and ``backup/<ts>-backup-<g>-<e>-<es>/``, used when no save has that step.

Only safetensors headers are read (never pickles). A file still being written fails :func:`checkpoint_complete`
and is looked at again later.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..files import CheckpointError, replace_directory, write_json_atomic
from ..run_checkpoints import LORA_WEIGHT_NAME, checkpoint_step, copy_checkpoint_weights, inspect_checkpoint
from .layouts import RoundKey

__all__ = [
    "TrainerCheckpoint",
    "find_trainer_checkpoints",
    "match_checkpoint",
    "read_safetensors_metadata",
    "checkpoint_complete",
    "copy_winner",
    "default_checkpoints_dir",
]

_KOHYA_STEP = re.compile(r"^(?P<name>.+)-step(?P<step>\d{8,})\.safetensors$")
_KOHYA_EPOCH = re.compile(r"^(?P<name>.+)-(?P<epoch>\d{6,})\.safetensors$")
_AITK_STEP = re.compile(r"^(?P<name>.+?)_(?P<step>\d{9})(?:\.safetensors)?$")
_OT_SAVE = re.compile(
    r"^(?P<prefix>.*?)(?P<ts>\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2})-(?P<what>save|backup)-(?P<g>\d+)-(?P<e>\d+)-(?P<es>\d+)"
    r"(?P<ext>\.[A-Za-z0-9]+)?$"
)
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class TrainerCheckpoint:
    """One saved model of a trainer run.

    Attributes:
        path: the weights file, or the folder (``checkpoint-N/``, a OneTrainer diffusers save or backup).
        step: the global step it was saved at, when the name or the header says it.
        epoch: the epoch, when known (sd-scripts epoch files, OneTrainer names).
        final: the model saved at the end of training (no step in the name).
        backup: a OneTrainer backup (used only when no regular save has the step).
    """

    path: Path
    step: int | None
    epoch: int | None = None
    final: bool = False
    backup: bool = False


def read_safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """The ``__metadata__`` of a complete safetensors file (``{}`` without one), or None when the file is missing,
    not safetensors, or shorter than its header says (still being written)."""
    file = Path(path)
    try:
        with open(file, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return None
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER:
                return None
            raw = handle.read(length)
        header = json.loads(raw.decode("utf-8"))
        size = file.stat().st_size
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, struct.error):
        return None
    if not isinstance(header, dict):
        return None
    end = max((int(v["data_offsets"][1]) for k, v in header.items()
               if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v), default=0)  # fmt: skip
    if size < 8 + len(raw) + end or len(raw) < length:
        return None
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def checkpoint_complete(checkpoint: TrainerCheckpoint) -> bool:
    """Whether the checkpoint can be copied now: every safetensors file in it is whole (header and data)."""
    path = checkpoint.path
    if path.is_file():
        return path.suffix != ".safetensors" or read_safetensors_metadata(path) is not None
    if not path.is_dir():
        return False
    files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    return bool(files) and all(read_safetensors_metadata(p) is not None for p in files if p.suffix == ".safetensors")


def _int(value: str | None) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


_MetadataCache = dict[str, tuple[tuple[int, int], dict[str, str] | None]]  # path: ((size, mtime_ns), header)


def _kohya(folder: Path, cache: _MetadataCache) -> list[TrainerCheckpoint]:
    found: list[TrainerCheckpoint] = []
    for entry in _files(folder, ".safetensors"):
        m = _KOHYA_STEP.match(entry.name)
        if m is not None:
            found.append(TrainerCheckpoint(entry, int(m["step"])))
            continue
        stat = entry.stat()
        version = (stat.st_size, stat.st_mtime_ns)
        cached = cache.get(str(entry))
        if cached is None or cached[0] != version:  # one entry per file: a file still growing replaces its own
            cached = cache[str(entry)] = (version, read_safetensors_metadata(entry))
        meta = cached[1]
        if meta is None:  # being written: its step is read once it is complete
            continue
        e = _KOHYA_EPOCH.match(entry.name)
        if e is not None:
            found.append(TrainerCheckpoint(entry, _int(meta.get("ss_steps")), int(e["epoch"])))
        else:
            found.append(TrainerCheckpoint(entry, _int(meta.get("ss_steps")), _int(meta.get("ss_epoch")), final=True))
    return found


def _entries(folder: Path) -> list[Path]:
    """What ``folder`` holds, sorted by name; nothing where it is missing or not a folder."""
    try:
        return sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _files(folder: Path, suffix: str | None = None) -> list[Path]:
    return [p for p in _entries(folder)
            if p.is_file() and not p.name.startswith(".") and (suffix is None or p.suffix == suffix)]


def _ai_toolkit(folder: Path) -> list[TrainerCheckpoint]:
    found: list[TrainerCheckpoint] = []
    for entry in _entries(folder):
        if entry.name.startswith(".") or entry.name == "samples":
            continue
        m = _AITK_STEP.match(entry.name)
        if m is not None and (entry.is_dir() or entry.suffix == ".safetensors"):
            found.append(TrainerCheckpoint(entry, int(m["step"])))
        elif entry.is_file() and entry.suffix == ".safetensors":
            found.append(TrainerCheckpoint(entry, None, final=True))
    return found


def _diffusers_runs(folder: Path) -> list[TrainerCheckpoint]:
    found: list[TrainerCheckpoint] = []
    for entry in _entries(folder):
        step = checkpoint_step(entry)
        if step is not None and entry.is_dir():
            found.append(TrainerCheckpoint(entry, step))
    final = folder / LORA_WEIGHT_NAME
    if final.is_file():
        found.append(TrainerCheckpoint(final, None, final=True))
    return found


def _onetrainer(folder: Path) -> list[TrainerCheckpoint]:
    found: list[TrainerCheckpoint] = []
    for sub, is_backup in (("save", False), ("backup", True)):
        for entry in _entries(folder / sub):
            m = _OT_SAVE.match(entry.name)
            if m is None or entry.name.startswith(".") or (m["what"] == "backup") != is_backup:
                continue
            found.append(TrainerCheckpoint(entry, int(m["g"]), int(m["e"]), backup=is_backup))
    return found


def find_trainer_checkpoints(
    checkpoints_dir: str | os.PathLike[str],
    trainer: str,
    *,
    metadata_cache: _MetadataCache | None = None,
) -> list[TrainerCheckpoint]:
    """The saved models of a ``trainer`` run in ``checkpoints_dir`` (a missing folder has none).

    Args:
        checkpoints_dir: sd-scripts' ``--output_dir``, ai-toolkit's ``<training_folder>/<job>``, SimpleTuner's or a
            diffusers script's ``--output_dir``, OneTrainer's workspace.
        trainer: one of :data:`~.layouts.TRAINERS`.
        metadata_cache: safetensors headers already read, by path, with the ``(size, mtime_ns)`` they were read at
            (a watcher passes the same dict every poll so each file's header is read once per version of it).
    """
    folder = Path(checkpoints_dir)
    if trainer == "kohya":
        return _kohya(folder, {} if metadata_cache is None else metadata_cache)
    if trainer == "ai-toolkit":
        return _ai_toolkit(folder)
    if trainer in ("simpletuner", "diffusers"):
        return _diffusers_runs(folder)
    if trainer == "onetrainer":
        return _onetrainer(folder)
    raise ValueError(f"trainer must be one of kohya, ai-toolkit, simpletuner, onetrainer, diffusers; got {trainer!r}")


def match_checkpoint(key: RoundKey, checkpoints: Iterable[TrainerCheckpoint]) -> TrainerCheckpoint | None:
    """The checkpoint holding the weights that rendered round ``key``, or None (never a neighbour's).

    A step round takes the save with that step (a OneTrainer backup only when no save has it), an epoch round the
    save with that epoch (sd-scripts: the epoch file, else the final file of that epoch), the final round the final
    save. The base round and OneTrainer's ``no-ema`` samples (saves hold the EMA weights) have none.
    """
    items = list(checkpoints)
    if key.kind == "base" or key.variant == "no-ema":
        return None
    if key.kind == "step":
        hits = [c for c in items if c.step == key.number]
    elif key.kind == "epoch":
        hits = [c for c in items if c.epoch == key.number]
        hits.sort(key=lambda c: c.final)  # the epoch file before a final file of the same epoch
    else:
        hits = [c for c in items if c.final]
    hits.sort(key=lambda c: c.backup)
    return hits[0] if hits else None


def default_checkpoints_dir(samples_dir: str | os.PathLike[str], trainer: str) -> Path:
    """Where ``trainer`` saves models, from its sample folder: the folder above ``sample/``, ``samples/`` or
    ``validation_images/`` (the run, job or workspace folder), else the sample folder itself."""
    root = Path(samples_dir)
    if root.name in {"kohya": ("sample",), "ai-toolkit": ("samples",), "onetrainer": ("samples",),
                     "simpletuner": ("validation_images",)}.get(trainer, ()):  # fmt: skip
        return root.parent
    return root


def copy_winner(checkpoint: TrainerCheckpoint, dest: str | os.PathLike[str], scores: dict[str, object]) -> Path:
    """Copy the checkpoint's weights into the folder ``dest`` atomically (built beside it, then swapped in), keeping
    the original file or folder name, with ``identity_scores.json`` beside them.

    A ``checkpoint-N/`` folder gives its weights only (the LoRA file, or ``unet/`` / ``transformer/``), not the
    optimizer state.

    Raises:
        CheckpointError: the checkpoint is gone or incomplete.
    """
    source = checkpoint.path
    if not checkpoint_complete(checkpoint):
        raise CheckpointError(f"checkpoint {source} is missing or still being written")

    def build(tmp: Path) -> None:
        if source.is_dir() and checkpoint_step(source) is not None:
            copy_checkpoint_weights(inspect_checkpoint(source), tmp)
        elif source.is_dir():
            shutil.copytree(source, tmp / source.name)
        else:
            shutil.copy2(source, tmp / source.name)
        write_json_atomic(tmp / "identity_scores.json", {**scores, "source": str(source)})

    return replace_directory(dest, build)
