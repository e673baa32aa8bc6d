"""Training samples: per-epoch items (anchor shuffle, per-slot distractor sources) drawn deterministically from
``(seed, epoch, index)``, and the epoch-seeded sampler that orders them identically on every process and on resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .identities import NearIDData
from .tables import ImageRef, TableRegistry

__all__ = ["NearIDTrainDataset", "EpochShuffleSampler"]


class NearIDTrainDataset(torch.utils.data.Dataset):
    """Per-epoch training samples over one or more sources (NearID data, MTG pairs repeated, ...).

    Item ``i`` of epoch ``e`` is an identity row with (deterministically, from ``(seed, e, i)``):

    * its valid views shuffled (anchor = slot 0 after the shuffle; missing slots at the end);
    * for each view slot, one distractor drawn from the settings that have one for that slot, with a generator
      keyed by ``(seed, e, i, slot)``; the distractors follow the views' permutation, so distractor slot 0 shares
      the anchor's background.

    Items are dicts ``{"refs": 2V references (V views then V distractors; None = empty slot), "index", "epoch"}``;
    the collate functions of :mod:`train_head.cache` turn them into pixels or cached tokens.

    Args:
        sources: ``(data, rows)`` pairs; a source listed twice is repeated.
        seed: data seed.
        num_views: slots V per item (default: the most views of any source).
        settings: per source, the distractor settings to draw from (default: all of that source's settings).
        shuffle_anchor: shuffle the views (off: slot order).
    """

    def __init__(
        self,
        sources: Sequence[tuple[NearIDData, Sequence[int]]],
        *,
        seed: int = 0,
        num_views: int | None = None,
        settings: Sequence[Sequence[str] | None] | None = None,
        shuffle_anchor: bool = True,
    ) -> None:
        if not sources:
            raise ValueError("`sources` is empty: pass at least one (data, rows) pair")
        self.sources = [data for data, _ in sources]
        self.items: list[tuple[int, int]] = [(k, int(r)) for k, (_, rows) in enumerate(sources) for r in rows]
        if not self.items:
            raise ValueError("the training sources have no usable rows")
        self.num_views = num_views or max(d.num_views for d in self.sources)
        for d in self.sources:
            if d.num_views > self.num_views:
                raise ValueError(f"source {d.name!r} has {d.num_views} views, more than num_views={self.num_views}")
        self.settings = [
            list(d.settings) if settings is None or settings[k] is None else list(settings[k])  # type: ignore[arg-type]
            for k, d in enumerate(self.sources)
        ]
        for k, d in enumerate(self.sources):
            unknown = [s for s in self.settings[k] if s not in d.distractors]
            if unknown:
                raise ValueError(f"source {d.name!r} has no distractor settings {unknown}; it has {d.settings}")
        self.seed = int(seed)
        self.shuffle_anchor = shuffle_anchor
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def registry(self) -> TableRegistry:
        out: TableRegistry = {}
        for d in self.sources:
            out.update(d.registry())
        return out

    def sample(self, index: int, epoch: int) -> dict[str, Any]:
        k, row = self.items[index]
        data = self.sources[k]
        valid = [j for j in range(data.num_views) if data.view_ok[row, j]]
        if self.shuffle_anchor:
            perm = np.random.default_rng([self.seed, epoch, index, 424242]).permutation(len(valid))
            valid = [valid[int(p)] for p in perm]
        negs: dict[int, ImageRef | None] = {}
        for j in range(data.num_views):
            choices = [s for s in self.settings[k] if data.distractor_ok[s][row, j]]
            if not choices:
                negs[j] = None
                continue
            pick = choices[int(np.random.default_rng([self.seed, epoch, index, 200003, j]).integers(len(choices)))]
            negs[j] = data.distractor_ref(pick, row, j)
        pad = self.num_views - len(valid)
        views: list[ImageRef | None] = [data.view_ref(row, j) for j in valid] + [None] * pad
        distractors = [negs[j] for j in valid] + [None] * pad
        return {"refs": views + distractors, "index": index, "epoch": epoch}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.sample(index, self.epoch)

    def all_refs(self) -> list[ImageRef]:
        """Every image any epoch can use (all views and all distractors of the chosen settings)."""
        out: list[ImageRef] = []
        for k, data in enumerate(self.sources):
            rows = sorted({r for kk, r in self.items if kk == k})
            out.extend(data.all_refs(rows, self.settings[k]))
        return list(dict.fromkeys(out))


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A permutation of ``range(n)`` drawn from ``(seed, epoch)``: identical on every process and on resume."""

    def __init__(self, n: int, *, seed: int = 0, shuffle: bool = True) -> None:
        self.n = int(n)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):  # type: ignore[no-untyped-def]
        if not self.shuffle:
            return iter(range(self.n))
        return iter(np.random.default_rng([self.seed, self.epoch, 99]).permutation(self.n).tolist())
