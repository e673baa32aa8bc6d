"""Training the NearID head: the two-tier objective, NearID / folder / manifest datasets, a multi-GPU trainer with
a feature cache, SSR/PA/MTG evaluation and a synthetic NearID benchmark.

The library (``nearid_reward``) never imports this package; this package builds on it.
Entry points: ``nearid-train-head`` (:mod:`train_head.train`), ``nearid-eval`` (:mod:`train_head.eval`),
``nearid-make-synthetic`` (:mod:`train_head.synthetic`).
"""

from __future__ import annotations

from .losses import cohesion_loss, infonce, nearid_loss, nearid_loss_terms
from .metrics import mtg_metrics, nearid_metrics, pool_metrics

__all__ = [
    "cohesion_loss",
    "infonce",
    "nearid_loss",
    "nearid_loss_terms",
    "mtg_metrics",
    "nearid_metrics",
    "pool_metrics",
]
