"""The one way commands declare and parse their options: dataclasses through transformers.HfArgumentParser."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
import torch

from nearid_reward.cli.arguments import build_parser, parse_arguments, parse_device, parse_dtype


@dataclass
class Model:
    model: str = field(metadata={"help": "checkpoint folder"})
    dtype: str = field(default="float32", metadata={"help": "backbone dtype"})

    def __post_init__(self) -> None:
        parse_dtype(self.dtype, name="--dtype")


@dataclass
class Run:
    steps: int = field(default=10, metadata={"help": "optimizer steps"})
    mode: Literal["max", "min"] = field(default="max", metadata={"help": "direction"})
    plot: bool = field(default=True, metadata={"help": "draw the plot"})
    seeds: list[int] = field(default_factory=lambda: [0, 1], metadata={"help": "seeds"})


def test_each_dataclass_gets_its_fields_with_their_types_and_defaults():
    model, run = parse_arguments([Model, Run], ["--model", "m", "--steps", "3", "--no_plot", "--seeds", "4", "5",
                                                "--mode", "min"], prog="t")
    assert model == Model(model="m") and run == Run(steps=3, mode="min", plot=False, seeds=[4, 5])
    assert parse_arguments([Model, Run], ["--model", "m"], prog="t")[1] == Run()


def test_help_shows_the_field_help_and_defaults(capsys):
    with pytest.raises(SystemExit) as raised:
        parse_arguments([Model, Run], ["--help"], prog="t")
    assert raised.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out and "checkpoint folder" in out and "(default: 10)" in out and "--debug" in out


def test_unknown_flags_are_an_argparse_error_unless_remaining_words_are_wanted(capsys):
    with pytest.raises(SystemExit) as raised:
        parse_arguments(Model, ["--model", "m", "--bogus", "1"], prog="t")
    assert raised.value.code == 2 and "unrecognized arguments: --bogus 1" in capsys.readouterr().err
    model, rest = parse_arguments(Model, ["--model", "m", "--debug", "--lr", "1e-4"], prog="t", allow_remaining=True)
    assert model.model == "m" and rest == ["--lr", "1e-4"]


def test_a_bad_value_names_the_flag_and_what_came():
    with pytest.raises(ValueError, match=r"--dtype: expected one of .*bf16.*got 'float8'"):
        parse_arguments(Model, ["--model", "m", "--dtype", "float8"], prog="t")
    with pytest.raises(SystemExit):  # a missing required field is argparse's own error
        parse_arguments(Model, [], prog="t")


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                        ("torch.float16", torch.float16), ("fp32", torch.float32),
                                        ("no", torch.float32), (torch.float16, torch.float16)])
def test_parse_dtype_accepts_the_usual_spellings(name, dtype):
    assert parse_dtype(name) is dtype


def test_parse_dtype_and_device_reject_with_the_input_named():
    with pytest.raises(ValueError, match="--nearid_dtype: .*got torch.int8"):
        parse_dtype(torch.int8, name="--nearid_dtype")
    with pytest.raises(ValueError, match="--device: expected a torch device"):
        parse_device("gpu0", name="--device")
    assert parse_device("cpu") == torch.device("cpu")


def test_build_parser_refuses_a_non_dataclass():
    with pytest.raises(TypeError, match="expected dataclass types"):
        build_parser([dict], prog="t")
