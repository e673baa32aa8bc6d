"""The example DreamBooth-LoRA script writes ``checkpoint-N`` whole or not at all, resumes from the last whole one."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launcher_runs import reset_accelerate

from nearid_reward.files import temporary_path
from nearid_reward.testing import write_random_images
from nearid_reward.testing.pipelines import save_tiny_sd_pipeline

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "dreambooth_lora_minimal.py"


def _run(root: Path, out: Path, *extra: str) -> None:
    """The example's ``__main__``: module-level ``args`` (its dataset reads it), then ``main(args)``."""
    spec = importlib.util.spec_from_file_location("dreambooth_lora_minimal_under_test", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.args = module.parse_args([
        "--pretrained_model_name_or_path", str(root / "sd"), "--instance_data_dir", str(root / "instance"),
        "--instance_prompt", "a photo of sks dog", "--output_dir", str(out), "--train_batch_size", "2",
        "--checkpointing_steps", "2", "--seed", "0", "--report_to", "tensorboard", "--resolution", "32", *extra,
    ])  # fmt: skip
    reset_accelerate()
    try:
        module.main(module.args)
    finally:
        reset_accelerate()


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("example-checkpoints")
    write_random_images(root / "instance", 4, 64, seed=1)
    save_tiny_sd_pipeline(root / "sd", seed=0, scheduler="ddpm")
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_save_that_fails_midway_leaves_no_checkpoint_and_resume_takes_the_last_whole_one(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from accelerate import Accelerator

    out = tmp_path / "run"
    _run(assets, out, "--max_train_steps", "4", "--checkpoints_total_limit", "1")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-4"]  # 2 pruned
    before = _files(out / "checkpoint-4")
    assert "pytorch_lora_weights.safetensors" in before and "optimizer.bin" in before
    # what a run killed while writing checkpoint-8 left: a temporary that holds weights but not the rest
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = temporary_path(out / "checkpoint-8")
    killed = killed.with_name(killed.name.replace(f"-{os.getpid()}-", f"-{dead.pid}-"))
    killed.mkdir()
    (killed / "pytorch_lora_weights.safetensors").write_bytes(before["pytorch_lora_weights.safetensors"])

    loaded: list[str] = []
    real_load, real_save = Accelerator.load_state, Accelerator.save_state

    def spy_load(self, input_dir=None, **kwargs):
        loaded.append(Path(input_dir).name)
        return real_load(self, input_dir, **kwargs)

    def save_then_fail(self, output_dir=None, **kwargs):  # the disk fills up after the weights are written
        real_save(self, output_dir, **kwargs)
        (Path(output_dir) / "optimizer.bin").unlink()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Accelerator, "load_state", spy_load)
    monkeypatch.setattr(Accelerator, "save_state", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        _run(assets, out, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    assert loaded == ["checkpoint-4"]  # the last whole checkpoint, not the killed save's temporary
    assert not (out / "checkpoint-6").exists()  # the failed save left nothing that looks like a checkpoint
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".checkpoint-6")) == []
    assert _files(out / "checkpoint-4") == before


def test_checkpoint_listings_skip_folders_still_being_written(tmp_path: Path) -> None:
    from nearid_reward.files import save_safetensors_atomic
    from nearid_reward.run_checkpoints import LORA_WEIGHT_NAME, checkpoint_step, find_checkpoints

    writing = temporary_path(tmp_path / "checkpoint-4")
    for folder in (tmp_path / "checkpoint-2", writing):  # the second has its weights but is not renamed into place
        save_safetensors_atomic({"unet.lora.down.weight": torch.zeros(2, 2)}, folder / LORA_WEIGHT_NAME)
    assert [c.name for c in find_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert checkpoint_step(writing) is None and checkpoint_step(writing, being_written=True) == 4
    assert checkpoint_step(tmp_path / ".checkpoint-4.old-0a1b2c3d-1-deadbeef", being_written=True) is None
