"""Files: atomic writes with the permissions of a plain ``open``, histories without torn lines, stale temporaries."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from nearid_reward import NearIDModel
from nearid_reward.files import (
    _host_tag,
    append_jsonl,
    atomic_write,
    read_jsonl,
    remove_stale_temporaries,
    save_safetensors_atomic,
    temporary_path,
    write_json_atomic,
    write_text_atomic,
)
from nearid_reward.run_checkpoints import replace_directory

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes and umask are POSIX")


@contextmanager
def _umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@posix_only
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_files_get_the_permissions_of_a_plain_open(tmp_path: Path, tiny_head: Path, mask: int) -> None:
    with _umask(mask):
        with open(tmp_path / "plain.txt", "w") as handle:
            handle.write("x")
        write_text_atomic(tmp_path / "a.txt", "x")
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        save_safetensors_atomic({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
        with atomic_write(tmp_path / "b.bin", "wb") as handle:
            handle.write(b"x")
        head = NearIDModel.from_pretrained(tiny_head).save_pretrained(tmp_path / "head")
        replace_directory(tmp_path / "folder", lambda tmp: write_text_atomic(tmp / "inside.txt", "x"))
    expected = 0o666 & ~mask
    assert _mode(tmp_path / "plain.txt") == expected
    for name in ("a.txt", "a.json", "w.safetensors", "b.bin", "folder/inside.txt"):
        assert _mode(tmp_path / name) == expected, name
    assert {p.name: _mode(p) for p in head.iterdir()} == {"head.safetensors": expected, "nearid_config.json": expected}
    assert _mode(head) == _mode(tmp_path / "folder") == 0o777 & ~mask
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary left behind


@posix_only
def test_rewriting_a_file_keeps_its_mode_like_open_does(tmp_path: Path) -> None:
    target = tmp_path / "scores.json"
    write_json_atomic(target, {"x": 1})
    target.chmod(0o640)
    with _umask(0o077):
        write_json_atomic(target, {"x": 2})
    assert _mode(target) == 0o640 and target.read_text() == '{\n  "x": 2\n}\n'


@pytest.mark.parametrize("failure", ["write", "fsync"])
def test_a_failed_append_leaves_no_torn_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    path = tmp_path / "history.jsonl"
    append_jsonl(path, {"step": 1})
    before = path.read_bytes()
    real_write = os.write

    def partial_write(fd: int, data: bytes) -> int:
        real_write(fd, bytes(data)[:7])
        raise OSError(errno.ENOSPC, "No space left on device")

    def failed_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    if failure == "write":
        monkeypatch.setattr(os, "write", partial_write)
    else:
        monkeypatch.setattr(os, "fsync", failed_fsync)
    with pytest.raises(OSError):
        append_jsonl(path, {"step": 2, "value": 0.5})
    monkeypatch.undo()
    assert path.read_bytes() == before
    append_jsonl(path, {"step": 3})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 1}, {"step": 3}]


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("failure", ["body", "fsync", "replace", "safetensors"])
def test_a_write_that_fails_partway_keeps_the_old_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    path = tmp_path / "state.json"
    write_json_atomic(path, {"step": 1, "weights": list(range(100))})
    before = path.read_bytes()

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    if failure == "body":  # the writer dies after writing part of the new content
        with pytest.raises(RuntimeError, match="killed mid-write"):
            with atomic_write(path, "w") as handle:
                handle.write('{"step": 2, "weights": [0, 1')
                handle.flush()
                raise RuntimeError("killed mid-write")
    elif failure == "safetensors":  # the serialised tensors never all reach the file
        path = tmp_path / "w.safetensors"
        save_safetensors_atomic({"w": torch.arange(64.0)}, path)
        before = path.read_bytes()
        real_fdopen = os.fdopen

        class Full:
            def __init__(self, handle: object) -> None:
                self.handle = handle

            def __getattr__(self, name: str) -> object:
                return getattr(self.handle, name)

            def __enter__(self) -> Full:
                return self

            def __exit__(self, *exc: object) -> None:
                self.handle.close()

            def write(self, data: bytes) -> int:
                self.handle.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fdopen", lambda *a, **k: Full(real_fdopen(*a, **k)))
        with pytest.raises(OSError, match="No space left"):
            save_safetensors_atomic({"w": torch.ones(64)}, path)
    else:  # the data is written but cannot be made durable, or cannot be renamed into place
        monkeypatch.setattr(os, "fsync" if failure == "fsync" else "replace", fail)
        with pytest.raises(OSError, match="Input/output error"):
            write_json_atomic(path, {"step": 2, "weights": []})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"state.json", path.name})  # no temporary left


@pytest.mark.parametrize("failure", ["build", "swap"])
def test_a_folder_replacement_that_fails_keeps_the_old_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    dest = tmp_path / "best"

    def old(tmp: Path) -> None:
        (tmp / "head.safetensors").write_bytes(b"old weights")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text('{"step": 1}')

    replace_directory(dest, old)
    before = _folder_bytes(dest)

    def new(tmp: Path) -> None:
        (tmp / "head.safetensors").write_bytes(b"new weights, half writ")
        if failure == "build":
            raise RuntimeError("killed while building")

    real_replace = os.replace

    def replace(src: object, dst: object) -> None:
        if Path(str(src)).name.startswith(".best.tmp-"):  # the new folder cannot be moved into place
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises((RuntimeError, OSError)):
        replace_directory(dest, new)
    monkeypatch.undo()
    assert _folder_bytes(dest) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # neither the new folder nor the old one aside


def test_append_after_a_killed_writer_starts_a_fresh_line(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    append_jsonl(path, {"step": 1})
    with open(path, "a", encoding="utf-8") as handle:  # a process killed in the middle of its line
        handle.write('{"step": 2, "val')
    append_jsonl(path, {"step": 3})
    assert [r["step"] for r in read_jsonl(path)] == [1, 3]
    assert path.read_text().splitlines()[-1] == '{"step": 3}'


def dead_pid() -> int:
    """The pid of a process that has just exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@posix_only
def test_only_stale_temporaries_of_this_project_are_removed(tmp_path: Path) -> None:
    dead, alive, host = dead_pid(), os.getpid(), _host_tag()
    old_enough = time.time() - 2 * 3600
    stale = {
        f".final.tmp-{dead}": "dir",  # head trainer's folder (earlier versions: pid only)
        f".best_identity.tmp-{dead}-1712345678901234567": "dir",  # replace_directory (earlier versions)
        ".checkpoint-500.tmp": "old dir",  # head trainer's checkpoint (earlier versions: no pid, old enough)
        ".tokens-r000-0123456789ab.npy.k3_9zq1x.tmp": "old file",  # feature-cache shard (mkstemp, old enough)
        f".train-00000-of-00001.parquet.{dead}.tmp": "file",  # synthetic table (earlier versions)
        f".head.safetensors.tmp-{host}-{dead}-0123abcd": "file",  # this version
        f".best.tmp-{host}-{dead}-89abcdef": "dir",
    }
    kept = {
        f".head.safetensors.tmp-{host}-{alive}-0123abcd": "file",  # its writer is running
        f".final.tmp-{alive}": "dir",
        ".tokens-r000-ba9876543210.npy.a1b2c3d4.tmp": "file",  # no pid and recent: may be being written
        f".head.safetensors.tmp-00000000-{dead}-0123abcd": "file",  # written from another host: cannot tell
        ".final.tmp-notapid": "dir",  # not a name the project writes
        "notes.tmp": "file",
        ".hidden": "file",
        "final": "dir",
    }
    for name, kind in {**stale, **kept}.items():
        path = tmp_path / name
        if "dir" in kind:
            path.mkdir()
            (path / "payload.bin").write_bytes(b"x" * 10)
        else:
            path.write_bytes(b"x" * 10)
        if "old" in kind:
            os.utime(path, (old_enough, old_enough))
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


@posix_only
def test_a_folder_moved_aside_by_a_killed_swap_is_restored(tmp_path: Path) -> None:
    aside = tmp_path / f".best.old-{_host_tag()}-{dead_pid()}-0123abcd"  # killed between the two renames
    aside.mkdir()
    (aside / "head.safetensors").write_bytes(b"weights")
    half = tmp_path / f".best.tmp-{_host_tag()}-{dead_pid()}-89abcdef"
    half.mkdir()
    assert remove_stale_temporaries(tmp_path) == [half]
    assert (tmp_path / "best" / "head.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_temporary_names_are_recognised_and_unique(tmp_path: Path) -> None:
    first, second = temporary_path(tmp_path / "final"), temporary_path(tmp_path / "final", role="old")
    assert first.name.startswith(f".final.tmp-{_host_tag()}-{os.getpid()}-") and ".old-" in second.name
    assert first != temporary_path(tmp_path / "final")
    first.mkdir()
    assert remove_stale_temporaries(tmp_path) == []  # this process is alive
