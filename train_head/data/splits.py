"""Held-out splits by identity and the row-index files that record them (``{"indices": [...]}``)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nearid_reward.files import write_json_atomic

__all__ = ["split_by_identity", "write_index_file", "read_index_file"]


def split_by_identity(
    ids: Sequence[Any], rows: Sequence[int], *, val_fraction: float = 0.0, test_fraction: float = 0.0, seed: int = 0
) -> dict[str, list[int]]:
    """Seeded split of ``rows`` into train / val / test such that all rows of one identity land in one split.

    Args:
        ids: the id of every row of the table.
        rows: the rows to split.
        val_fraction, test_fraction: fractions of *identities* held out.
        seed: split seed.

    Returns:
        ``{"train": rows, "val": rows, "test": rows}`` (sorted).
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction and test_fraction must be in [0, 1) with a sum < 1, got {val_fraction}, "
                         f"{test_fraction}")
    groups: dict[Any, list[int]] = {}
    for r in rows:
        groups.setdefault(ids[int(r)], []).append(int(r))
    keys = list(groups)
    order = np.random.default_rng([seed, 77]).permutation(len(keys))
    n_val = int(round(len(keys) * val_fraction))
    n_test = int(round(len(keys) * test_fraction))
    parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
    return {name: sorted(r for k in idx for r in groups[keys[int(k)]]) for name, idx in parts.items()}


def write_index_file(path: str | os.PathLike[str], indices: Sequence[int], **meta: Any) -> None:
    """Write row indices as ``{"indices": [...], ...meta}`` (atomic; readable by the official evaluation)."""
    write_json_atomic(path, {"indices": [int(i) for i in indices], **meta})


def read_index_file(path: str | os.PathLike[str], *, num_rows: int | None = None) -> list[int]:
    """Read a row-index file: a JSON list or ``{"indices": [...]}``; duplicates and out-of-range rows raise."""
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"could not read index file {file}: {exc}") from exc
    values = data.get("indices") if isinstance(data, dict) else data
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{file} must hold a list of integer row indices or {{\"indices\": [...]}}")
    if len(set(values)) != len(values):
        raise ValueError(f"{file} lists duplicate row indices")
    if num_rows is not None and any(not 0 <= v < num_rows for v in values):
        bad = next(v for v in values if not 0 <= v < num_rows)
        raise ValueError(f"{file} has row index {bad} outside the table's {num_rows} rows")
    return [int(v) for v in values]
