"""The trainer end to end on synthetic data (``main(argv)`` in-process), resume, outputs, and ``nearid-eval``."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nearid_reward import NearIDModel
from nearid_reward.files import read_jsonl
from train_head import eval as eval_cli
from train_head import train as train_cli
from train_head.data import load_nearid, read_index_file
from train_head.eval import ValidationSet, evaluate_model


@pytest.fixture
def train_argv(distractor_dirs, hf_cache, synthetic_dataset, tiny_backbone):
    """``train_argv(out, *extra, levels=...)``: the trainer's arguments on the shared synthetic data."""

    def build(out: Path, *extra: str, levels=("colour", "part")) -> list[str]:
        root = synthetic_dataset()
        return [
            "--backbone", str(tiny_backbone()), "--output_dir", str(out),
            "--train_data", str(root / "positives"), "--distractors", *distractor_dirs(root, levels),
            "--data_cache_dir", hf_cache, "--report_to", "none", "--seed", "3", "--lr_warmup_steps", "1",
            "--logging_steps", "1", *extra,
        ]

    return build


def _head(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "head.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_training_lowers_the_loss_and_writes_loadable_heads(tmp_path, distractor_dirs, hf_cache, synthetic_dataset,
                                                            synthetic_mtg, tiny_backbone, train_argv):
    out = tmp_path / "run"
    assert train_cli.main(train_argv(out, "--val_fraction", "0.25", "--train_batch_size", "6",
                                     "--max_train_steps", "30", "--learning_rate", "3e-3", "--checkpointing_steps",
                                     "15", "--validation_steps", "15", "--mtg_data", str(synthetic_mtg()),
                                     "--mtg_repeat", "1", "--report_to", "tensorboard")) == 0
    history = read_jsonl(out / "history.jsonl")
    losses = [r["train/loss"] for r in history if r["kind"] == "train"]
    assert len(losses) == 30
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6, losses
    vals = {r["step"]: r for r in history if r["kind"] == "validation"}
    assert sorted(vals) == [0, 15, 30]
    # outputs: checkpoints, best, final, splits, tensorboard logs; heads load with the library
    assert (out / "checkpoint-15" / "trainer_state.json").is_file() and (out / "checkpoint-30" / "head").is_dir()
    assert not list(out.glob(".*tmp*"))
    assert list((out / "logs").rglob("events.out.tfevents*"))
    final = NearIDModel.from_pretrained(out / "final")
    base = NearIDModel.from_pretrained(tiny_backbone())
    assert final.extra["step"] == 30
    assert _max_diff(_head(out / "final"), _head(out / "checkpoint-30" / "head")) == 0.0
    assert _max_diff(_head(out / "final"), {k: v for k, v in base.head.state_dict().items()}) > 1e-3
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(final.embed(images), base.embed(images), atol=1e-3)
    best = json.loads((out / "best" / "nearid_config.json").read_text())["extra"]
    assert best["val_ssr"] == max(v["val/ssr"] for v in vals.values())
    # held-out identities: the saved split is disjoint by identity and the step-0 record is the frozen baseline
    root = synthetic_dataset()
    data = load_nearid(root / "positives", distractor_dirs(root, ("colour", "part")), cache_dir=hf_cache)
    train_rows = read_index_file(out / "splits" / "train.json")
    val_rows = read_index_file(out / "splits" / "val.json")
    assert len(val_rows) == 4 and not {data.ids[r] for r in train_rows} & {data.ids[r] for r in val_rows}
    frozen = evaluate_model(base, ValidationSet.build(data, val_rows))
    assert vals[0]["val/ssr"] == pytest.approx(frozen["pooled"]["ssr"], abs=1e-4)
    assert vals[0]["val/pa"] == pytest.approx(frozen["pooled"]["pa"], abs=1e-4)
    # nearid-eval on the trained head writes the three reports, consistent with the last validation
    report_dir = tmp_path / "eval"
    assert eval_cli.main(["--model", str(out / "final"), "--data", str(root / "positives"), "--distractors",
                          *distractor_dirs(root, ("colour", "part")), "--indices", str(out / "splits" / "val.json"),
                          "--data_cache_dir", hf_cache, "--output_dir", str(report_dir),
                          "--mtg_data", str(synthetic_mtg()), "--mtg_split", "train"]) == 0
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert metrics["settings"]["pooled"]["ssr"] == pytest.approx(vals[30]["val/ssr"], abs=1e-4)
    assert metrics["settings"]["colour"]["pa"] == pytest.approx(vals[30]["val/colour/pa"], abs=1e-4)
    assert set(metrics["mtg"]) >= {"m_o", "m_opair", "ssr", "pa"}
    csv_lines = (report_dir / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("setting,ssr,pa,pa_pairwise") and [c.split(",")[0] for c in csv_lines[1:]] == [
        "colour", "part", "pooled", "mtg"]
    assert "| **pooled** |" in (report_dir / "metrics.md").read_text()


def _cut_history(run: Path, step: int) -> None:
    """Leave ``run/history.jsonl`` as a run killed right after step ``step`` left it."""
    kept = [r for r in read_jsonl(run / "history.jsonl") if r["step"] <= step and r["kind"] != "epoch"]
    (run / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))


def test_resume_mid_epoch_reproduces_the_uninterrupted_run(tmp_path, train_argv):
    common = ("--val_fraction", "0.25", "--train_batch_size", "4", "--max_train_steps", "5",
              "--learning_rate", "2e-3", "--checkpointing_steps", "2", "--validation_steps", "100")
    full = tmp_path / "full"
    train_cli.main(train_argv(full, *common))
    state = json.loads((full / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["steps_per_epoch"] == 3 and state["global_step"] == 2  # step 2 is in the middle of epoch 0
    part = tmp_path / "part"  # the run as it was when killed after step 2
    shutil.copytree(full, part, ignore=shutil.ignore_patterns("checkpoint-4", "final", "best"))
    _cut_history(part, 2)
    train_cli.main(train_argv(part, *common, "--resume_from_checkpoint", "latest"))
    assert _max_diff(_head(full / "final"), _head(part / "final")) == 0.0
    assert _max_diff(_head(full / "checkpoint-4" / "head"), _head(part / "checkpoint-4" / "head")) == 0.0
    full_train = [r for r in read_jsonl(full / "history.jsonl") if r["kind"] == "train"]
    part_train = [r for r in read_jsonl(part / "history.jsonl") if r["kind"] == "train"]
    # the resumed process ran steps 3, 4, 5 only (a restart from step 0 would log 1 and 2 again), identically
    assert [r["step"] for r in part_train] == [1, 2, 3, 4, 5]
    assert part_train == full_train
    assert [r["step"] for r in read_jsonl(part / "history.jsonl") if r["kind"] == "validation"] == [0, 5]
    # without the feature cache the same run gives the same head up to the cache's fp16 rounding
    pixels = tmp_path / "pixels"
    train_cli.main(train_argv(pixels, *common, "--no_feature_cache"))
    assert 0.0 < _max_diff(_head(full / "final"), _head(pixels / "final")) < 2e-3


class _Trap:
    """Unpickling this runs ``os.mkdir(marker)``: proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.mkdir, (str(self.marker),)


# every file accelerate's load_state reads (model, optimizer, scheduler, sampler, dataloader, scaler, RNG and custom
# states) and the pickled names a trainer could look for
_PICKLE_NAMES = ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin",
                 "scheduler.bin", "sampler.bin", "dl_state_dict.bin", "scaler.pt", "pytorch_model.bin",
                 "model.bin", "training_args.bin", "rng_state.pth")


def test_resume_never_unpickles_what_lies_in_the_checkpoint(tmp_path, train_argv):
    common = ("--train_batch_size", "4", "--max_train_steps", "3", "--checkpointing_steps", "2",
              "--validation_steps", "100")
    out = tmp_path / "run"
    train_cli.main(train_argv(out, *common))
    ckpt = out / "checkpoint-2"
    written = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file())
    assert written == ["head/head.safetensors", "head/nearid_config.json", "optimizer.json", "optimizer.safetensors",
                       "rng_state_0.json", "scheduler.json", "trainer_state.json"]
    assert json.loads((ckpt / "scheduler.json").read_text())["last_epoch"] == 2
    # the trap works: torch.load(weights_only=False), as accelerate reads custom states, runs it
    probe = tmp_path / "probe.pkl"
    torch.save(_Trap(tmp_path / "probe-ran"), probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe-ran").is_dir()
    marker = tmp_path / "unpickled"
    for name in _PICKLE_NAMES:
        torch.save(_Trap(marker), ckpt / name)
    final_before = _head(out / "final")
    shutil.rmtree(out / "final")
    train_cli.main(train_argv(out, *common, "--resume_from_checkpoint", str(ckpt)))
    assert not marker.exists()
    assert _max_diff(final_before, _head(out / "final")) == 0.0  # and the resume still reproduces the run


def test_training_state_round_trip_restores_every_random_generator(tmp_path):
    import random
    from types import SimpleNamespace

    import numpy as np

    from nearid_reward.testing import tiny_nearid_model
    from train_head.checkpointing import HEAD_FOLDER, load_training_state, save_training_state

    model = tiny_nearid_model()
    optimizer = torch.optim.SGD(model.head.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    accelerator = SimpleNamespace(process_index=0, is_main_process=True, scaler=None)
    model.save_pretrained(tmp_path / HEAD_FOLDER, format="head")
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_training_state(accelerator, optimizer, scheduler, tmp_path)

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    expected = draws()
    draws()  # the generators move on, as training would move them
    load_training_state(accelerator, model, optimizer, scheduler, tmp_path)
    assert draws() == expected  # each generator continues where the checkpoint left it


def test_a_checkpoint_without_its_json_state_is_refused(tmp_path, train_argv):
    common = ("--train_batch_size", "4", "--max_train_steps", "2", "--checkpointing_steps", "2")
    out = tmp_path / "run"
    train_cli.main(train_argv(out, *common))
    (out / "checkpoint-2" / "scheduler.json").unlink()
    with pytest.raises(SystemExit, match=r"checkpoint-2 cannot be resumed: it has no scheduler\.json"):
        train_cli.main(train_argv(out, *common, "--resume_from_checkpoint", "latest"))


def test_start_removes_what_a_killed_run_left_half_written(tmp_path, train_argv):
    import os
    import subprocess
    import sys

    from nearid_reward.files import _host_tag

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # the killed run's process
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / f".final.tmp-{child.pid}", out / f".checkpoint-2.tmp-{_host_tag()}-{child.pid}-0123abcd"]
    live = out / f".best.tmp-{_host_tag()}-{os.getpid()}-0123abcd"
    for folder in [*stale, live]:
        folder.mkdir()
        (folder / "head.safetensors").write_bytes(b"partial")
    train_cli.main(train_argv(out, "--train_batch_size", "4", "--max_train_steps", "2", "--checkpointing_steps", "2"))
    assert not any(p.exists() for p in stale) and live.exists()
    assert sorted(p.name for p in out.glob(".*")) == [live.name]  # the run's own temporaries are gone too
    assert (out / "checkpoint-2" / "trainer_state.json").is_file() and (out / "final" / "head.safetensors").is_file()


def _folder_data(root: Path, identities: int = 8, size: int = 32) -> Path:
    """A folder-format dataset of random images: root/<identity>/{a,b,c}.png and distractors/{a,b,c}.png."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(identities):
        for folder in (root / f"id{i}", root / f"id{i}" / "distractors"):
            folder.mkdir(parents=True)
            for stem in "abc":
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{stem}.png")
    return root


@pytest.fixture
def truncated_view_argv(tiny_backbone):
    """``truncated_view_argv(tmp_path, cache)``: arguments for folder data with one truncated PNG, and that file."""

    def build(tmp_path: Path, cache: bool) -> tuple[list[str], Path]:
        data = _folder_data(tmp_path / "data")
        broken = data / "id3" / "b.png"
        broken.write_bytes(broken.read_bytes()[:60])
        argv = ["--backbone", str(tiny_backbone()), "--train_data", str(data), "--data_format", "folder",
                "--report_to", "none", "--train_batch_size", "4", "--max_train_steps", "8", "--checkpointing_steps",
                "100", "--validation_steps", "4", "--val_indices", str(_index_file(tmp_path)),
                *([] if cache else ["--no_feature_cache"])]
        return argv, broken

    return build


@pytest.mark.parametrize("cache", [True, False])
def test_a_bad_image_counts_once(tmp_path, cache, truncated_view_argv):
    argv, _ = truncated_view_argv(tmp_path, cache)
    assert train_cli.main(["--output_dir", str(tmp_path / "run"), *argv]) == 0
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["global_step"] == 8  # 4 epochs of 2 steps, and 3 validations: the view was met many times
    assert summary["bad_data"] == {"unreadable images": 1}


@pytest.mark.parametrize("cache", [True, False])
def test_strict_names_the_bad_image_by_its_file(tmp_path, cache, truncated_view_argv):
    argv, broken = truncated_view_argv(tmp_path, cache)
    with pytest.raises(SystemExit) as raised:
        train_cli.main(["--output_dir", str(tmp_path / "strict"), "--strict", *argv])
    message = str(raised.value)
    assert f"unreadable images: {broken}: unreadable image" in message and "folder:positives" not in message


def _index_file(tmp_path: Path) -> Path:
    path = tmp_path / "val.json"
    path.write_text('{"indices": [0, 1, 2, 3]}')
    return path


def test_augmentations_disable_the_cache_and_bf16_runs(tmp_path, caplog, train_argv):
    out = tmp_path / "aug"
    with caplog.at_level(logging.WARNING, logger="train_head.train"):
        train_cli.main(train_argv(out, "--train_batch_size", "8", "--max_train_steps", "2", "--flip_prob", "0.5",
                             "--color_jitter_prob", "0.5", "--mixed_precision", "bf16"))
    assert any("feature cache disabled" in r.message for r in caplog.records)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["feature_cache"] is False and not (out / "feature_cache").exists()
    assert all(t.dtype == torch.float32 for t in _head(out / "final").values())
    losses = [r["train/loss"] for r in read_jsonl(out / "history.jsonl") if r["kind"] == "train"]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("flag,value,message", [
    ("--learning_rate", "0", "--learning_rate must be > 0"),
    ("--train_batch_size", "0", "--train_batch_size must be >= 1"),
    ("--val_fraction", "1.5", "--val_fraction must be in"),
    ("--flip_prob", "2", "flip_prob must be in"),
])
def test_bad_arguments_exit_with_a_clear_message(tmp_path, flag, value, message, train_argv):
    with pytest.raises(SystemExit, match=message):
        train_cli.main(train_argv(tmp_path / "x", flag, value))


def test_batch_larger_than_the_data_is_refused(tmp_path, train_argv):
    with pytest.raises(SystemExit, match="nearid-train-head: .*lower --train_batch_size"):
        train_cli.main(train_argv(tmp_path / "x", "--train_batch_size", "64"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_run_matches_the_single_process_run(tmp_path, train_argv):
    """torchrun with 2 CPU processes (gloo), batch 4 each == one process with batch 8: same samples per step, the
    positive pool gathered across ranks and the loss normalised globally give the same head."""
    import os
    import subprocess
    import sys

    (tmp_path / "val.json").write_text('{"indices": [0, 1, 2, 3]}')
    common = ("--max_train_steps", "4", "--learning_rate", "2e-3", "--checkpointing_steps", "2",
              "--validation_steps", "2", "--val_indices", str(tmp_path / "val.json"))
    single = tmp_path / "single"
    train_cli.main(train_argv(single, "--train_batch_size", "8", *common))
    ddp = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         "-m", "train_head", *train_argv(ddp, "--train_batch_size", "4", *common)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _max_diff(_head(single / "final"), _head(ddp / "final")) < 1e-5
    assert _max_diff(_head(single / "checkpoint-2" / "head"), _head(ddp / "checkpoint-2" / "head")) < 1e-5
    state = json.loads((ddp / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["steps_per_epoch"] == 2  # schedule from the prepared loader
    shards = {p.name.split("-")[1] for p in (ddp / "feature_cache").rglob("tokens-r*.npy")}
    assert shards == {"r000", "r001"}  # each rank encoded its share of the images
    train_records = [r for r in read_jsonl(ddp / "history.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]  # logged once, by the main process
    single_records = [r for r in read_jsonl(single / "history.jsonl") if r["kind"] == "train"]
    for a, b in zip(train_records, single_records):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4)
