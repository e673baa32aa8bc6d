"""Watch mode: a thread grows an sd-scripts sample folder (with a half-written image completed later and a
checkpoint that appears only after its round was scored) while ``follow`` polls it; rounds are scored once each, in
step order, the best checkpoint is copied as soon as it exists, and the watcher stops when told."""

from __future__ import annotations

import io
import json
import math
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from nearid_reward import IdentityValidator, NearIDModel
from nearid_reward.cli import samples as samples_cli
from nearid_reward.files import CheckpointError
from nearid_reward.testing import random_images
from nearid_reward.trainer_samples import scoring
from nearid_reward.trainer_samples.scoring import SamplesConfig, SampleScorer, follow

PROMPTS = 3
TS = "20260102030405"


def _png(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((tensor.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _image(step: int, prompt: int, refs: torch.Tensor) -> torch.Tensor:
    if step == 600:
        generator = torch.Generator().manual_seed(prompt)
        return (refs[prompt] + 0.03 * torch.randn(refs[prompt].shape, generator=generator)).clamp(0, 1)
    x = torch.linspace(0, 1, 64)
    wave = (torch.sin(x * (8 + prompt + step / 100) * math.pi)[None, :].expand(64, 64) + 1) / 2
    return torch.stack([wave, wave.flip(1), wave.T])


def _wait(condition, what: str, timeout: float = 60.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what}")
        time.sleep(0.01)


def test_watch_scores_each_file_once_in_order_and_copies_the_best_when_its_checkpoint_appears(
    tmp_path: Path, tiny_head: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refs = random_images(4, 64, seed=1)
    loads: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    real_load = scoring.load_image

    def counting_load(path: str | Path) -> Image.Image:
        try:
            image = real_load(path)
        except ValueError:
            failures[Path(path).name] += 1
            raise
        loads[Path(path).name] += 1
        return image

    copies: list[str] = []
    real_copy = scoring.copy_winner

    def recording_copy(checkpoint, dest, scores):  # noqa: ANN001, ANN202
        copies.append(checkpoint.path.name)
        return real_copy(checkpoint, dest, scores)

    monkeypatch.setattr(scoring, "load_image", counting_load)
    monkeypatch.setattr(scoring, "copy_winner", recording_copy)

    run = tmp_path / "run"
    sample = run / "sample"
    sample.mkdir(parents=True)
    out = run / "nearid_samples"
    validator = IdentityValidator(NearIDModel.from_pretrained(tiny_head), refs, aggregate="max",
                                  history_path=out / "identity_history.jsonl")
    scorer = SampleScorer(validator, SamplesConfig("kohya", sample, run, out, copy_winner=True, plot=False))
    listed_without: list[list[str]] = []  # the rounds without a checkpoint after each pass
    real_poll = scorer.poll

    def recording_poll(**kwargs):  # noqa: ANN003, ANN202
        rows = real_poll(**kwargs)
        listed_without.append(scorer.result()["without_checkpoint"])
        return rows

    monkeypatch.setattr(scorer, "poll", recording_poll)
    done = run / "DONE"
    half = f"dog_000400_01_{TS}_8.png"
    seen: dict[str, object] = {}
    errors: list[BaseException] = []

    def name(step: int, p: int) -> str:
        return f"dog_{step:06d}_{p:02d}_{TS}_{7 + p}.png"

    def write_round(step: int) -> None:
        for p in range(PROMPTS):
            (sample / name(step, p)).write_bytes(_png(_image(step, p, refs)))

    def checkpoint(step: int) -> None:
        save_file({"w": torch.full((2,), float(step))}, str(run / f"dog-step{step:08d}.safetensors"))

    def trainer() -> None:
        try:
            write_round(0)
            write_round(200)
            checkpoint(200)
            (sample / name(400, 0)).write_bytes(_png(_image(400, 0, refs)))
            whole = _png(_image(400, 1, refs))
            (sample / half).write_bytes(whole[: len(whole) // 2])  # the trainer is still writing it
            (sample / name(400, 2)).write_bytes(_png(_image(400, 2, refs)))
            checkpoint(400)
            _wait(lambda: failures[half] > 0, "the watcher to meet the half-written image")
            write_round(600)  # complete, but it must wait for step 400: the history stays in step order
            time.sleep(0.2)
            seen["history_before_completion"] = [r["step"] for r in validator.history]
            (sample / half).write_bytes(whole)
            _wait(lambda: any(r["step"] == 600 for r in validator.history), "step 600 to be scored")
            seen["copies_before_checkpoint"] = list(copies)
            checkpoint(600)  # the winner's file appears only now
            _wait(lambda: "dog-step00000600.safetensors" in copies, "the step-600 checkpoint to be copied")
            write_round(800)
            checkpoint(800)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)
        finally:
            done.touch()

    thread = threading.Thread(target=trainer)
    thread.start()
    follow(scorer, poll_interval=0.02, until_file=done)  # returns once DONE exists, after a last pass
    thread.join(timeout=60)
    assert not errors, errors

    assert seen["history_before_completion"] == [200]  # 400 waited for its image, 600 waited for 400
    assert failures[half] >= 1 and loads[half] == 1
    expected = {name(s, p) for s in (0, 200, 400, 600, 800) for p in range(PROMPTS)} - {name(400, 1)} | {half}
    assert set(loads) == expected and set(loads.values()) == {1}  # every file loaded (scored) exactly once
    assert scorer.loaded_files == len(expected)
    history = [json.loads(line) for line in (out / "identity_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [200, 400, 600, 800]
    assert "dog-step00000600.safetensors" not in seen["copies_before_checkpoint"]  # type: ignore[operator]
    assert copies[0] == "dog-step00000200.safetensors" and copies[-1] == "dog-step00000600.safetensors"
    assert len(copies) == len(set(copies))  # a copy only for a new best
    copied = out / "best_identity" / "dog-step00000600.safetensors"
    assert copied.read_bytes() == (run / "dog-step00000600.safetensors").read_bytes()
    result = json.loads((out / "identity_samples.json").read_text())
    assert result["winner"]["step"] == 600 and result["without_checkpoint"] == []
    assert ["step 600"] in listed_without  # listed while its checkpoint had not appeared yet
    assert all(listed in ([], ["step 600"]) for listed in listed_without)


def test_ctrl_c_while_watching_exits_130_with_one_line(
    tmp_path: Path, tiny_head: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "refs").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "refs" / "a.png")

    def interrupted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(samples_cli, "follow", interrupted)
    with pytest.raises(SystemExit) as raised:
        samples_cli.main(["--samples_dir", str(tmp_path), "--trainer", "kohya", "--watch", "--nearid_model",
                          str(tiny_head), "--nearid_reference_dir", str(tmp_path / "refs")])
    assert raised.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == ["nearid-samples: interrupted"]


def test_follow_stops_when_the_event_is_set(tmp_path: Path, tiny_head: Path) -> None:
    validator = IdentityValidator(NearIDModel.from_pretrained(tiny_head), random_images(2, 32, seed=1))
    scorer = SampleScorer(validator, SamplesConfig("kohya", tmp_path, tmp_path, tmp_path / "out", plot=False))
    stop = threading.Event()
    timer = threading.Timer(0.2, stop.set)
    timer.start()
    started = time.monotonic()
    follow(scorer, poll_interval=0.05, stop=stop)
    assert stop.is_set() and time.monotonic() - started < 30
    assert json.loads((tmp_path / "out" / "identity_samples.json").read_text())["rounds"] == []


def test_a_checkpoint_that_vanishes_while_being_copied_does_not_stop_the_watch(
    tmp_path: Path, tiny_head: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refs = random_images(4, 64, seed=1)
    sample = tmp_path / "sample"
    sample.mkdir()
    for step in (0, 600, 800):
        for p in range(PROMPTS):
            (sample / f"dog_{step:06d}_{p:02d}_{TS}.png").write_bytes(_png(_image(step, p, refs)))
    for step in (600, 800):
        save_file({"w": torch.full((2,), float(step))}, str(tmp_path / f"dog-step{step:08d}.safetensors"))
    real_copy = scoring.copy_winner
    attempts: list[str] = []

    def pruned_on_first_try(checkpoint, dest, scores):  # noqa: ANN001, ANN202
        attempts.append(checkpoint.path.name)
        if len(attempts) == 1:
            raise CheckpointError(f"checkpoint {checkpoint.path} is missing or still being written")
        return real_copy(checkpoint, dest, scores)

    monkeypatch.setattr(scoring, "copy_winner", pruned_on_first_try)
    validator = IdentityValidator(NearIDModel.from_pretrained(tiny_head), refs, aggregate="max")
    scorer = SampleScorer(validator, SamplesConfig("kohya", sample, tmp_path, tmp_path / "out", copy_winner=True,
                                                   plot=False))
    scorer.poll(finished=True)  # no exception: the next best is copied instead
    assert attempts == ["dog-step00000600.safetensors", "dog-step00000800.safetensors"]
    scorer.poll(finished=True)  # the better round is tried again and replaces it
    assert attempts[-1] == "dog-step00000600.safetensors"
    assert (tmp_path / "out" / "best_identity" / "dog-step00000600.safetensors").is_file()
    assert not (tmp_path / "out" / "best_identity" / "dog-step00000800.safetensors").exists()
