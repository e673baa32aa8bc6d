"""What the command-line entry points share: clean exits on expected errors, ``--debug``, and argument types.

An entry point decorated with :func:`entry_point` stops on an expected user error (a missing or unreadable file or
folder, a bad checkpoint, bad data, a bad argument value: ``OSError``, ``ValueError`` and its subclasses such as
``CheckpointError``, ``ImportError`` for a missing optional package) by printing ``<prog>: <message>`` and exiting
with status 1, without a traceback; Ctrl-C prints ``<prog>: interrupted`` and exits with status 130. Any other
exception is taken for a bug and keeps its traceback; ``--debug`` shows the traceback of expected errors too.
Every command registers ``--debug`` with :func:`add_debug_flag`.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence

import torch

__all__ = ["DEBUG_FLAG", "EXPECTED_ERRORS", "INTERRUPTED_STATUS", "add_debug_flag", "entry_point", "torch_device"]

DEBUG_FLAG = "--debug"
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, ImportError)
#: Exit status of a command stopped with Ctrl-C (128 + SIGINT, as a shell reports it).
INTERRUPTED_STATUS = 130

MainFunction = Callable[[Sequence[str] | None], int]


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """Register ``--debug`` (full tracebacks for every error) on a command's parser."""
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="show the full traceback of errors, including expected ones such as a missing file")


def entry_point(prog: str) -> Callable[[MainFunction], MainFunction]:
    """Decorate ``main(argv) -> int`` so that expected errors end the command with ``prog: message`` (status 1).

    ``--debug`` is looked for in ``argv`` (``sys.argv`` when None) before any ``--`` separator, so it works even
    when the error happens while the arguments are being parsed or validated.
    """

    def decorate(main: MainFunction) -> MainFunction:
        @functools.wraps(main)
        def run(argv: Sequence[str] | None = None) -> int:
            words = list(sys.argv[1:] if argv is None else argv)
            ours = words[: words.index("--")] if "--" in words else words
            try:
                return main(argv)
            except KeyboardInterrupt:
                if DEBUG_FLAG in ours:
                    raise
                # what was written is whole: files are renamed into place and history lines appended whole
                print(f"{prog}: interrupted", file=sys.stderr)
                raise SystemExit(INTERRUPTED_STATUS) from None
            except EXPECTED_ERRORS as exc:
                if DEBUG_FLAG in ours:
                    raise
                message = str(exc) or type(exc).__name__
                raise SystemExit(f"{prog}: {message}\n(rerun with {DEBUG_FLAG} for the full traceback)") from None

        return run

    return decorate


def torch_device(value: str) -> torch.device:
    """argparse type of ``--device``: a torch device string that exists on this machine.

    Raises:
        argparse.ArgumentTypeError: not a device string (``gpu0``), or a CUDA/MPS device this machine lacks.
    """
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(
            f"expected a torch device such as cpu, cuda, cuda:1 or mps; got {value!r}"
        ) from exc
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{value!r}: no CUDA device is available here; use cpu")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(
                f"{value!r}: this machine has {count} CUDA device(s), numbered 0 to {count - 1}"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: no MPS device is available here; use cpu")
    return device
