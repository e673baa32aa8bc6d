"""The commands' configurations (one dataclass declares each CLI) and the trainer's checkpoint folders."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nearid_reward.files import write_json_atomic
from train_head.checkpointing import (
    TRAINER_STATE,
    checkpoint_folders,
    find_latest_checkpoint,
    prune_checkpoints,
    read_trainer_state,
)
from train_head.config import TrainConfig, build_parser, parse_train_config

REQUIRED = ["--backbone", "b", "--output_dir", "o", "--train_data", "t"]


def test_every_field_is_a_flag_with_help_and_the_defaults_match():
    config = parse_train_config(REQUIRED)
    assert config == TrainConfig(backbone="b", output_dir="o", train_data="t")
    help_text = build_parser().format_help()
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f"{f.name} has no help"
        assert f"--{f.name}" in help_text
    assert "--debug" in help_text


def test_flags_keep_their_spellings_types_and_choices(capsys):
    config = parse_train_config([
        "--pretrained_model_name_or_path", "b", "--output_dir", "o", "--train_data", "t",
        "--distractors", "d1", "d2", "--strict", "--no_feature_cache", "--max_train_steps", "7",
        "--mixed_precision", "bf16", "--view_prefix", "img", "--learning_rate", "3e-4",
    ])
    assert config.backbone == "b" and config.distractors == ["d1", "d2"]
    assert config.strict is True and config.no_feature_cache is True and config.max_train_steps == 7
    assert config.view_prefix == "img" and config.learning_rate == pytest.approx(3e-4)
    assert config.backbone_dtype is torch.bfloat16
    assert TrainConfig(backbone="b", output_dir="o", train_data="t").backbone_dtype is torch.float32
    with pytest.raises(SystemExit) as raised:
        parse_train_config([*REQUIRED, "--lr_scheduler", "step"])
    assert raised.value.code == 2 and "--lr_scheduler" in capsys.readouterr().err


@pytest.mark.parametrize("field,value,message", [
    ("checkpoints_total_limit", 0, "--checkpoints_total_limit must be >= 1"),
    ("mixed_precision", "fp8", "--mixed_precision must be one of"),
    ("data_format", "csv", "--data_format must be"),
    ("val_fraction", 0.5, "do not combine it with --val_data"),
])
def test_validation_names_the_flag_also_when_built_in_python(field, value, message):
    extra = {"val_data": "v"} if field == "val_fraction" else {}
    with pytest.raises(ValueError, match=message):
        TrainConfig(backbone="b", output_dir="o", train_data="t", **{field: value}, **extra)


def _checkpoint(root, name, complete=True):
    folder = root / name
    folder.mkdir(parents=True)
    if complete:
        write_json_atomic(folder / TRAINER_STATE, {"global_step": 0})
    return folder


def test_checkpoint_folders_are_found_by_step_and_pruned_oldest_first(tmp_path):
    assert find_latest_checkpoint(tmp_path / "missing") is None
    for name in ("checkpoint-10", "checkpoint-9", "checkpoint-100"):
        _checkpoint(tmp_path, name)
    _checkpoint(tmp_path, "checkpoint-200", complete=False)  # being written, or killed mid-write
    _checkpoint(tmp_path, "checkpoint-last")
    _checkpoint(tmp_path, ".checkpoint-300.tmp-0000abcd-1-0123abcd")
    assert [s for s, _ in checkpoint_folders(tmp_path)] == [9, 10, 100, 200]
    assert [s for s, _ in checkpoint_folders(tmp_path, complete=True)] == [9, 10, 100]
    assert find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint-100"  # numeric, not by name
    assert read_trainer_state(tmp_path / "checkpoint-100") == {"global_step": 0}
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        read_trainer_state(tmp_path / "checkpoint-200")
    removed = prune_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["checkpoint-9", "checkpoint-10"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "checkpoint-100", "checkpoint-200", "checkpoint-last"]


def test_eval_options_take_every_dtype_spelling_and_name_bad_flags(capsys):
    from nearid_reward.cli.arguments import parse_arguments
    from train_head.eval import EvalOptions, build_parser

    options, = parse_arguments(EvalOptions, ["--model", "m", "--output_dir", "o", "--data", "d", "--distractors",
                                             "a", "b", "--dtype", "bf16", "--pooling", "mean"], prog="nearid-eval")
    assert options.distractors == ["a", "b"] and options.dtype == "bf16" and options.device == "cpu"
    assert all(f.metadata.get("help") for f in dataclasses.fields(EvalOptions))
    assert "--mtg_indices" in build_parser().format_help()
    with pytest.raises(ValueError, match="--dtype: expected one of"):
        EvalOptions(model="m", output_dir="o", data="d", dtype="int8")
    with pytest.raises(ValueError, match="pass --data"):
        EvalOptions(model="m", output_dir="o")
    with pytest.raises(ValueError, match="--batch_size must be >= 1"):
        EvalOptions(model="m", output_dir="o", data="d", batch_size=0)
    with pytest.raises(SystemExit) as raised:
        parse_arguments(EvalOptions, ["--model", "m", "--output_dir", "o", "--pooling", "max"], prog="nearid-eval")
    assert raised.value.code == 2 and "--pooling" in capsys.readouterr().err


def test_make_synthetic_flags_are_the_config_fields(tmp_path):
    from nearid_reward.cli.arguments import parse_arguments
    from train_head.synthetic import MakeSyntheticOptions, SyntheticConfig

    options, config = parse_arguments([MakeSyntheticOptions, SyntheticConfig], [
        "--output_dir", str(tmp_path), "--levels", "part", "colour", "--view_prefix", "images", "--views", "2"],
        prog="nearid-make-synthetic")
    assert options.output_dir == str(tmp_path)
    assert config == SyntheticConfig(levels=("part", "colour"), view_prefix="images", views=2)
    assert config.levels == ["part", "colour"]
    assert all(f.metadata.get("help") for f in dataclasses.fields(SyntheticConfig))
    with pytest.raises(SystemExit):
        parse_arguments([MakeSyntheticOptions, SyntheticConfig], ["--output_dir", "x", "--levels", "texture"],
                        prog="nearid-make-synthetic")
