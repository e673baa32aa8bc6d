"""``make demo``'s stage cache: a finished stage is reused only when it was built from today's inputs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo():
    sys.path.insert(0, str(ROOT / "examples"))
    spec = importlib.util.spec_from_file_location("nearid_demo_under_test", ROOT / "examples" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
    sys.path.remove(str(ROOT / "examples"))


def _finished(folder: Path, key: str) -> None:
    folder.mkdir(parents=True)
    (folder / "result.bin").write_bytes(b"built")
    (folder / "stage_done.json").write_text(json.dumps({"key": key, "seconds": 1.0, "value": 7}))


def test_same_inputs_reuse_the_stage(demo, tmp_path):
    _finished(tmp_path / "world", "abc")
    info = demo._done(tmp_path / "world", "abc")
    assert info is not None and info["value"] == 7
    assert (tmp_path / "world" / "result.bin").read_bytes() == b"built"


@pytest.mark.parametrize("stored", ["other", None])
def test_other_or_missing_key_rebuilds(demo, tmp_path, capsys, stored):
    folder = tmp_path / "world"
    _finished(folder, "other")
    if stored is None:  # a marker written before stages recorded their inputs
        (folder / "stage_done.json").write_text(json.dumps({"seconds": 1.0}))
    assert demo._done(folder, "abc") is None
    assert not folder.exists()  # nothing stale is left for the rebuilt stage to mix with
    assert "rebuilding" in capsys.readouterr().out


def test_unfinished_stage_is_left_to_the_stage(demo, tmp_path):
    (tmp_path / "train_head").mkdir()
    (tmp_path / "train_head" / "partial").write_text("x")
    assert demo._done(tmp_path / "train_head", "abc") is None
    assert (tmp_path / "train_head" / "partial").exists()  # the head stage resumes its own caches


def test_a_marked_stage_is_reused_by_the_same_key_only(demo, tmp_path):
    folder = tmp_path / "projection"
    folder.mkdir()
    written = demo._mark_done(folder, {"value": 3}, 0.0, "abc")
    assert demo._done(folder, "abc") == written and written["key"] == "abc"
    assert demo._done(folder, "abd") is None and not folder.exists()


def test_world_key_follows_the_shipped_weights(demo, monkeypatch):
    inputs = demo._world_inputs()
    recorded = json.loads((ROOT / "nearid_world/weights/world_model/world_model_config.json").read_text())["sha256"]
    for name, digest in recorded.items():  # the world model's own record of its bytes
        assert inputs["weights"][f"world_model/{name}"] == digest
    assert any(name.startswith("oracle/") for name in inputs["weights"])
    assert any(name.startswith("nearid/") for name in inputs["weights"])

    before = demo.stage_key(inputs)
    assert demo.stage_key(demo._world_inputs()) == before  # stable across calls
    changed = {**inputs, "weights": {**inputs["weights"], "world_model/unet/diffusion_pytorch_model.safetensors": "0"}}
    assert demo.stage_key(changed) != before
    monkeypatch.setitem(demo.WORLD_RUN, "steps", demo.WORLD_RUN["steps"] + 40)
    assert demo.stage_key(demo._world_inputs()) != before


def test_head_key_follows_its_settings(demo, monkeypatch):
    import train_head_demo

    before = demo.stage_key(demo._head_inputs())
    monkeypatch.setattr(train_head_demo, "HEAD_STEPS", train_head_demo.HEAD_STEPS + 1)
    assert demo.stage_key(demo._head_inputs()) != before
