"""Identities: a positives table of views and slot-aligned near-identity distractor tables, checked for alignment
(same row position, same id) and assembled into :class:`NearIDData`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .tables import BadDataReport, ImageRef, ImageTable, TableRegistry

__all__ = ["NearIDData", "assemble"]


@dataclass
class NearIDData:
    """Identities with their views and slot-aligned near-identity distractors from one or more settings.

    Attributes:
        name: a label (used in table keys and messages).
        positives: the table of views.
        view_columns: the view columns in slot order (slot ``j`` of every distractor setting shares view ``j``'s
            background).
        distractors: setting name -> distractor table.
        distractor_columns: setting name -> columns in slot order (same length as ``view_columns``).
        view_ok: ``[N, V]`` bool, views present.
        distractor_ok: setting -> ``[N, V]`` bool, distractors present *and* row-aligned (ids match).
        rows: the usable rows (at least 2 views), ascending.
        report: what was skipped and why.
    """

    name: str
    positives: ImageTable
    view_columns: list[str]
    distractors: dict[str, ImageTable]
    distractor_columns: dict[str, list[str]]
    view_ok: np.ndarray
    distractor_ok: dict[str, np.ndarray]
    rows: np.ndarray
    report: BadDataReport = field(default_factory=BadDataReport)

    @property
    def num_views(self) -> int:
        return len(self.view_columns)

    @property
    def settings(self) -> list[str]:
        return list(self.distractors)

    @property
    def ids(self) -> list[Any]:
        if self.positives.ids is not None:
            return list(self.positives.ids)
        return list(range(len(self.positives)))

    def __len__(self) -> int:
        return len(self.positives)

    def registry(self) -> TableRegistry:
        out: TableRegistry = {self.positives.key: self.positives}
        for table in self.distractors.values():
            out[table.key] = table
        return out

    def view_ref(self, row: int, slot: int) -> ImageRef | None:
        if not self.view_ok[row, slot]:
            return None
        return (self.positives.key, int(row), self.view_columns[slot])

    def distractor_ref(self, setting: str, row: int, slot: int) -> ImageRef | None:
        if not self.distractor_ok[setting][row, slot]:
            return None
        return (self.distractors[setting].key, int(row), self.distractor_columns[setting][slot])

    def all_refs(self, rows: Iterable[int], settings: Sequence[str] | None = None) -> list[ImageRef]:
        """Every view and distractor reference of ``rows`` (each once)."""
        settings = self.settings if settings is None else list(settings)
        out: list[ImageRef] = []
        for r in rows:
            for j in range(self.num_views):
                for ref in [self.view_ref(r, j)] + [self.distractor_ref(s, r, j) for s in settings]:
                    if ref is not None:
                        out.append(ref)
        return list(dict.fromkeys(out))

    def eval_refs(
        self, rows: Sequence[int], settings: Sequence[str] | None = None
    ) -> tuple[list[list[ImageRef | None]], dict[str, list[list[ImageRef | None]]]]:
        """Slot-aligned references for evaluation: views ``[N][V]`` and, per setting, distractors ``[N][V]``."""
        settings = self.settings if settings is None else list(settings)
        views = [[self.view_ref(r, j) for j in range(self.num_views)] for r in rows]
        negs = {s: [[self.distractor_ref(s, r, j) for j in range(self.num_views)] for r in rows] for s in settings}
        return views, negs


def _check_alignment(
    positives: ImageTable, table: ImageTable, setting: str, report: BadDataReport
) -> np.ndarray:
    """``[N]`` bool: rows of ``table`` aligned with the positives (same position, same id)."""
    n, m = len(positives), len(table)
    aligned = np.zeros(n, dtype=bool)
    aligned[: min(n, m)] = True
    if n != m:
        if positives.ids is None or table.ids is None:
            raise ValueError(
                f"distractor table {setting!r} has {m} rows but the positives have {n}, and without `id` columns the "
                "row alignment cannot be verified; fix the tables (rows are aligned by position)"
            )
        report.add("tables of different length",
                   f"distractor table {setting!r} has {m} rows, positives {n}; rows without a counterpart are "
                   "used without this distractor")
    if positives.ids is not None and table.ids is not None:
        ours = np.asarray(positives.ids[: min(n, m)], dtype=object)
        theirs = np.asarray(table.ids[: min(n, m)], dtype=object)
        mismatch = np.flatnonzero(ours != theirs)
        if mismatch.size:
            r = int(mismatch[0])
            report.add("mismatched ids",
                       f"distractor table {setting!r} row {r} has id {theirs[r]!r}, positives row {r} has id "
                       f"{ours[r]!r}; such rows are used without this distractor", count=int(mismatch.size))
            aligned[mismatch] = False
    return aligned


def assemble(
    name: str,
    positives: ImageTable,
    view_columns: Sequence[str],
    distractors: Mapping[str, tuple[ImageTable, Sequence[str]]],
    report: BadDataReport,
    *,
    min_views: int = 2,
) -> NearIDData:
    n = len(positives)
    view_ok = np.stack([positives.present(c) for c in view_columns], axis=1) if n else np.zeros((0, len(view_columns)),
                                                                                                 dtype=bool)
    distractor_ok: dict[str, np.ndarray] = {}
    for setting, (table, cols) in distractors.items():
        if len(cols) != len(view_columns):
            raise ValueError(
                f"distractor setting {setting!r} has {len(cols)} columns {list(cols)} but there are "
                f"{len(view_columns)} view columns {list(view_columns)}"
            )
        aligned = _check_alignment(positives, table, setting, report)
        ok = np.zeros((n, len(cols)), dtype=bool)
        m = min(n, len(table))
        for j, col in enumerate(cols):
            ok[:m, j] = table.present(col)[:m]
        ok &= aligned[:, None] & view_ok  # a distractor without its view is useless
        distractor_ok[setting] = ok
    n_views = view_ok.sum(1)
    too_few = np.flatnonzero(n_views < min_views)
    if too_few.size:
        r = int(too_few[0])
        ident = positives.ids[r] if positives.ids is not None else r
        report.add("identities with fewer than 2 views",
                   f"row {r} (id {ident!r}) has {int(n_views[r])} view(s)", count=int(too_few.size))
    rows = np.flatnonzero(n_views >= min_views)
    return NearIDData(
        name=name,
        positives=positives,
        view_columns=list(view_columns),
        distractors={s: t for s, (t, _) in distractors.items()},
        distractor_columns={s: list(c) for s, (_, c) in distractors.items()},
        view_ok=view_ok,
        distractor_ok=distractor_ok,
        rows=rows,
        report=report,
    )
