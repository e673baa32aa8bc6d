"""``nearid-samples`` end to end on each trainer's layout: a planted winner (one step's samples are the reference
photos with light noise, every other round is unrelated striped images) must win by a margin, its checkpoint must be
copied under its own name, and rounds without a checkpoint must be listed, not given a neighbour's."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from nearid_reward.cli import samples as samples_cli
from nearid_reward.testing import random_images

PROMPTS = 3
STEPS = (0, 200, 400, 600, 800)
PLANTED = 600
CHECKPOINT_STEPS = (200, 600, 800)  # saves every 200 from 200, but 400 was pruned
OT_TS = "2026-01-02_03-04-05"


def _references() -> torch.Tensor:
    return random_images(4, 64, seed=1)  # [4, 3, 64, 64]


def _image(step: int, prompt: int) -> torch.Tensor:
    """The sample of ``prompt`` at ``step``: a noisy copy of reference ``prompt`` at the planted step, stripes else."""
    if step == PLANTED:
        generator = torch.Generator().manual_seed(prompt)
        ref = _references()[prompt]
        return (ref + 0.03 * torch.randn(ref.shape, generator=generator)).clamp(0, 1)
    x = torch.linspace(0, 1, 64)
    wave = (torch.sin(x * (8 + prompt + step / 100) * math.pi)[None, :].expand(64, 64) + 1) / 2
    return torch.stack([wave, wave.flip(1), wave.T])


def _save(tensor: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((tensor.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


def _weights(path: Path, step: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora.weight": torch.full((2, 2), float(step))}, str(path))
    return path


def _kohya(root: Path) -> tuple[Path, dict[int, Path]]:
    for step in STEPS:
        for p in range(PROMPTS):
            _save(_image(step, p), root / "sample" / f"my_lora-v2_{step:06d}_{p:02d}_20260102030405_{7 + p}.png")
    ckpts = {s: _weights(root / f"my_lora-v2-step{s:08d}.safetensors", s) for s in CHECKPOINT_STEPS}
    return root / "sample", ckpts


def _ai_toolkit(root: Path) -> tuple[Path, dict[int, Path]]:
    job = root / "output" / "dog"
    for i, step in enumerate(STEPS):
        for p in range(PROMPTS):
            _save(_image(step, p), job / "samples" / f"{1767225600000 + 1000 * i + p}__{step:09d}_{p}.jpg")
    ckpts = {s: _weights(job / f"dog_{s:09d}.safetensors", s) for s in CHECKPOINT_STEPS}
    return job / "samples", ckpts


def _simpletuner(root: Path) -> tuple[Path, dict[int, Path]]:
    for step in STEPS:
        for p in range(PROMPTS):
            name = f"identity_{p:02d}"
            if step == 0:
                _save(_image(0, p), root / "benchmarks" / "base_model" / f"{name}_64x64.png")
            else:
                _save(_image(step, p), root / "validation_images" / f"step_{step}_{name}_0_64x64.webp")
    ckpts = {s: _weights(root / f"checkpoint-{s}" / "pytorch_lora_weights.safetensors", s) for s in CHECKPOINT_STEPS}
    return root / "validation_images", ckpts


def _onetrainer(root: Path) -> tuple[Path, dict[int, Path]]:
    for step in STEPS:
        for p in range(PROMPTS):
            name = f"{OT_TS}-training-sample-{step}-{step // 200}-0.png"
            _save(_image(step, p), root / "samples" / f"{p} - a photo of sks dog {p}" / name)
            _save(_image(0, p), root / "samples" / f"{p} - a photo of sks dog {p} - no-ema" / name)  # never scored
    ckpts = {s: _weights(root / "save" / f"dog{OT_TS}-save-{s}-{s // 200}-0.safetensors", s) for s in CHECKPOINT_STEPS}
    return root / "samples", ckpts


LAYOUTS: dict[str, Callable[[Path], tuple[Path, dict[int, Path]]]] = {
    "kohya": _kohya, "ai-toolkit": _ai_toolkit, "simpletuner": _simpletuner, "onetrainer": _onetrainer,
}


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("refs")
    for i, image in enumerate(_references()):
        _save(image, folder / f"ref_{i}.png")
    return folder


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert samples_cli.main([*argv, "--json", "--no_plot"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("trainer", sorted(LAYOUTS))
def test_planted_winner_is_copied_and_unmatched_rounds_are_listed(
    trainer: str, tmp_path: Path, tiny_head: Path, references: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    samples_dir, ckpts = LAYOUTS[trainer](tmp_path / "run")
    result = _run(["--samples_dir", str(samples_dir), "--nearid_model", str(tiny_head), "--nearid_reference_dir",
                   str(references), "--aggregate", "max", "--copy_winner"], capsys)  # --trainer auto
    assert result["trainer"] == trainer
    rows = {r["round"]: r for r in result["rounds"]}
    assert sorted(rows) == ["base", "step 200", "step 400", "step 600", "step 800"]
    scores = {r["step"]: r["identity_mean"] for r in result["rounds"] if r["kind"] == "step"}
    others = max(v for s, v in scores.items() if s != PLANTED)
    assert scores[PLANTED] > others + 0.1  # the tiny random NearID tells the planted round apart with margin
    assert result["best"]["round"] == "step 600" and result["winner"]["round"] == "step 600"
    assert result["without_checkpoint"] == ["step 400"]  # listed, not given step 200's or 600's file
    assert rows["step 400"]["checkpoint"] is None and rows["base"]["checkpoint"] is None
    for step in (200, 600, 800):
        assert Path(rows[f"step {step}"]["checkpoint"]).resolve() == (
            ckpts[step].parent if trainer == "simpletuner" else ckpts[step]).resolve()
    # identity_gain against the trainer's own base-model round
    assert rows["step 600"]["identity_gain"] == pytest.approx(scores[PLANTED] - result["base"]["identity_mean"])
    winner_dir = Path(result["winner_dir"])
    copied = winner_dir / ckpts[PLANTED].name
    assert copied.read_bytes() == ckpts[PLANTED].read_bytes()
    assert sorted(p.name for p in winner_dir.iterdir()) == sorted([ckpts[PLANTED].name, "identity_scores.json"])
    assert json.loads((winner_dir / "identity_scores.json").read_text())["round"]["step"] == PLANTED
    out = winner_dir.parent
    history = [json.loads(line) for line in (out / "identity_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [200, 400, 600, 800]
    assert [h["is_best"] for h in history][2:] == [True, False]  # the validator's best step is the planted one
    assert "| 600 |" in (out / "identity_summary.md").read_text()


def test_rerun_reuses_the_history_and_kohya_epoch_rounds_take_their_step_from_the_header(
    tmp_path: Path, tiny_head: Path, references: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    for epoch in range(4):  # epoch 0 is --sample_at_first
        for p in range(PROMPTS):
            _save(_image(PLANTED if epoch == 2 else epoch * 100, p), run / "sample" / f"dog_e{epoch:06d}_{p:02d}_"
                  f"20260102030405.png")  # no --d seed in the prompt lines
    for epoch, step in ((1, 250), (2, 500)):
        save_file({"w": torch.full((2,), float(epoch))}, str(run / f"dog-{epoch:06d}.safetensors"),
                  metadata={"ss_steps": str(step), "ss_epoch": str(epoch)})
    argv = ["--samples_dir", str(run / "sample"), "--trainer", "kohya", "--nearid_model", str(tiny_head),
            "--nearid_reference_dir", str(references), "--aggregate", "max", "--copy_winner"]
    result = _run(argv, capsys)
    rows = {r["round"]: r for r in result["rounds"]}
    assert (rows["epoch 2"]["step"], rows["epoch 2"]["epoch"]) == (500, 2)
    assert rows["epoch 1"]["step"] == 250
    assert rows["epoch 3"]["step"] is None and rows["epoch 3"]["checkpoint"] is None  # kept as an epoch
    assert result["without_checkpoint"] == ["epoch 3"]
    assert (Path(result["winner_dir"]) / "dog-000002.safetensors").is_file()
    history = run / "nearid_samples" / "identity_history.jsonl"
    lines = history.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [250, 500]
    again = _run(argv, capsys)  # a second run scores nothing again: the rows come back from the history
    assert history.read_text().splitlines() == lines
    assert again["winner"]["identity_mean"] == pytest.approx(result["winner"]["identity_mean"])
    assert {r["round"]: r.get("resumed", False) for r in again["rounds"]}["epoch 2"] is True


def test_class_prompts_are_scored_as_leakage(
    tmp_path: Path, tiny_head: Path, references: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    for step in (0, 100):
        for p in range(4):  # prompts 0-1 identity, 2-3 class prompts
            name = f"{step:06d}_{p:02d}_20260102030405.png"
            _save(_image(PLANTED if p < 2 and step else 0, p), run / "sample" / name)
    argv = ["--samples_dir", str(run / "sample"), "--nearid_model", str(tiny_head), "--nearid_reference_dir",
            str(references), "--aggregate", "max"]
    with_class = {r["round"]: r for r in _run([*argv, "--class_prompt_start", "2"], capsys)["rounds"]}
    row = with_class["step 100"]
    assert row["num_images"] == 2 and "class_leakage_mean" in row
    assert row["identity_mean"] > row["class_leakage_mean"] + 0.1
    assert "winner" not in row


def test_bad_input_is_one_line(tmp_path: Path, tiny_head: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        samples_cli.main(["--samples_dir", str(tmp_path / "nope"), "--nearid_model", str(tiny_head),
                          "--nearid_reference_dir", str(tmp_path)])
    assert str(raised.value.code).startswith(f"nearid-samples: --samples_dir not found: {tmp_path / 'nope'}")
    (tmp_path / "photos").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "holiday.png")
    with pytest.raises(SystemExit) as raised:
        samples_cli.main(["--samples_dir", str(tmp_path / "photos"), "--nearid_model", str(tiny_head),
                          "--nearid_reference_dir", str(tmp_path)])
    assert "no sample file in" in str(raised.value.code) and "holiday.png" in str(raised.value.code)
    with pytest.raises(SystemExit) as raised:
        samples_cli.main(["--samples_dir", str(tmp_path), "--nearid_model", "m", "--nearid_reference_dir", "r",
                          "--until_file", "DONE"])
    assert str(raised.value.code).startswith("nearid-samples: --until_file needs --watch")
    (tmp_path / "DONE").touch()  # watching a run that finished without a sample: the same one line, no endless wait
    with pytest.raises(SystemExit) as raised:
        samples_cli.main(["--samples_dir", str(tmp_path / "photos"), "--nearid_model", str(tiny_head),
                          "--nearid_reference_dir", str(tmp_path), "--watch", "--poll_interval", "0.01",
                          "--until_file", str(tmp_path / "DONE")])
    assert "no sample file in" in str(raised.value.code)


def test_a_rerun_keeps_a_copied_winner_whose_checkpoint_was_pruned(
    tmp_path: Path, tiny_head: Path, references: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    samples_dir, ckpts = _kohya(tmp_path / "run")
    argv = ["--samples_dir", str(samples_dir), "--nearid_model", str(tiny_head), "--nearid_reference_dir",
            str(references), "--aggregate", "max", "--copy_winner"]
    first = _run(argv, capsys)
    kept = Path(first["winner_dir"]) / ckpts[PLANTED].name
    expected = kept.read_bytes()
    ckpts[PLANTED].unlink()  # the trainer pruned the best step's file after it was copied
    again = _run(argv, capsys)
    assert again["winner"]["round"] == "step 600" and kept.read_bytes() == expected
    assert not (Path(again["winner_dir"]) / ckpts[800].name).exists()  # not replaced by the next best with a file


def test_diffusers_final_validation_images_select_the_final_weights(
    tmp_path: Path, tiny_head: Path, references: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "dog-lora"  # a DreamBooth LoRA script's --output_dir after training
    for i in range(PROMPTS):
        _save(_image(PLANTED, i), out / f"image_{i}.png")
    final = _weights(out / "pytorch_lora_weights.safetensors", 1000)
    _weights(out / "checkpoint-500" / "pytorch_lora_weights.safetensors", 500)
    result = _run(["--samples_dir", str(out), "--nearid_model", str(tiny_head), "--nearid_reference_dir",
                   str(references), "--aggregate", "max", "--copy_winner"], capsys)
    assert result["trainer"] == "diffusers"
    assert [r["round"] for r in result["rounds"]] == ["final"]
    assert result["winner"]["checkpoint"] == str(final)
    assert (Path(result["winner_dir"]) / final.name).read_bytes() == final.read_bytes()
    assert result["rounds"][0]["identity_mean"] > 0.95  # near-copies of the references
