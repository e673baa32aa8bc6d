"""Command-line arguments declared once, as dataclasses, and parsed by ``transformers.HfArgumentParser``.

Every command of the project describes its options as dataclass fields (the help text in
``field(metadata={"help": ...})``); :func:`parse_arguments` builds the parser from them, adds ``--debug`` (see
:mod:`nearid_reward.cli.entry_points`) and returns the filled dataclasses. Flags are spelled with underscores, like
the field names and the diffusers training scripts (``--output_dir``); a boolean field ``x`` that defaults to true
also gets ``--no_x``. Values a flag's type cannot express (a dtype, a device) are strings checked by
:func:`parse_dtype` and :func:`parse_device`, so a bad value is a ``ValueError`` naming the flag.

Example:
    >>> from dataclasses import dataclass, field
    >>> @dataclass
    ... class Options:
    ...     model: str = field(metadata={"help": "checkpoint folder"})
    ...     batch_size: int = field(default=8, metadata={"help": "images per batch"})
    >>> parse_arguments(Options, ["--model", "ckpt", "--batch_size", "4"], prog="demo")
    (Options(model='ckpt', batch_size=4),)
    >>> parse_dtype("bf16")
    torch.bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..config import DTYPE_NAMES, parse_dtype
from .entry_points import DEBUG_FLAG, add_debug_flag

__all__ = ["DTYPE_NAMES", "build_parser", "parse_arguments", "parse_device", "parse_dtype"]

def parse_device(value: str | torch.device, *, name: str = "device") -> torch.device:
    """The torch device that ``value`` names, checked to exist on this machine.

    Raises:
        ValueError: naming ``name``: not a device string (``gpu0``), or a CUDA/MPS device this machine lacks.
    """
    from .entry_points import torch_device

    try:
        return torch_device(str(value))
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"{name}: {exc}") from None


def build_parser(dataclass_types: type | Iterable[type], *, prog: str, description: str | None = None,
                 epilog: str | None = None) -> Any:
    """An ``HfArgumentParser`` over ``dataclass_types``, with ``--debug``; defaults shown in ``--help``."""
    from transformers import HfArgumentParser

    types = [dataclass_types] if isinstance(dataclass_types, type) else list(dataclass_types)
    for cls in types:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"build_parser: expected dataclass types, got {cls!r}")
    parser = HfArgumentParser(types, prog=prog, description=description, epilog=epilog,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_debug_flag(parser)
    return parser


def parse_arguments(dataclass_types: type | Iterable[type], argv: Sequence[str] | None = None, *, prog: str,
                    description: str | None = None, epilog: str | None = None,
                    allow_remaining: bool = False) -> tuple[Any, ...]:
    """Parse ``argv`` (``sys.argv[1:]`` when None) into one instance per dataclass type, in order.

    With ``allow_remaining`` the words no dataclass knows are returned last, as a list (for a launcher that passes
    them on to another script); otherwise they are an error, as in argparse (exit status 2 with the usage line).
    ``--debug`` is consumed here; :func:`~nearid_reward.cli.entry_points.entry_point` reads it from ``argv``.
    """
    parser = build_parser(dataclass_types, prog=prog, description=description, epilog=epilog)
    namespace, remaining = parser.parse_known_args(None if argv is None else list(argv))
    if remaining and not allow_remaining:
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    outputs: list[Any] = []
    for cls in parser.dataclass_types:
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        outputs.append(cls(**{k: v for k, v in vars(namespace).items() if k in names}))
    debug_dest = DEBUG_FLAG.lstrip("-")
    extra = set(vars(namespace)) - {debug_dest} - {n for o in outputs for n in (f.name for f in dataclasses.fields(o))}
    if extra:  # pragma: no cover - a parser argument outside every dataclass is a bug in the command
        raise RuntimeError(f"{prog}: arguments outside the dataclasses: {sorted(extra)}")
    return (*outputs, remaining) if allow_remaining else tuple(outputs)
