"""Command-line flags from the world's config dataclasses: one flag per field, named as the field."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["add_config_arguments", "config_from_args"]


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """Add ``--<field>`` for every field of ``config_class`` (defaults from the class; tuples take N integers)."""
    for f in dataclasses.fields(config_class):
        default = f.default
        if isinstance(default, tuple):
            parser.add_argument(f"--{f.name}", type=int, nargs=len(default), default=list(default))
        elif isinstance(default, bool):
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(f"--{f.name}", type=type(default), default=default)


def config_from_args(config_class: type[T], args: argparse.Namespace) -> T:
    """The ``config_class`` instance that the parsed ``args`` describe."""
    values: dict[str, Any] = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class)}
    return config_class(**values)
