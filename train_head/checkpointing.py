"""Checkpoints of the head trainer: ``checkpoint-<step>/`` folders (accelerate state + ``head/`` +
``trainer_state.json``) written crash-safely, found again for ``--resume_from_checkpoint latest``, and pruned to
``--checkpoints_total_limit``; plus the head-only ``best/`` and ``final/`` folders.

Folder names are parsed by :func:`nearid_reward.run_checkpoints.checkpoint_step` and folders are swapped into place
by :func:`nearid_reward.files.swap_directory` / :func:`~nearid_reward.files.replace_directory`, the same helpers the
rest of the project uses.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from nearid_reward import NearIDModel
from nearid_reward.files import replace_directory, swap_directory, temporary_path, write_json_atomic
from nearid_reward.run_checkpoints import checkpoint_step

logger = logging.getLogger(__name__)

__all__ = ["TRAINER_STATE", "checkpoint_folders", "find_latest_checkpoint", "read_trainer_state", "save_checkpoint",
           "save_head", "prune_checkpoints"]

TRAINER_STATE = "trainer_state.json"


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


def save_checkpoint(accelerator: Any, model: NearIDModel, output_dir: Path, step: int, trainer_state: dict[str, Any],
                    *, total_limit: int | None = None) -> Path:
    """Save ``checkpoint-<step>`` on every process (collective: all ranks must call it).

    Every process writes its part of the accelerate state into the main process's temporary folder; the main process
    adds ``head/`` and ``trainer_state.json`` (last, so its presence marks a complete checkpoint), swaps the folder
    into place and prunes old checkpoints to ``total_limit``.
    """
    from accelerate.utils import broadcast_object_list

    final = output_dir / f"checkpoint-{step}"
    tmp = Path(broadcast_object_list([str(temporary_path(final))])[0])
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model.save_pretrained(tmp / "head", format="head", extra={"step": step})
        write_json_atomic(tmp / TRAINER_STATE, trainer_state)
        swap_directory(tmp, final)
        if total_limit:
            prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final
