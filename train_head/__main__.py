"""``python -m train_head``: the head trainer (same as ``nearid-train-head``)."""

from __future__ import annotations

from .train import main

if __name__ == "__main__":
    raise SystemExit(main())
