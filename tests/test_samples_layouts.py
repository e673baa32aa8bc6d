"""Trainer sample layouts and checkpoint names: golden file names built from each trainer's documented pattern
(not copied files), and step -> checkpoint resolution, including sd-scripts epoch files through a real safetensors
header with ``ss_steps`` / ``ss_epoch``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nearid_reward.trainer_samples.checkpoints import (
    TrainerCheckpoint,
    checkpoint_complete,
    find_trainer_checkpoints,
    match_checkpoint,
    read_safetensors_metadata,
)
from nearid_reward.trainer_samples.layouts import RoundKey, detect_trainer, parse_sample_path, scan_samples

TS = "20260102030405"  # sd-scripts: time.strftime("%Y%m%d%H%M%S")
OT_TS = "2026-01-02_03-04-05"  # OneTrainer: "%Y-%m-%d_%H-%M-%S"
STEP, EPOCH, BASE, FINAL = "step", "epoch", "base", "final"


def _fields(relpath: str, trainer: str) -> tuple | None:
    s = parse_sample_path(relpath, trainer)
    if s is None:
        return None
    return (s.round.kind, s.round.number, s.round.variant, s.prompt, s.prompt_index, s.image_index, s.seed, s.name)


@pytest.mark.parametrize(
    ("relpath", "expected"),
    [
        # [<output_name>_]{e<epoch:06d>|<step:06d>}_<prompt:02d>_<timestamp>[_<seed>].png
        (f"my_lora-v2_000500_01_{TS}_42.png", (STEP, 500, "", "01", 1, 0, 42, "my_lora-v2")),
        (f"dog_lora_e000005_00_{TS}_7.png", (EPOCH, 5, "", "00", 0, 0, 7, "dog_lora")),
        (f"000300_02_{TS}.png", (STEP, 300, "", "02", 2, 0, None, None)),  # no output_name, no --d seed
        (f"a_b-c_e000000_03_{TS}.png", (BASE, 0, "", "03", 3, 0, None, "a_b-c")),  # --sample_at_first, epoch form
        (f"dog_000000_00_{TS}_1.png", (BASE, 0, "", "00", 0, 0, 1, "dog")),
        (f"v_000100_000500_00_{TS}_1.png", (STEP, 500, "", "00", 0, 0, 1, "v_000100")),  # digits in the name
        (f"dog_1234567_10_{TS}_3.png", (STEP, 1234567, "", "10", 10, 0, 3, "dog")),  # past 6 digits, 10+ prompts
        ("dog_000500_00.png", None),  # no timestamp
        (f"dog_000500_00_{TS}_42.jpg", None),  # sd-scripts writes PNG only
        (f"sub/dog_000500_00_{TS}.png", None),  # not inside sample/ itself
    ],
)
def test_kohya_names(relpath: str, expected: tuple | None) -> None:
    assert _fields(relpath, "kohya") == expected


@pytest.mark.parametrize(
    ("relpath", "expected"),
    [
        # samples/<ms>__<step:09d>_<prompt>.<ext>; the sample after training has no step
        ("1767225600000__000000500_0.jpg", (STEP, 500, "", "00", 0, 0, None, None)),
        ("1767225600000__000000000_3.jpg", (BASE, 0, "", "03", 3, 0, None, None)),
        ("1767225600123__2.jpg", (FINAL, 0, "", "02", 2, 0, None, None)),
        ("1767225600000__000012000_11.webp", (STEP, 12000, "", "11", 11, 0, None, None)),
        ("rank01_sample004_1767225600000__000000500_0.png", (STEP, 500, "", "04", 4, 0, None, None)),
        ("1767225600000_000000500_0.jpg", None),  # one underscore is not ai-toolkit's
        ("1767225600000__000000500_0.txt", None),
    ],
)
def test_ai_toolkit_names(relpath: str, expected: tuple | None) -> None:
    assert _fields(relpath, "ai-toolkit") == expected


@pytest.mark.parametrize(
    ("relpath", "expected"),
    [
        # validation_images/step_<step>_<shortname>_<idx>_<W>x<H>.<ext>; base in benchmarks/base_model/
        ("validation_images/step_40_my_dog_portrait_0_1024x1024.webp",
         (STEP, 40, "", "my_dog_portrait", None, 0, None, None)),
        ("validation_images/step_1200_class_00_1_768x1024.jpg", (STEP, 1200, "", "class_00", None, 1, None, None)),
        ("step_40_x_0_512x512.png", (STEP, 40, "", "x", None, 0, None, None)),  # --samples_dir validation_images/
        ("benchmarks/base_model/identity_03_1024x1024.png", (BASE, 0, "", "identity_03", None, 0, None, None)),
        ("validation_images/step_40_x_512x512.png", None),  # no image index
        ("benchmarks/other/identity_03_1024x1024.png", None),
    ],
)
def test_simpletuner_names(relpath: str, expected: tuple | None) -> None:
    assert _fields(relpath, "simpletuner") == expected


@pytest.mark.parametrize(
    ("relpath", "expected"),
    [
        # <i> - <prompt>[ - no-ema]/[<prefix>]<ts>-training-sample-<global_step>-<epoch>-<epoch_step>.<fmt>
        (f"0 - a photo of sks dog/{OT_TS}-training-sample-600-3-0.png",
         (STEP, 600, "", "a photo of sks dog", 0, 0, None, None)),
        (f"1 - a photo of a dog - no-ema/{OT_TS}-training-sample-600-3-0.jpg",
         (STEP, 600, "no-ema", "a photo of a dog", 1, 0, None, None)),
        (f"custom/{OT_TS}-training-sample-250-1-50.png", (STEP, 250, "custom", "custom", None, 0, None, None)),
        (f"samples/2 - x - y/{OT_TS}-training-sample-0-0-0.webp", (BASE, 0, "", "x - y", 2, 0, None, None)),
        (f"0 - p/myrun_{OT_TS}-training-sample-10-0-10.png", (STEP, 10, "", "p", 0, 0, None, None)),
        (f"{OT_TS}-training-sample-10-0-10.png", None),  # not in a prompt folder
        (f"0 - p/{OT_TS}-save-10-0-10.png", None),
    ],
)
def test_onetrainer_names(relpath: str, expected: tuple | None) -> None:
    assert _fields(relpath, "onetrainer") == expected


def test_diffusers_final_validation_images_and_unknown_trainer() -> None:
    assert _fields("image_3.png", "diffusers") == (FINAL, 0, "", "validation", 0, 3, None, None)
    assert parse_sample_path("checkpoint-500/image_0.png", "diffusers") is None
    with pytest.raises(ValueError, match="trainer must be one of .*got 'comfy'"):
        parse_sample_path("x.png", "comfy")


def test_round_order_and_labels() -> None:
    keys = [RoundKey("final"), RoundKey("step", 20), RoundKey("epoch", 1), RoundKey("base"), RoundKey("step", 3)]
    assert [k.label for k in sorted(keys, key=RoundKey.sort_key)] == ["base", "step 3", "step 20", "epoch 1",
                                                                        "final"]
    assert RoundKey("step", 5, "no-ema").label == "step 5 (no-ema)"


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not read")
    return path


def test_scan_and_auto_detection(tmp_path: Path) -> None:
    kohya = tmp_path / "sample"
    for step in (0, 100):
        for p in range(2):
            _touch(kohya / f"dog_{step:06d}_{p:02d}_{TS}_{p}.png")
    _touch(kohya / "notes.png")
    samples, unparsed = scan_samples(kohya, "kohya")
    assert [s.relpath for s in samples] == sorted(f"dog_{s:06d}_{p:02d}_{TS}_{p}.png" for s in (0, 100)
                                                  for p in range(2))
    assert unparsed == ["notes.png"]
    assert scan_samples(kohya, "kohya", known={s.relpath for s in samples})[0] == []  # only new files are parsed
    assert detect_trainer(kohya) == "kohya"
    ot = tmp_path / "ws" / "samples"
    _touch(ot / "0 - p" / f"{OT_TS}-training-sample-10-0-10.png")
    assert detect_trainer(ot) == "onetrainer"
    st = tmp_path / "out"
    _touch(st / "validation_images" / "step_10_a_b_0_64x64.png")
    _touch(st / "benchmarks" / "base_model" / "a_b_64x64.png")
    assert detect_trainer(st / "validation_images") == "simpletuner"
    assert [s.round.kind for s in scan_samples(st / "validation_images", "simpletuner")[0]] == [BASE, STEP]
    _touch(st / "nearid_samples" / "identity_summary.png")  # the scorer's own output inside the run folder
    assert scan_samples(st / "validation_images", "simpletuner")[1] == ["nearid_samples/identity_summary.png"]
    assert scan_samples(st / "validation_images", "simpletuner", skip=[st / "nearid_samples"])[1] == []
    empty = tmp_path / "empty"
    _touch(empty / "holiday.png")
    with pytest.raises(ValueError, match="no sample file in .*empty matches a known layout"):
        detect_trainer(empty)


# ---------------------------------------------------------------------------------------------- checkpoints
def _lora(path: Path, value: float, metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_up.weight": torch.full((4, 2), value), "lora_down.weight": torch.ones(2, 4)}, str(path),
              metadata=metadata)
    return path


def _by_path(checkpoints: list[TrainerCheckpoint]) -> dict[str, TrainerCheckpoint]:
    return {c.path.name: c for c in checkpoints}


def test_kohya_checkpoints_through_safetensors_headers(tmp_path: Path) -> None:
    _lora(tmp_path / "dog-step00000600.safetensors", 1.0)
    _lora(tmp_path / "dog-000005.safetensors", 2.0, {"ss_steps": "500", "ss_epoch": "5", "ss_output_name": "dog"})
    _lora(tmp_path / "dog.safetensors", 3.0, {"ss_steps": "1000", "ss_epoch": "10"})
    half = _lora(tmp_path / "dog-000007.safetensors", 4.0, {"ss_steps": "700", "ss_epoch": "7"})
    half.write_bytes(half.read_bytes()[:-9])  # still being written: its header promises more bytes
    (tmp_path / "dog-state").mkdir()  # --save_state folders are not models
    assert read_safetensors_metadata(tmp_path / "dog-000005.safetensors") == {
        "ss_steps": "500", "ss_epoch": "5", "ss_output_name": "dog"}
    assert read_safetensors_metadata(half) is None
    found = find_trainer_checkpoints(tmp_path, "kohya")
    by = _by_path(found)
    assert sorted(by) == ["dog-000005.safetensors", "dog-step00000600.safetensors", "dog.safetensors"]
    assert (by["dog-000005.safetensors"].step, by["dog-000005.safetensors"].epoch) == (500, 5)
    assert (by["dog.safetensors"].step, by["dog.safetensors"].final) == (1000, True)

    def name(key: RoundKey) -> str | None:
        hit = match_checkpoint(key, found)
        return None if hit is None else hit.path.name

    assert name(RoundKey("step", 600)) == "dog-step00000600.safetensors"
    assert name(RoundKey("epoch", 5)) == "dog-000005.safetensors"  # e000005 samples: step 500 from the header
    assert name(RoundKey("step", 500)) == "dog-000005.safetensors"
    assert name(RoundKey("epoch", 10)) == "dog.safetensors"  # the last epoch saved only as the final file
    assert name(RoundKey("step", 1000)) == "dog.safetensors"
    assert name(RoundKey("final")) == "dog.safetensors"
    assert name(RoundKey("step", 700)) is None  # the half-written epoch-7 file is not matched (yet)
    assert name(RoundKey("step", 800)) is None and name(RoundKey("base")) is None
    _lora(half, 4.0, {"ss_steps": "700", "ss_epoch": "7"})  # the trainer finished writing it
    hit = match_checkpoint(RoundKey("epoch", 7), find_trainer_checkpoints(tmp_path, "kohya"))
    assert (hit.path.name, hit.step) == ("dog-000007.safetensors", 700)


def test_ai_toolkit_checkpoints(tmp_path: Path) -> None:
    _lora(tmp_path / "dog_000000500.safetensors", 1.0)
    _lora(tmp_path / "dog_LoRA_000000750.safetensors", 2.0)
    _lora(tmp_path / "dog.safetensors", 3.0)
    (tmp_path / "samples").mkdir()
    (tmp_path / "optimizer.pt").write_bytes(b"x")
    found = find_trainer_checkpoints(tmp_path, "ai-toolkit")
    assert match_checkpoint(RoundKey("step", 500), found).path.name == "dog_000000500.safetensors"
    assert match_checkpoint(RoundKey("step", 750), found).path.name == "dog_LoRA_000000750.safetensors"
    assert match_checkpoint(RoundKey("final"), found).path.name == "dog.safetensors"
    assert match_checkpoint(RoundKey("step", 600), found) is None
    assert len(found) == 3


def test_simpletuner_and_diffusers_checkpoints(tmp_path: Path) -> None:
    _lora(tmp_path / "checkpoint-300" / "pytorch_lora_weights.safetensors", 1.0)
    _lora(tmp_path / "checkpoint-600" / "pytorch_lora_weights.safetensors", 2.0)
    _lora(tmp_path / "pytorch_lora_weights.safetensors", 3.0)
    (tmp_path / "checkpoint-last").mkdir()
    for trainer in ("simpletuner", "diffusers"):
        found = find_trainer_checkpoints(tmp_path, trainer)
        assert match_checkpoint(RoundKey("step", 600), found).path == tmp_path / "checkpoint-600"
        assert match_checkpoint(RoundKey("final"), found).path == tmp_path / "pytorch_lora_weights.safetensors"
        assert match_checkpoint(RoundKey("step", 450), found) is None


def test_onetrainer_checkpoints_prefer_saves_over_backups(tmp_path: Path) -> None:
    _lora(tmp_path / "save" / f"dog-{OT_TS}-save-600-3-0.safetensors", 1.0)
    _lora(tmp_path / "save" / "2026-01-02_04-00-00-save-900-4-100" / "unet" / "x.safetensors", 2.0)  # diffusers
    _lora(tmp_path / "backup" / "2026-01-02_03-30-00-backup-600-3-0" / "model.safetensors", 3.0)
    _lora(tmp_path / "backup" / "2026-01-02_03-50-00-backup-800-4-0" / "model.safetensors", 4.0)
    found = find_trainer_checkpoints(tmp_path, "onetrainer")
    assert match_checkpoint(RoundKey("step", 600), found).path.name == f"dog-{OT_TS}-save-600-3-0.safetensors"
    assert match_checkpoint(RoundKey("step", 800), found).backup  # no save at 800: the backup
    assert match_checkpoint(RoundKey("step", 900), found).path.name == "2026-01-02_04-00-00-save-900-4-100"
    assert match_checkpoint(RoundKey("step", 600, "no-ema"), found) is None  # saves hold the EMA weights
    assert match_checkpoint(RoundKey("step", 700), found) is None


def test_checkpoint_complete(tmp_path: Path) -> None:
    whole = _lora(tmp_path / "a.safetensors", 1.0)
    assert checkpoint_complete(TrainerCheckpoint(whole, 1))
    cut = tmp_path / "b.safetensors"
    cut.write_bytes(whole.read_bytes()[:20])
    assert not checkpoint_complete(TrainerCheckpoint(cut, 1))
    assert not checkpoint_complete(TrainerCheckpoint(tmp_path / "missing.safetensors", 1))
    folder = tmp_path / "checkpoint-5"
    _lora(folder / "pytorch_lora_weights.safetensors", 1.0)
    assert checkpoint_complete(TrainerCheckpoint(folder, 5))
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"\x10\x00")
    assert not checkpoint_complete(TrainerCheckpoint(folder, 5))
