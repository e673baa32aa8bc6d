"""Running ``nearid-dreambooth`` inside the test process (a helper of the launcher tests, not a test module)."""

from __future__ import annotations

from integrations import dreambooth


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so that each hosted run builds its accelerator afresh."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_dreambooth(argv: list[str]) -> None:
    """``nearid-dreambooth argv`` in this process, between two resets of accelerate's state; it must exit 0."""
    reset_accelerate()
    try:
        assert dreambooth.main(argv) == 0
    finally:
        reset_accelerate()
