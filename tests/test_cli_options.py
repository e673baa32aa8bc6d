"""Every command declares its options once, as dataclasses parsed by ``HfArgumentParser``: the console scripts' help,
underscore flags, and the flags and defaults each command had before (written out here by hand)."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from integrations import dreambooth, reward_server
from nearid_reward.cli import score, select
from nearid_reward.cli.arguments import build_parser, parse_arguments
from nearid_world import encoder, oracle, world_model

ROOT = Path(__file__).resolve().parents[1]


def _console_scripts() -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml: name -> ``module:function``."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same table, from the installed distribution
        from importlib.metadata import distribution

        entry_points = distribution("nearid-reward").entry_points
        return {ep.name: ep.value for ep in entry_points if ep.group == "console_scripts"}
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


SCRIPTS = _console_scripts()


def _usage(text: str) -> str:
    """The usage paragraph of a ``--help`` text."""
    return text.split("\n\n")[0]


def _flags(usage: str) -> set[str]:
    return set(re.findall(r"--[A-Za-z0-9_-]+", usage))


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_console_script_has_help_with_underscore_flags(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    module_name, function_name = SCRIPTS[name].split(":")
    main = getattr(importlib.import_module(module_name), function_name)
    with pytest.raises(SystemExit) as raised:
        main(["--help"])
    assert raised.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {name} ")
    flags = _flags(_usage(out))
    assert "--debug" in flags and len(flags) > 2
    assert [f for f in flags if "-" in f[2:]] == []  # hyphen spellings are only HfArgumentParser's aliases


def _load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (once), leaving ``sys.path`` and the environment as they were."""
    module_name = f"nearid_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    path, environ = list(sys.path), dict(os.environ)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    finally:
        sys.path[:] = path
        os.environ.clear()
        os.environ.update(environ)
    return module


def _values(parsed: Sequence[Any]) -> dict[str, Any]:
    """Every field of the parsed dataclasses, by name (each one a flag)."""
    values: dict[str, Any] = {}
    for options in parsed:
        values |= dataclasses.asdict(options)
    return values


# command -> (parse argv into its dataclasses, the required flags, every value the previous argparse code gave when
# only the required flags came). The keys are the flag names without "--".
SELECT_REQUIRED = ["--output_dir", "o", "--pretrained_model_name_or_path", "p", "--nearid_model", "m",
                   "--nearid_reference_dir", "r"]
DREAMBOOTH_REQUIRED = ["--script", "s.py", "--nearid_model", "m", "--nearid_reference_dir", "r"]
TRAIN_REQUIRED = ["--pretrained_model_name_or_path", "p", "--nearid_model", "m", "--reference_dir", "r"]
HOSTED_REQUIRED = ["--pretrained_model_name_or_path", "p", "--instance_data_dir", "i", "--instance_prompt", "a dog"]
CUSTOM_REQUIRED = ["--pretrained_model_name_or_path", "p", "--nearid_model", "m", "--instance_data_dir", "i"]


def _examples() -> dict[str, Callable[[list[str]], tuple[Any, ...]]]:
    train = _load_example("train_lora_identity_reward")
    custom = _load_example("custom_loop_callback")
    demo = _load_example("demo")
    hosted = _load_example("dreambooth_lora_minimal")
    return {
        "train_lora_identity_reward": lambda argv: (train.parse_args(argv),),
        "custom_loop_callback": lambda argv: parse_arguments(custom.LoopArguments, argv, prog="custom"),
        "demo": lambda argv: parse_arguments(demo.DemoArguments, argv, prog="demo"),
        "dreambooth_lora_minimal": lambda argv: (hosted.parse_args(argv),),
    }


EXPECTED: dict[str, tuple[list[str], dict[str, Any]]] = {
    "nearid-score": (["--model", "m", "--references", "r", "--images", "i"], {
        "model": "m", "references": ["r"], "images": ["i"], "aggregate": "mean", "batch_size": 32, "device": "cpu",
        "dtype": "float32", "json": False,
    }),
    "nearid-select": (SELECT_REQUIRED, {
        "output_dir": "o", "pretrained_model_name_or_path": "p", "nearid_model": "m", "nearid_reference_dir": ["r"],
        "instance_token": "sks", "class_noun": "", "prompts": None, "checkpoints": None, "num_inference_steps": 25,
        "guidance_scale": None, "resolution": None, "images_per_prompt": 1, "seed_offset": 10**8,
        "render_batch_size": 4, "scheduler": None, "no_class_prompts": False, "no_base": False, "aggregate": "mean",
        "monitor": "identity_mean", "mode": "max", "copy_guard": None, "hotswap": False, "no_cache": False,
        "skip_invalid": False,
        "no_plot": False, "copy_winner": False, "link_winner": False, "winner_dir": None, "device": None,
        "dtype": "float32", "nearid_dtype": "float32", "json": False, "verbose": False,
    }),
    "nearid-dreambooth": (DREAMBOOTH_REQUIRED, {
        "script": "s.py", "nearid_model": "m", "nearid_reference_dir": "r", "nearid_negative_dir": None,
        "nearid_prompts": None, "nearid_instance_token": None, "nearid_class_noun": None,
        "nearid_num_inference_steps": 25, "nearid_guidance_scale": None, "nearid_images_per_prompt": 1,
        "nearid_resolution": None, "nearid_scheduler": "auto", "nearid_no_base": False,
        "nearid_no_score_checkpoints": False, "nearid_monitor": "identity_mean", "nearid_mode": "max",
        "nearid_patience": None, "nearid_threshold": 0.9, "nearid_copy_guard": None, "nearid_select_after": False,
        "nearid_loss_weight": 0.0,
        "nearid_loss_max_timestep": 400, "nearid_dtype": "float32", "nearid_strict": False,
    }),
    "nearid-reward-server": (["--nearid_model", "m"], {
        "nearid_model": "m", "nearid_reference_dir": None, "nearid_negative_dir": None, "aggregate": "mean",
        "kind": "cosine", "negative_weight": 1.0, "host": "127.0.0.1", "port": 8765, "token": None,
        "max_request_bytes": 256 * 2**20, "max_image_pixels": 2048 * 2048, "max_batch": 64, "max_references": 256,
        "device": "cpu", "dtype": "float32", "log_level": "info",
    }),
    "nearid-make-world": (["--output_dir", "o"], {
        "output_dir": "o", "threads": None, "snapshot_every": 0, "checkpoint_every": 250, "resume": False,
        "keep_checkpoints": False, "eval_every": 0, "eval_count": 96, "eval_oracle": None, "device": "cpu",
        "image_size": 32, "num_images": 24000,
        "held_out": 48, "vae_steps": 1500, "vae_batch_size": 32, "vae_learning_rate": 2e-3, "unet_steps": 6000,
        "stop_after": 0, "batch_size": 48, "learning_rate": 1e-3, "warmup_steps": 100, "ema_decay": 0.995,
        "keep_attribute": 0.75, "keep_context": 0.85, "empty_caption": 0.1, "unet_channels": [48, 96],
        "attention_at_full_resolution": False, "prediction_type": "v_prediction", "snr_gamma": 5.0,
        "text_width": 64, "seed": 0,
    }),
    "nearid_world.oracle": (["--output_dir", "o"], {
        "output_dir": "o", "image_size": 32, "width": 16, "num_images": 30000, "num_val_images": 2000,
        "steps": 2500, "batch_size": 64, "learning_rate": 2e-3, "seed": 0,
    }),
    "nearid_world.encoder": (["--output_dir", "o"], {
        "output_dir": "o", "work_dir": None, "num_identities": 2000, "image_size": 32, "patch_size": 4,
        "hidden_size": 128, "num_layers": 2, "backbone_steps": 2000, "backbone_images": 8000, "head_steps": 600,
        "batch_size": 128, "learning_rate": 3e-3, "temperature": 0.1, "alpha": 0.0, "held_out": 48, "seed": 0,
        "head_name": None, "leave_out": [],
    }),
    "train_lora_identity_reward": (TRAIN_REQUIRED, {
        "pretrained_model_name_or_path": "p", "nearid_model": "m", "reference_dir": "r", "negative_dir": None,
        "negative_weight": 1.0, "nearid_pooling": "head", "instance_token": "sks", "class_noun": "", "prompts": None,
        "output_dir": "identity-reward-lora", "mode": "draft", "backprop_num_steps": 1, "backprop_strategy": "tail",
        "refl_range": [0.7, 0.95], "rwr_temperature": 1.0, "num_inference_steps": 20, "guidance_scale": 1.0,
        "resolution": None, "train_batch_size": 2, "max_train_steps": 200, "learning_rate": 1e-4, "rank": 4,
        "init_lora": None, "lora_target_modules": ["to_k", "to_q", "to_v", "to_out.0"], "max_grad_norm": 1.0,
        "gradient_checkpointing": False, "class_data_dir": None, "prior_type": "kl", "prior_reference": "base",
        "prior_loss_weight": 1.0, "checkpointing_steps": 100, "validation_steps": 100,
        "validation_inference_steps": 20, "mixed_precision": "no", "report_to": None, "seed": 0,
    }),
    "custom_loop_callback": (CUSTOM_REQUIRED, {
        "pretrained_model_name_or_path": "p", "nearid_model": "m", "instance_data_dir": "i",
        "instance_prompt": "a photo of sks dog", "output_dir": "custom-loop-out", "max_train_steps": 100,
        "validation_steps": 25, "identity_loss_weight": 0.0, "resolution": None, "prompts": None,
        "validation_inference_steps": 25,
    }),
    "demo": ([], {"out": "demo_out", "fresh": False}),
    "dreambooth_lora_minimal": (HOSTED_REQUIRED, {
        "pretrained_model_name_or_path": "p", "instance_data_dir": "i", "instance_prompt": "a dog",
        "class_data_dir": None, "class_prompt": None, "with_prior_preservation": False, "prior_loss_weight": 1.0,
        "validation_prompt": None, "num_validation_images": 2, "validation_epochs": 1,
        "output_dir": "lora-dreambooth-model", "seed": None, "resolution": 64, "image_interpolation_mode": "bilinear",
        "train_batch_size": 1, "num_train_epochs": 1, "max_train_steps": None, "checkpointing_steps": 500,
        "checkpoints_total_limit": None, "resume_from_checkpoint": None, "learning_rate": 1e-4, "rank": 4,
        "report_to": "tensorboard", "logging_dir": "logs", "mixed_precision": "no",
    }),
}


@pytest.fixture(scope="module")
def parsers() -> dict[str, Callable[[list[str]], tuple[Any, ...]]]:
    return {
        "nearid-score": lambda argv: (score.parse_args(argv),),
        "nearid-select": lambda argv: (select.parse_args(argv),),
        "nearid-dreambooth": lambda argv: (dreambooth.parse_options(argv),),
        "nearid-reward-server": lambda argv: (reward_server.parse_args(argv),),
        "nearid-make-world": world_model.parse_args,
        "nearid_world.oracle": oracle.parse_args,
        "nearid_world.encoder": encoder.parse_args,
        **_examples(),
    }


@pytest.mark.parametrize("command", sorted(EXPECTED))
def test_each_command_keeps_its_flags_and_defaults(
    command: str, parsers: dict[str, Callable[[list[str]], tuple[Any, ...]]]
) -> None:
    required, expected = EXPECTED[command]
    assert _values(parsers[command](required)) == expected


@pytest.mark.parametrize("command", sorted(EXPECTED))
def test_each_command_needs_its_required_flags(
    command: str, parsers: dict[str, Callable[[list[str]], tuple[Any, ...]]], capsys: pytest.CaptureFixture[str]
) -> None:
    required, _ = EXPECTED[command]
    for i in range(0, len(required), 2):
        with pytest.raises(SystemExit) as raised:
            parsers[command](required[:i] + required[i + 2:])
        assert raised.value.code == 2 and f"{required[i]}" in capsys.readouterr().err


def test_switches_and_lists_parse_as_the_argparse_flags_did(
    parsers: dict[str, Callable[[list[str]], tuple[Any, ...]]]
) -> None:
    (args,) = parsers["nearid-select"]([*SELECT_REQUIRED[:-1], "r1", "r2", "--no_base", "--hotswap", "--json",
                                        "--checkpoints", "checkpoint-2", "checkpoint-4", "--guidance_scale", "3.5"])
    assert args.nearid_reference_dir == ["r1", "r2"] and args.no_base and args.hotswap and args.json
    assert args.checkpoints == ["checkpoint-2", "checkpoint-4"] and args.guidance_scale == 3.5
    config = args.selection_config()
    assert config.render.render_base is False and config.render.render_class is True and config.hotswap
    (options,) = parsers["nearid-dreambooth"]([*DREAMBOOTH_REQUIRED, "--nearid_no_base", "--nearid_strict",
                                               "--nearid_scheduler", "pipeline", "--nearid_patience", "3"])
    assert options.nearid_no_base and options.nearid_strict and options.nearid_patience == 3
    assert options.render_scheduler is None
    (train,) = parsers["train_lora_identity_reward"]([*TRAIN_REQUIRED, "--refl_range", "0.5", "0.6",
                                                      "--init_lora", "x", "--gradient_checkpointing"])
    assert train.refl_range == [0.5, 0.6] and train.prior_reference == "init" and train.gradient_checkpointing
    _, world = parsers["nearid-make-world"](["--output_dir", "o", "--unet_channels", "16", "32"])
    assert world.unet_channels == [16, 32]


def test_old_spellings_still_work() -> None:
    """The aliases the argparse parsers had, and the hyphen spellings HfArgumentParser adds to underscore flags."""
    argv = ["--model", "m", "--references", "r", "--images", "i", "--batch-size", "4"]
    assert score.parse_args(argv).batch_size == 4
    args = select.parse_args(["--output-dir", "o", "--pipeline", "p", "--model", "m", "--references", "r"])
    assert (args.output_dir, args.pretrained_model_name_or_path, args.nearid_model, args.nearid_reference_dir) == (
        "o", "p", "m", ["r"])


def test_bad_values_name_the_flag() -> None:
    with pytest.raises(ValueError, match="--batch_size must be >= 1, got 0"):
        score.parse_args(["--model", "m", "--references", "r", "--images", "i", "--batch_size", "0"])
    with pytest.raises(ValueError, match="--dtype: expected one of .*got 'float8'"):
        select.parse_args([*SELECT_REQUIRED, "--dtype", "float8"])
    with pytest.raises(ValueError, match="--copy_winner and --link_winner are exclusive"):
        select.parse_args([*SELECT_REQUIRED, "--copy_winner", "--link_winner"])
    with pytest.raises(ValueError, match="--nearid_dtype: expected one of"):
        dreambooth.parse_options([*DREAMBOOTH_REQUIRED, "--nearid_dtype", "int8"])
    with pytest.raises(ValueError, match="--nearid_loss_weight must be >= 0"):
        dreambooth.parse_options([*DREAMBOOTH_REQUIRED, "--nearid_loss_weight", "-1"])
    with pytest.raises(ValueError, match="unet_channels must be two block widths"):
        world_model.parse_args(["--output_dir", "o", "--unet_channels", "16"])


def test_the_launcher_passes_every_other_word_to_the_script() -> None:
    options, theirs = dreambooth.parse_command_line([
        "--script", "s.py", "--instance_prompt", "a photo of sks dog", "--nearid_model", "m", "--resolution", "64",
        "--nearid_reference_dir", "r", "--with_prior_preservation", "--", "--seed", "0", "--nearid_model", "theirs",
    ])
    assert (options.script, options.nearid_model, options.nearid_reference_dir) == ("s.py", "m", "r")
    assert theirs == ["--instance_prompt", "a photo of sks dog", "--resolution", "64", "--with_prior_preservation",
                      "--seed", "0", "--nearid_model", "theirs"]


@pytest.mark.parametrize("command,config", [("world_model", "world_model_config.json"),
                                            ("oracle", "oracle_config.json"), ("nearid", "encoder_config.json")])
def test_the_shipped_world_models_were_made_with_the_default_flags(command: str, config: str) -> None:
    """Their documented commands give only --output_dir, --seed 0 (and --threads): every other value is a default."""
    parse = {"world_model": world_model.parse_args, "oracle": oracle.parse_args, "nearid": encoder.parse_args}[command]
    _, defaults = parse(["--output_dir", "o"])
    shipped = json.loads((ROOT / "nearid_world" / "weights" / command / config).read_text())["config"]
    assert shipped == dataclasses.asdict(defaults)


def test_example_help_shows_underscore_flags_only(capsys: pytest.CaptureFixture[str]) -> None:
    examples = {"train_lora_identity_reward": ("TrainArguments",), "custom_loop_callback": ("LoopArguments",),
                "demo": ("DemoArguments",), "dreambooth_lora_minimal": ("DreamBoothArguments",)}
    for name, classes in examples.items():
        module = _load_example(name)
        parser = build_parser([getattr(module, c) for c in classes], prog=name)
        usage = _usage(parser.format_help())
        flags = _flags(usage)
        assert len(flags) > 2 and [f for f in flags if "-" in f[2:]] == [], name


def test_a_misspelt_launcher_flag_is_refused_with_a_hint() -> None:
    hint = r"unknown NearID option\(s\): --nearid_modle \(did you mean .*--nearid_model\b"
    with pytest.raises(ValueError, match=hint):
        dreambooth.parse_command_line(["--script", "s.py", "--nearid_model", "m", "--nearid_reference_dir", "r",
                                       "--nearid_modle", "x", "--", "--seed", "0"])


def test_samples_and_prompts_help_list_their_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from nearid_reward.cli import prompts, samples

    wanted = {
        samples.main: {"--trainer", "--samples_dir", "--checkpoints_dir", "--nearid_model", "--nearid_reference_dir",
                       "--output_dir", "--copy_winner", "--watch", "--until_file", "--poll_interval", "--json",
                       "--class_prompt_start"},
        prompts.main: {"--format", "--output", "--instance_token", "--class_noun", "--seed", "--width", "--height",
                       "--steps", "--guidance_scale"},
    }
    for main, flags in wanted.items():
        with pytest.raises(SystemExit) as raised:
            main(["--help"])
        assert raised.value.code == 0
        out = capsys.readouterr().out
        assert flags <= _flags(_usage(out)), flags - _flags(_usage(out))
        if main is samples.main:
            assert "{auto,kohya,ai-toolkit,simpletuner,onetrainer,diffusers}" in out
