"""Crash-safe file writing and safetensors reading with clear errors.

Every file the project writes goes through these helpers: content is written to a temporary file in the
destination folder, flushed and fsynced, then renamed over the destination, so a crash leaves either the old
file or the new one, never a torn one. Files are created with the permissions a plain ``open`` would give them
(``0o666`` minus the umask; an existing file keeps its mode). Histories are appended line by line and fsynced.

Temporaries are named ``.<name>.tmp-<host>-<pid>-<random>`` (``.old-`` for a folder moved aside while it is
replaced), where ``<host>`` is a short hash of the host name and ``<pid>`` the writing process, so a temporary left
behind by a killed process can be told from one being written: :func:`remove_stale_temporaries`, called when a run
starts, removes the stale ones in the folders the run writes to, and nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "atomic_write",
    "write_json_atomic",
    "write_text_atomic",
    "append_jsonl",
    "read_jsonl",
    "save_safetensors_atomic",
    "load_safetensors",
    "temporary_path",
    "temporary_target",
    "swap_directory",
    "replace_directory",
    "remove_stale_temporaries",
    "CheckpointError",
]


class CheckpointError(ValueError):
    """A checkpoint file or folder is missing, unreadable or inconsistent."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@functools.cache
def _host_tag() -> str:
    """8 hex digits naming this host in temporary names (a pid only identifies a process on its own host)."""
    return hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def temporary_path(dest: str | os.PathLike[str], *, role: Literal["tmp", "old"] = "tmp") -> Path:
    """A fresh hidden name next to ``dest``: ``.<name>.<role>-<host>-<pid>-<random>``.

    ``role="tmp"`` names content being written (renamed over ``dest`` once complete), ``"old"`` a previous ``dest``
    moved aside to be deleted.
    """
    target = Path(dest)
    return target.parent / f".{target.name}.{role}-{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}"


# Names written by this version: the writer's host tag and pid are in the name.
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<role>tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}$")
# Names written by earlier versions, with the writer's pid (the head trainer's best/final folders, replace_directory,
# the selection's winner link, the synthetic data's parquet files) ...
_LEGACY_WITH_PID = re.compile(
    r"^\.(?P<name>.+)\.(?:(?P<role>tmp|old|link)-(?P<pid>\d+)(?:-\d+)?|(?P<file_pid>\d+)\.tmp)$"
)
# ... and without one (the head trainer's checkpoint folders; atomic files named by tempfile.mkstemp).
_LEGACY_WITHOUT_PID = re.compile(r"^\.(?:checkpoint-\d+\.tmp|.+\.[a-z0-9_]{8}\.tmp)$")
LEGACY_STALE_AFTER_S = 3600.0
"""A temporary whose name carries no pid (earlier versions) is stale once unmodified for this many seconds."""


def temporary_target(path: str | os.PathLike[str]) -> str | None:
    """The name that a content temporary of this project (:func:`temporary_path`, ``role="tmp"``) is written for.

    Example:
        >>> temporary_target("run/.checkpoint-4.tmp-0a1b2c3d-812-deadbeef"), temporary_target("run/checkpoint-4")
        ('checkpoint-4', None)
    """
    match = _TEMP_NAME.match(Path(path).name)
    return match["name"] if match is not None and match["role"] == "tmp" else None


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (True whenever that cannot be told safely)."""
    if pid == os.getpid():
        return True
    if os.name != "posix" or pid <= 0:  # signal 0 probes liveness only on POSIX; pid 0 means a process group
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def _stale(entry: Path, now: float) -> tuple[bool, str | None]:
    """Whether ``entry`` is a stale temporary of this project, and the name it replaces when it is an aside copy."""
    match = _TEMP_NAME.match(entry.name)
    if match is not None:
        stale = match["host"] == _host_tag() and not _pid_alive(int(match["pid"]))
        return stale, match["name"] if match["role"] == "old" else None
    match = _LEGACY_WITH_PID.match(entry.name)
    if match is not None:
        stale = not _pid_alive(int(match["pid"] or match["file_pid"]))
        return stale, match["name"] if match["role"] == "old" else None
    if _LEGACY_WITHOUT_PID.match(entry.name) is not None:
        try:
            return now - entry.lstat().st_mtime > LEGACY_STALE_AFTER_S, None
        except FileNotFoundError:
            return False, None
    return False, None


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove what interrupted runs of this project left directly inside ``folder``; touch nothing else.

    Only the exact temporary names this project writes are considered (see the module docstring), and of those
    only the stale ones: a name that carries a pid is stale when that process no longer runs on this host
    (temporaries written from another host of a shared filesystem are left alone); a name without one, written by
    an earlier version, when it has not been modified for :data:`LEGACY_STALE_AFTER_S` seconds. A folder that was
    moved aside by :func:`swap_directory` and whose replacement never arrived is renamed back instead of removed.

    Returns:
        The removed paths.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    now = time.time()
    removed: list[Path] = []
    for entry in sorted(root.iterdir()):
        if not entry.name.startswith("."):
            continue
        stale, replaces = _stale(entry, now)
        if not stale:
            continue
        try:
            original = root / replaces if replaces else None
            if original is not None and not original.exists() and not original.is_symlink():
                os.replace(entry, original)  # killed between the two renames of a swap: the old copy is all there is
                logger.warning("restored %s from %s, left by an interrupted run", original, entry.name)
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:  # removed meanwhile by another process
            continue
        except OSError as exc:  # e.g. not ours to delete: leave it, the run itself does not need it gone
            logger.warning("could not remove the stale temporary %s: %s", entry, exc)
            continue
        removed.append(entry)
    if removed:
        logger.info("removed %d stale temporaries left by interrupted runs in %s: %s", len(removed), root,
                    ", ".join(p.name for p in removed))
    return removed


def swap_directory(tmp: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Move the finished folder ``tmp`` to ``dest``, replacing what is there (a folder, a file or a link).

    A folder at ``dest`` is first renamed aside (:func:`temporary_path` with ``role="old"``) and deleted after the
    swap. A crash leaves the old folder or the new one in place; between the two renames the old one exists only
    under its aside name, and :func:`remove_stale_temporaries` renames it back.
    """
    source, target = Path(tmp), Path(dest)
    old = None
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        old = temporary_path(target, role="old")
        os.replace(target, old)
    try:
        os.replace(source, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def replace_directory(dest: str | os.PathLike[str], build: Callable[[Path], None]) -> Path:
    """Build a folder next to ``dest`` with ``build(tmp)`` and swap it into place (:func:`swap_directory`).

    A crash while building leaves the old ``dest`` untouched plus a temporary folder that
    :func:`remove_stale_temporaries` recognises. The folder is created like ``mkdir`` does: ``0o777`` minus the umask.
    """
    target = Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(target)
    try:
        tmp.mkdir()
        build(tmp)
        swap_directory(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # still there only when building or swapping failed
    return target


def _create_exclusive(dest: Path) -> tuple[int, Path]:
    """Create a new temporary file next to ``dest`` with ``open``'s permissions (0o666 minus the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = temporary_path(dest)
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue


@contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` atomically.

    The file gets the permissions a plain ``open(path, mode)`` would give it: ``0o666`` minus the umask for a new
    file, the current mode for an existing one (``tempfile.mkstemp`` would make every file ``0o600``).

    Args:
        path: destination file.
        mode: ``"w"`` for text or ``"wb"`` for bytes.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        existing_mode: int | None = stat.S_IMODE(dest.stat().st_mode)
    except FileNotFoundError:
        existing_mode = None
    fd, tmp = _create_exclusive(dest)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            if existing_mode is not None and hasattr(os, "fchmod"):
                os.fchmod(handle.fileno(), existing_mode)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_write(path, "w") as handle:
        handle.write(text)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as JSON (``indent=2, sort_keys=True``) to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise TypeError(f"cannot serialise {type(obj).__name__} to JSON")


def append_jsonl(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Append one JSON line to ``path`` and fsync it, so a crash never loses an earlier line.

    The line is written whole or not at all: when writing or syncing it fails (a full disk, a quota), the file is cut
    back to its previous length before the error propagates, so no later line ever follows a torn one. A torn last
    line left by a process killed mid-write is skipped by :func:`read_jsonl` and this append starts a fresh line.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(dict(record), sort_keys=True, default=_json_default) + "\n").encode("utf-8")
    flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(dest, flags, 0o666)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if size > 0:
            os.lseek(fd, size - 1, os.SEEK_SET)
            if os.read(fd, 1) != b"\n":  # the previous writer died mid-line: keep this record parseable
                data = b"\n" + data
        try:
            view = memoryview(data)
            while view:  # O_APPEND: every write lands at the end, whatever the file position
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            try:
                os.ftruncate(fd, size)
                os.fsync(fd)
            except OSError as exc:  # the write's own error is the one to raise
                logger.error("could not cut %s back to %d bytes after a failed append: %s", dest, size, exc)
            raise
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read the complete records of a JSONL history; a torn line (from a crash mid-write) is skipped."""
    records: list[dict[str, Any]] = []
    file = Path(path)
    if not file.exists():
        return records
    for raw in file.read_text(encoding="utf-8").splitlines():
        raw = raw.strip()
        if not raw:
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            records.append(value)
    return records


def save_safetensors_atomic(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> None:
    """Save ``tensors`` to a safetensors file atomically (contiguous CPU copies are written)."""
    from safetensors.torch import save

    payload = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    data = save(payload, metadata=dict(metadata) if metadata else None)
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def load_safetensors(
    path: str | os.PathLike[str], *, key_filter: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """Load a safetensors file (or a sharded set via its ``*.index.json``) onto the CPU.

    Args:
        path: a ``.safetensors`` file or a ``.safetensors.index.json`` index.
        key_filter: keep only the keys for which this returns True (skips reading the others).

    Raises:
        CheckpointError: the file is missing, truncated or not a safetensors file.
    """
    from safetensors import safe_open

    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"weights file not found: {file}")
    if file.name.endswith(".index.json"):
        try:
            index = json.loads(file.read_text(encoding="utf-8"))
            shards = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{file} is not a valid safetensors index (expected a 'weight_map'): {exc}") from exc
        merged: dict[str, torch.Tensor] = {}
        for shard in shards:
            merged.update(load_safetensors(file.parent / shard, key_filter=key_filter))
        return merged
    try:
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                if key_filter is None or key_filter(key):
                    out[key] = handle.get_tensor(key)
        return out
    except Exception as exc:  # safetensors raises several error types for corrupt files
        size = file.stat().st_size
        raise CheckpointError(
            f"could not read safetensors file {file} ({size} bytes): it is truncated or corrupt ({exc})"
        ) from exc
