"""Files: atomic writes with the permissions of a plain ``open``, histories without torn lines, stale temporaries."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from nearid_reward import NearIDModel
from nearid_reward.io import (
    append_jsonl,
    atomic_write,
    read_jsonl,
    save_safetensors_atomic,
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


def test_append_after_a_killed_writer_starts_a_fresh_line(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    append_jsonl(path, {"step": 1})
    with open(path, "a", encoding="utf-8") as handle:  # a process killed in the middle of its line
        handle.write('{"step": 2, "val')
    append_jsonl(path, {"step": 3})
    assert [r["step"] for r in read_jsonl(path)] == [1, 3]
    assert path.read_text().splitlines()[-1] == '{"step": 3}'
