"""The overfitting arm: one-room training photos, DreamBooth run well past its best, prompts for other places.

Users often photograph a subject in one place; DreamBooth then learns the place with the subject, and past some
point samples copy the training background and ignore the prompt. This arm builds that case in the generation world
and asks which checkpoint each selector picks. For one development or benchmark subject:

1. the subject's three training views share one context (:func:`nearid_world.evaluate.make_subject` with
   ``single_context=True``); DreamBooth-LoRA runs through ``nearid-dreambooth`` hosting
   ``examples/dreambooth_lora_minimal.py`` (:func:`nearid_world.personalise.dreambooth`) for :data:`STEPS` steps
   at learning rate :data:`LEARNING_RATE`, with a checkpoint every :data:`CHECKPOINTING_STEPS`;
2. the **truth set** asks for the subject in the three *other* contexts ("a sks object on the <context>",
   ``per_context`` seeds each, seeds from 10^8) and is read by the oracle: true identity, prompt fidelity, copy rate
   (the oracle reads the training context instead of the prompted one) and **useful identity**
   (:func:`useful_identity`: per sample, its true identity when the oracle reads the prompted context, else 0;
   averaged over the samples);
3. the **selection set** is what a user's run scores: the world's validation prompts (all four contexts, the
   training one included, as in ``nearid_world/prompts.json``), ``per_context`` seeds each, from other seeds
   (3 x 10^8); it is scored by the NearID, frozen-head and mean-pool scorers and by the library's
   :class:`~nearid_reward.IdentityValidator` with ``copy_guard`` (the context-copy signal,
   ``context_copy_fraction``) and ``copy_fraction`` (the reference-to-reference band in NearID space);
4. each selector's pick on the selection set and its **regret**: the best checkpoint's useful identity minus the
   pick's, on the truth set. Selectors: NearID, frozen head, mean pool (highest mean score), ``last`` (the final
   checkpoint) and ``copy_guard`` (:func:`nearid_reward.selection.copy_guarded_order`: the highest NearID score
   among checkpoints whose ``context_copy_fraction`` is at most :data:`COPY_GUARD`).

Settings and why (chosen on development subjects 40-43 only; the benchmark subjects were never run with this arm):

* first try: the main arm's learning rate 2e-3 for 1200 steps. The run overfits hard but too early: on subject 40
  useful identity peaked at the first checkpoint (0.42 at step 100) and the copy rate reached 0.33 by step 200 and
  0.83 by the end, so no selector could land closer to the peak than one checkpoint's spacing. The arm therefore
  uses :data:`LEARNING_RATE` 1e-3 (the same 1200 steps, :data:`STEPS`; a checkpoint every 100,
  :data:`CHECKPOINTING_STEPS`), which slows learning and copying alike: on subjects 40-43 useful identity peaks at
  steps 200-400 and falls by 0.32 on average by step 1200;
* the copy signal: with the references' own band as the bar, no generated sample of subject 40 ever counted as a
  copy (``context_copy_fraction`` 0 at every checkpoint; generated images stay 0.11-0.53 below the band of real
  photos of one place), and today's ``copy_fraction`` (NearID space) flagged at most 1 of 16 samples. With the bar
  0.2 below the band (``ValidationConfig.context_margin``, default 0.2, chosen on subject 40 at 2e-3) the signal
  rises with the copy rate;
* :data:`COPY_GUARD` 0.4 (more than 6 of the 16 selection renders copy), chosen on subjects 40-43 at 1e-3 from
  guards 0.3-0.6 and margins 0.15-0.25: regret 0.037 at 0.4 but 0.17 at 0.5 (the fraction moves in steps of 1/16
  and the good checkpoints sit at 0.25-0.38, a quarter of the set asking for the training place itself). The
  choice is in-sample and sits close to a cliff; the benchmark subjects are its first independent test.
Command (one subject after another; the work folder keeps finished runs, so a rerun only re-measures)::

    python -m nearid_world.overfit --first_subject 40 --subjects 2 --json out.json
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nearid_reward import IdentityValidator, NearIDModel
from nearid_reward.cli.arguments import parse_arguments
from nearid_reward.cli.entry_points import entry_point
from nearid_reward.files import atomic_write, write_json_atomic
from nearid_reward.rendering import RenderConfig, render_images
from nearid_reward.run_checkpoints import LORA_WEIGHT_NAME, find_checkpoints
from nearid_reward.selection import copy_guarded_order

from . import scenes
from .evaluate import EvalSet, Scorers, Subject, WorldAssets, load_world_pipeline, make_subject
from .oracle import AttributeOracle, true_identity
from .personalise import PersonaliseConfig, dreambooth, save_grid, spearman
from .stats import bootstrap_mean, nanmean

logger = logging.getLogger(__name__)

__all__ = [
    "STEPS", "LEARNING_RATE", "CHECKPOINTING_STEPS", "COPY_GUARD", "SELECTORS", "useful_identity", "selector_picks",
    "overfit_dreambooth", "run_overfit_subject", "summarise_overfit", "OverfitArguments", "main",
]  # fmt: skip

STEPS = 1200
"""DreamBooth steps of the arm (three times the main arm's 400)."""
LEARNING_RATE = 1e-3
"""DreamBooth learning rate (half the main arm's; see the module docstring)."""
CHECKPOINTING_STEPS = 100
"""A checkpoint every this many steps (12 checkpoints)."""
COPY_GUARD = 0.4
"""Threshold of the copy guard on ``context_copy_fraction`` (a checkpoint above it is skipped; see the docstring)."""
SELECTORS: tuple[str, ...] = ("nearid", "frozen", "meanpool", "last", "copy_guard")
TRUTH_SEED_OFFSET = 10**8
SELECTION_SEED_OFFSET = 3 * 10**8


def useful_identity(truth: list[float], shown: list[str], prompted: list[str]) -> float:
    """Useful identity of a set of samples, in [0, 1]: the mean over samples of the sample's true identity when the
    oracle reads the prompted context in it, and 0 when it does not (a copy of the training place, or any other
    place, is worth nothing to a user who asked for this one).

    Args:
        truth: per sample, the true identity (:func:`nearid_world.oracle.true_identity`), in [0, 1].
        shown: per sample, the context the oracle reads.
        prompted: per sample, the context the prompt asked for.

    Example:
        >>> useful_identity([1.0, 0.6, 0.8], ["snow", "beach", "night"], ["snow", "night", "night"])
        0.6
    """
    if not len(truth) == len(shown) == len(prompted) or not truth:
        raise ValueError(f"useful_identity needs equally many (>= 1) truths, shown and prompted contexts, got "
                         f"{len(truth)}, {len(shown)} and {len(prompted)}")
    return float(np.mean([t if s == p else 0.0 for t, s, p in zip(truth, shown, prompted)]))


def selector_picks(rows: list[dict[str, Any]], *, guard: float = COPY_GUARD) -> dict[str, int]:
    """The checkpoint (index into ``rows``) each selector of :data:`SELECTORS` picks from the selection-set scores.

    ``rows[i]["selection"]`` holds checkpoint ``i``'s mean scores (``nearid``, ``frozen``, ``meanpool``), the
    validator's ``identity_mean`` and ``context_copy_fraction``; rows are in step order. NearID, frozen and mean
    pool take their highest score (the earliest on ties), ``last`` the final checkpoint, ``copy_guard`` the first
    of :func:`nearid_reward.selection.copy_guarded_order` on ``identity_mean`` with threshold ``guard``.
    """
    picks = {kind: int(np.argmax([r["selection"][kind] for r in rows])) for kind in ("nearid", "frozen", "meanpool")}
    picks["last"] = len(rows) - 1
    guarded = [{"step": i, **r["selection"]} for i, r in enumerate(rows)]
    picks["copy_guard"] = copy_guarded_order(guarded, monitor="identity_mean", mode="max", threshold=guard)[0]
    return picks


def overfit_dreambooth(args: PersonaliseConfig, assets: WorldAssets, subject: Subject, folder: Path, *,
                       steps: int = STEPS, checkpointing_steps: int = CHECKPOINTING_STEPS,
                       learning_rate: float = LEARNING_RATE) -> Path:
    """DreamBooth-LoRA of the arm (``nearid_world.personalise.dreambooth`` with the arm's length and rate)."""
    run_args = dataclasses.replace(args, steps=steps, checkpointing_steps=checkpointing_steps,
                                   learning_rate=learning_rate)
    return dreambooth(run_args, assets, subject, folder)


def _render(pipe: Any, lora: Path | None, prompt_set: EvalSet, config: RenderConfig, cache: Path) -> torch.Tensor:
    """Render a set with ``lora`` loaded (cached as uint8 in ``cache``): float ``[N, 3, H, W]`` in [0, 1]."""
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved["seeds"] == prompt_set.seeds() and saved["prompts"] == prompt_set.prompts():
            return saved["images"].float() / 255
    if lora is not None:
        pipe.load_lora_weights(str(lora), weight_name=LORA_WEIGHT_NAME, adapter_name="overfit")
    try:
        images = render_images(pipe, prompt_set.prompts(), seeds=prompt_set.seeds(), config=config)
    finally:
        if lora is not None:
            pipe.delete_adapters("overfit")
    quantised = (images * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    with atomic_write(cache, "wb") as handle:
        torch.save({"images": quantised, "seeds": prompt_set.seeds(), "prompts": prompt_set.prompts()}, handle)
    return quantised.float() / 255


def _truth_figures(images: torch.Tensor, prompt_set: EvalSet, subject: Subject, oracle: AttributeOracle
                   ) -> dict[str, Any]:
    predicted = oracle.predict(images)
    prompted = prompt_set.prompted_contexts()
    shown = [p["context"] for p in predicted]
    truth = [true_identity(p, subject.identity) for p in predicted]
    trained = subject.contexts[0]
    return {
        "truth": float(np.mean(truth)),
        "prompt_fidelity": float(np.mean([s == c for s, c in zip(shown, prompted)])),
        "copy_rate": float(np.mean([s == trained != c for s, c in zip(shown, prompted)])),
        "useful_identity": useful_identity(truth, shown, prompted),
    }


def _selection_figures(images: torch.Tensor, scorers: Scorers, validator: IdentityValidator) -> dict[str, float]:
    scores = scorers.scores(images)
    metrics = validator.compute(images)
    out = {kind: float(v.mean()) for kind, v in scores.items()}
    for key in ("identity_mean", "copy_fraction", "context_copy_fraction", "context_copy_excess"):
        if key in metrics:
            out[key] = float(metrics[key])
    return out


def run_overfit_subject(args: PersonaliseConfig, assets: WorldAssets, pipe: Any, oracle: AttributeOracle,
                        index: int, config: RenderConfig, *, steps: int = STEPS,
                        checkpointing_steps: int = CHECKPOINTING_STEPS,
                        learning_rate: float = LEARNING_RATE) -> dict[str, Any]:
    """Run and measure one subject's overfitting arm (see the module docstring); its figures as a dict.

    ``args`` gives the work folder (``out/overfit/subjectNN``), ``per_context``, ``rank`` and ``seed``; the
    DreamBooth length and rate are the arm's own (:data:`STEPS`, :data:`LEARNING_RATE`), not ``args``'s; a quick
    path may shorten them with the keywords (a finished run in the folder is reused whatever they say).
    """
    folder = Path(args.out) / "overfit" / f"subject{index:02d}"
    subject = make_subject(index, folder, seed=args.seed, single_context=True)
    trained = subject.contexts[0]
    truth_set = EvalSet(args.per_context, [c for c in scenes.CONTEXTS if c != trained], TRUTH_SEED_OFFSET)
    selection_set = EvalSet(args.per_context, list(scenes.CONTEXTS), SELECTION_SEED_OFFSET)
    started = time.perf_counter()
    run_dir = overfit_dreambooth(args, assets, subject, folder, steps=steps, checkpointing_steps=checkpointing_steps,
                                 learning_rate=learning_rate)
    db_seconds = time.perf_counter() - started
    started = time.perf_counter()
    scorers = Scorers(assets, subject.instance_dir)
    validator = IdentityValidator(NearIDModel.from_pretrained(assets.nearid), subject.instance_dir,
                                  copy_guard=COPY_GUARD, log_images=False)
    renders = folder / "renders"
    rows: list[dict[str, Any]] = []
    for checkpoint in [None, *find_checkpoints(run_dir)]:
        name = "base" if checkpoint is None else checkpoint.name
        lora = None if checkpoint is None else checkpoint.path
        truth_images = _render(pipe, lora, truth_set, config, renders / f"{name}_truth.pt")
        selection_images = _render(pipe, lora, selection_set, config, renders / f"{name}_selection.pt")
        if not (renders / f"{name}.png").is_file():
            save_grid(torch.cat([truth_images, selection_images]), len(truth_set.contexts) + len(scenes.CONTEXTS),
                      renders / f"{name}.png")
        row = {"step": 0 if checkpoint is None else checkpoint.step,
               **_truth_figures(truth_images, truth_set, subject, oracle),
               "selection": _selection_figures(selection_images, scorers, validator)}
        rows.append(row)
    base, rows = rows[0], rows[1:]
    useful = [r["useful_identity"] for r in rows]
    best = max(useful)
    picks = selector_picks(rows)
    return {
        "folder": str(folder), "subject": subject.to_dict(), "trained_context": trained, "base": base,
        "checkpoints": rows, "dreambooth_seconds": round(db_seconds, 1),
        "measure_seconds": round(time.perf_counter() - started, 1),
        "picked_step": {k: rows[i]["step"] for k, i in picks.items()},
        "regret": {k: best - rows[i]["useful_identity"] for k, i in picks.items()},
        "useful_identity_best": best, "useful_identity_last": useful[-1],
        "best_step": rows[int(np.argmax(useful))]["step"],
        "spearman_useful": {k: spearman([r["selection"][k] for r in rows], useful)
                            for k in ("nearid", "frozen", "meanpool")},
    }  # fmt: skip


def summarise_overfit(results: list[dict[str, Any]], *, seed: int = 0, copy_rate_bar: float = 0.5,
                      guard: float = COPY_GUARD) -> dict[str, Any]:
    """Average the arm over subjects (results of :func:`run_overfit_subject`).

    Returns:
        ``regret`` (per selector of :data:`SELECTORS`, mean over subjects), ``useful_identity_best``,
        ``useful_identity_last``, ``overfit_drop`` (best - last), ``copy_signal_recall`` (of all checkpoints whose
        copy rate exceeds ``copy_rate_bar``, the share whose ``context_copy_fraction`` exceeds ``guard``; NaN when
        there is none), ``copy_signal_false_alarms`` (the share of the other checkpoints flagged), the same two for
        ``copy_fraction`` (today's NearID-space signal, flagged when above 0.5), ``intervals`` (95 % bootstrap over
        subjects of each averaged figure, drawn with ``seed``) and ``per_subject`` rows.
    """
    if not results:
        raise ValueError("summarise_overfit needs at least one subject's result, got none")
    per_subject = []
    copying: dict[str, list[bool]] = {"context_copy_fraction": [], "copy_fraction": []}
    clean: dict[str, list[bool]] = {"context_copy_fraction": [], "copy_fraction": []}
    bars = {"context_copy_fraction": guard, "copy_fraction": 0.5}
    for result in results:
        for row in result["checkpoints"]:
            for key, bar in bars.items():
                value = row["selection"].get(key, math.nan)
                (copying if row["copy_rate"] > copy_rate_bar else clean)[key].append(bool(value > bar))
        per_subject.append({
            "subject": result["subject"]["index"] if isinstance(result.get("subject"), dict) else None,
            "trained_context": result.get("trained_context"),
            "useful_identity_best": result["useful_identity_best"],
            "useful_identity_last": result["useful_identity_last"],
            "best_step": result.get("best_step"), "picked_step": result.get("picked_step"),
            "regret": result["regret"],
        })  # fmt: skip

    def share(flags: list[bool]) -> float:
        return float(np.mean(flags)) if flags else math.nan

    columns: dict[str, list[float]] = {f"regret_{k}": [r["regret"][k] for r in results] for k in SELECTORS}
    columns["useful_identity_best"] = [r["useful_identity_best"] for r in results]
    columns["useful_identity_last"] = [r["useful_identity_last"] for r in results]
    columns["overfit_drop"] = [r["useful_identity_best"] - r["useful_identity_last"] for r in results]
    means = {k: nanmean(v) for k, v in columns.items()}
    return {
        "subjects": len(results),
        "regret": {k: means[f"regret_{k}"] for k in SELECTORS},
        "useful_identity_best": means["useful_identity_best"],
        "useful_identity_last": means["useful_identity_last"],
        "overfit_drop": means["overfit_drop"],
        "copy_signal_recall": share(copying["context_copy_fraction"]),
        "copy_signal_false_alarms": share(clean["context_copy_fraction"]),
        "copy_fraction_recall": share(copying["copy_fraction"]),
        "copy_fraction_false_alarms": share(clean["copy_fraction"]),
        "copying_checkpoints": len(copying["context_copy_fraction"]),
        "intervals": {k: bootstrap_mean(v, seed=seed).bounds() for k, v in columns.items()},
        "per_subject": per_subject,
    }  # fmt: skip


@dataclass
class OverfitArguments:
    """Flags of ``python -m nearid_world.overfit``."""

    first_subject: int = field(default=40, metadata={"help": "index of the first held-out subject"})
    subjects: int = field(default=2, metadata={"help": "how many subjects, from --first_subject on"})
    json: str | None = field(default=None, metadata={"help": "write the summary and the per-subject results here"})
    out: str = field(default="bench_out/personalisation", metadata={"help": "work folder (runs, renders)"})
    weights: str = field(default=str(WorldAssets().root), metadata={"help": "the world's shipped models"})
    per_context: int = field(default=4, metadata={"help": "seeds per context prompt in each set"})
    seed: int = field(default=0, metadata={"help": "training seed"})


@entry_point("nearid_world.overfit")
def main(argv: list[str] | None = None) -> int:
    (options,) = parse_arguments(OverfitArguments, argv, prog="python -m nearid_world.overfit",
                                 description=__doc__.split("\n\n")[0])
    if options.subjects < 1:
        raise ValueError(f"--subjects must be >= 1, got {options.subjects}")
    torch.set_num_threads(1)
    # the DreamBooth subprocess inherits this: on shared cores a multi-threaded run crawls (3-5 s per step here
    # against 0.2-0.9 s with one thread)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.perf_counter()
    assets = WorldAssets(Path(options.weights))
    assets.check()
    args = PersonaliseConfig(out=options.out, per_context=options.per_context, seed=options.seed)
    pipe = load_world_pipeline(assets)
    oracle = AttributeOracle.from_pretrained(assets.oracle)
    config = args.render_config()
    results = []
    for index in range(options.first_subject, options.first_subject + options.subjects):
        t = time.perf_counter()
        result = run_overfit_subject(args, assets, pipe, oracle, index, config)
        results.append(result)
        regrets = " ".join(f"{k} {v:.2f}" for k, v in result["regret"].items())
        print(f"subject {index} ({result['trained_context']}): useful identity best "
              f"{result['useful_identity_best']:.2f} at step {result['best_step']}, last "
              f"{result['useful_identity_last']:.2f}; regret {regrets} ({time.perf_counter() - t:.0f} s)", flush=True)
    summary = summarise_overfit(results)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    print({k: v for k, v in summary.items() if k not in ("per_subject", "intervals")})
    if options.json:
        write_json_atomic(options.json, {"overfit_arm": summary, "results": results,
                                         "settings": {"steps": STEPS, "learning_rate": LEARNING_RATE,
                                                      "checkpointing_steps": CHECKPOINTING_STEPS,
                                                      "copy_guard": COPY_GUARD, **dataclasses.asdict(options)}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
