"""Checkpoints of the head trainer: ``checkpoint-<step>/`` folders (``head/``, the optimizer, schedule and RNG states,
``trainer_state.json``) written crash-safely, found again for ``--resume_from_checkpoint latest``, and pruned to
``--checkpoints_total_limit``; plus the head-only ``best/`` and ``final/`` folders.

Nothing in a checkpoint is a pickle, and resuming unpickles nothing: the head is ``head/head.safetensors``, the
optimizer's tensors ``optimizer.safetensors`` with the rest of its state in ``optimizer.json``, the learning-rate
schedule ``scheduler.json``, the gradient scaler (fp16) ``scaler.json`` and each process's random generators
``rng_state_<rank>.json`` (Python, NumPy, torch CPU and CUDA). accelerate's ``save_state``/``load_state`` are not used:
they pickle the optimizer and RNG states, and read a registered schedule back with ``weights_only=False``.

Folder names are parsed by :func:`nearid_reward.run_checkpoints.checkpoint_step` and folders are swapped into place
by :func:`nearid_reward.files.swap_directory` / :func:`~nearid_reward.files.replace_directory`, the same helpers the
rest of the project uses.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

from nearid_reward import NearIDModel
from nearid_reward.config import HEAD_WEIGHTS_NAME
from nearid_reward.files import (
    CheckpointError,
    load_safetensors,
    replace_directory,
    save_safetensors_atomic,
    swap_directory,
    temporary_path,
    write_json_atomic,
    write_text_atomic,
)
from nearid_reward.run_checkpoints import checkpoint_step

logger = logging.getLogger(__name__)

__all__ = ["TRAINER_STATE", "checkpoint_folders", "find_latest_checkpoint", "read_trainer_state", "save_checkpoint",
           "save_head", "prune_checkpoints", "save_training_state", "load_training_state"]

TRAINER_STATE = "trainer_state.json"
HEAD_FOLDER = "head"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_STATE = "optimizer.json"
SCHEDULER_STATE = "scheduler.json"
SCALER_STATE = "scaler.json"


def _rng_file(rank: int) -> str:
    return f"rng_state_{rank}.json"


def _strict_json(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, indent=2, sort_keys=True, allow_nan=True)
    except TypeError as exc:
        raise TypeError(f"the {what} state cannot be saved as JSON ({exc}): only numbers, strings, lists") from exc


def _optimizer_parts(state_dict: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split an optimizer ``state_dict`` into its tensors (``state.<param>.<name>``) and the JSON-able rest."""
    tensors: dict[str, Any] = {}
    rest: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        rest[str(index)] = {}
        for name, value in entry.items():
            if hasattr(value, "detach"):
                tensors[f"state.{index}.{name}"] = value
            else:
                rest[str(index)][name] = value
    return tensors, {"state": rest, "param_groups": state_dict["param_groups"]}


def _optimizer_state_dict(tensors: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Invert :func:`_optimizer_parts` (parameter indices are ints again, as ``load_state_dict`` expects)."""
    state: dict[int, dict[str, Any]] = {int(i): dict(values) for i, values in meta["state"].items()}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def _set_rng_state(saved: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(saved["torch"], dtype=torch.uint8))
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in saved["cuda"]])


def save_training_state(accelerator: Any, optimizer: Any, scheduler: Any, folder: Path) -> None:
    """Write the optimizer, schedule, gradient-scaler and RNG states into ``folder`` (collective: all ranks call it).

    Every process writes its own ``rng_state_<rank>.json``; the main process writes the rest (the optimizer state is
    the same on every process under DDP). No file is a pickle.
    """
    write_text_atomic(folder / _rng_file(accelerator.process_index), _strict_json(_rng_state(), "RNG") + "\n")
    if not accelerator.is_main_process:
        return
    tensors, meta = _optimizer_parts(optimizer.state_dict())
    save_safetensors_atomic(tensors, folder / OPTIMIZER_TENSORS)
    write_text_atomic(folder / OPTIMIZER_STATE, _strict_json(meta, "optimizer") + "\n")
    write_text_atomic(folder / SCHEDULER_STATE, _strict_json(scheduler.state_dict(), "learning-rate schedule") + "\n")
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        write_text_atomic(folder / SCALER_STATE, _strict_json(scaler.state_dict(), "gradient scaler") + "\n")


def load_training_state(accelerator: Any, model: NearIDModel, optimizer: Any, scheduler: Any, folder: Path) -> None:
    """Load what :func:`save_training_state` and :func:`save_checkpoint` wrote: head, optimizer, schedule, scaler, RNG.

    Only ``head/head.safetensors``, ``optimizer.safetensors`` and JSON files are read; any other file in the folder
    (``*.pkl``, ``*.bin``, whatever accelerate or anyone else left there) is never opened.

    Raises:
        CheckpointError: a file is missing (a checkpoint of an earlier version, whose state was pickled, or a folder
            written by something else) or unreadable.
    """
    rng_file = folder / _rng_file(accelerator.process_index)
    needed = [folder / HEAD_FOLDER / HEAD_WEIGHTS_NAME, folder / OPTIMIZER_TENSORS, folder / OPTIMIZER_STATE,
              folder / SCHEDULER_STATE, rng_file]
    missing = [str(p.relative_to(folder)) for p in needed if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"{folder} cannot be resumed: it has no {', '.join(missing)} (checkpoints of earlier versions kept this "
            "state in accelerate's pickle files, which are never loaded: start again, e.g. from its head/ folder)"
        )

    def read(path: Path) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} is not readable JSON: {exc}") from exc

    head = load_safetensors(folder / HEAD_FOLDER / HEAD_WEIGHTS_NAME)
    model.head.load_state_dict(head, strict=True)
    optimizer.load_state_dict(_optimizer_state_dict(load_safetensors(folder / OPTIMIZER_TENSORS),
                                                    read(folder / OPTIMIZER_STATE)))
    scheduler.load_state_dict(read(folder / SCHEDULER_STATE))
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        if not (folder / SCALER_STATE).is_file():
            raise CheckpointError(f"{folder} has no {SCALER_STATE}: it was not written by an fp16 run")
        scaler.load_state_dict(read(folder / SCALER_STATE))
    _set_rng_state(read(rng_file))


def checkpoint_folders(output_dir: str | os.PathLike[str], *, complete: bool = False) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the ``checkpoint-<step>`` folders in ``output_dir``, by step.

    With ``complete`` only the folders that hold a ``trainer_state.json`` (written last) count.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        step = checkpoint_step(path)
        if step is not None and path.is_dir() and (not complete or (path / TRAINER_STATE).is_file()):
            found.append((step, path))
    return sorted(found)


def find_latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The ``checkpoint-<step>`` folder with the highest step (complete ones only), or None."""
    found = checkpoint_folders(output_dir, complete=True)
    return found[-1][1] if found else None


def read_trainer_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint folder.

    Raises:
        ValueError: the folder is not a complete checkpoint of this trainer.
    """
    file = Path(path) / TRAINER_STATE
    if not file.is_file():
        raise ValueError(f"{path} is not a complete checkpoint of this trainer (no {TRAINER_STATE})")
    return json.loads(file.read_text(encoding="utf-8"))


def save_head(model: NearIDModel, dest: Path, extra: dict[str, Any]) -> None:
    """Write the head-only folder ``dest`` (``best/``, ``final/``) by building it aside and swapping it in."""
    replace_directory(dest, lambda tmp: model.save_pretrained(tmp, format="head", extra=extra))


def prune_checkpoints(output_dir: str | os.PathLike[str], total_limit: int) -> list[Path]:
    """Remove the oldest ``checkpoint-<step>`` folders so that at most ``total_limit`` remain; returns them."""
    found = checkpoint_folders(output_dir)
    old = [path for _, path in found[: max(0, len(found) - total_limit)]]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def save_checkpoint(accelerator: Any, model: NearIDModel, optimizer: Any, scheduler: Any, output_dir: Path, step: int,
                    trainer_state: dict[str, Any], *, total_limit: int | None = None) -> Path:
    """Save ``checkpoint-<step>`` on every process (collective: all ranks must call it).

    Every process writes its RNG state into the main process's temporary folder; the main process adds ``head/``, the
    optimizer and schedule states (:func:`save_training_state`) and ``trainer_state.json`` (last, so its presence
    marks a complete checkpoint), swaps the folder into place and prunes old checkpoints to ``total_limit``.
    """
    from accelerate.utils import broadcast_object_list

    final = output_dir / f"checkpoint-{step}"
    tmp = Path(broadcast_object_list([str(temporary_path(final))])[0])
    if accelerator.is_main_process:
        tmp.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    save_training_state(accelerator, optimizer, scheduler, tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model.save_pretrained(tmp / HEAD_FOLDER, format="head", extra={"step": step})
        write_json_atomic(tmp / TRAINER_STATE, trainer_state)
        swap_directory(tmp, final)
        if total_limit:
            prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final
