"""Does NearID pick and produce the truly better identity? A study against ground truth, with intervals.

In the generation world (:mod:`nearid_world`) every object's attributes are known and an oracle reads them from any
generated image, so "is it still my subject?" has a true answer. For each held-out subject (identities the world
model and the world's NearID heads never saw):

1. DreamBooth-LoRA on the subject's three views ("a sks object") with ``nearid-dreambooth`` hosting
   ``examples/dreambooth_lora_minimal.py`` (the launcher scores every checkpoint with NearID as in a user's run),
   long enough to overfit, with a checkpoint every few steps;
2. for the base model and every checkpoint two render sets: the fixed *evaluation* set ("a sks object on the
   <context>" for each of the four contexts, seeds 10^8 + i), where the oracle measures the truth (true identity,
   prompt fidelity, copy rate, look-alike rate), and a *selection* set (the same prompts, seeds 2 x 10^8 + i), where
   the selectors score: NearID, the frozen head, mean pooling and the leave-out head;
3. selection: the checkpoint each score ranks first on the selection renders, against the oracle-best checkpoint on
   the evaluation renders (regret = true identity lost); ``launcher`` is the launcher's own pick from its validation
   history (NearID on its own prompt set), as a user would make it; ``last`` the last checkpoint;
4. reward baselines: ``examples/train_lora_identity_reward.py`` (DRaFT-K) from the NearID-selected checkpoint with
   each reward (NearID; the frozen head: ``--nearid_model`` = the backbone folder; mean pool:
   ``--nearid_pooling mean``), the same steps, K, learning rate, look-alike penalty and KL prior;
5. over-optimisation: on the first ``--curve_subjects`` subjects of a run the reward runs go on to ``--curve_steps``
   with a checkpoint every ``--curve_every`` steps, with and without the prior, each checkpoint measured: proxy (the
   reward's own cosine on the evaluation renders), truth, and the example's validator (early stopping);
6. unseen look-alike kinds: the leave-out head (``nearid_world/weights/nearid/head_leaveout``, trained without part
   and secondary-colour distractors) scores every sample; subjects whose look-alike changes a left-out kind
   (``index % 5`` in {2, 4}: secondary, part) are the "unseen" subjects;
7. the overfitting arm (:mod:`nearid_world.overfit`, its own settings and their reasons in its docstring) on the
   first ``--overfit_subjects`` subjects of a run: three training views in one place, DreamBooth well past its
   best, prompts for the other places; useful identity per checkpoint and each selector's regret on it, the copy
   guard included (JSON ``overfit_arm``).

Every averaged figure gets a 95 % two-level percentile bootstrap interval (:mod:`nearid_world.stats`): subjects are
resampled, then within each drawn subject the rendered samples (the same sample indices for every checkpoint and
reward run of the subject, which share prompts and seeds; evaluation and selection samples drawn separately), and
the subject's figures are recomputed. Paired differences (NearID - frozen, NearID - mean pool) are per-subject
figures, so both sides are resampled jointly.

Subjects: the benchmark subjects are held-out indices 0-23; development subjects 40-47 (used to choose settings);
indices 24-39 are reserved for an independent replication and are never run by the project's scripts, tests or docs
(the script accepts any index a user asks for).

Settings (fixed on development subjects 40-41 before any benchmark subject was run): DreamBooth 400 steps, a
checkpoint every 40, learning rate 2e-3, rank 8; 4 seeds per context (16 evaluation and 16 selection samples);
DDIM 20 steps, guidance 4; DRaFT-K with K = 2, 40 steps, learning rate 1e-3, batch 4, look-alike penalty 0.5, KL prior
(weight 1) to the starting adapter on 8 class images, as in the earlier benchmark (where 40 steps and the penalty
0.5 were chosen on subjects 40-41); curves to 160 steps (four times the reward's 40), measured every 20, on one
subject per process (the cost model below leaves room for no more within two hours); 2000 bootstrap draws.

Cost model (CPU seconds measured on development subjects 40-41 with these settings but shorter runs, every process
one torch thread, so on an idle 2-core machine two processes side by side run at about their CPU time; details in
docs/world.md): DreamBooth 400 steps about 55 s; one render set measured (16 samples) 4.4 s, 21 per subject;
DRaFT-K 1.55 s per step plus 6.5 s start-up. A subject: 55 + 21 x 4.4 + 3 x (6.5 + 40 x 1.55 + 4.4) = about 370 s
(6.2 min); a curve subject adds 6 runs x 160 steps with 8 measured checkpoints each, about 1470 s (24.5 min). Two
processes of 12 subjects with one curve subject each: about 99 min each, plus about a minute of bootstrap for the
merge: inside the two hours before the overfitting arm. The arm's subject (1200 DreamBooth steps, about 165 s from
the 400-step figure, and 13 checkpoints with two render sets each, about 105 s) adds about 4.5 min, so three arm
subjects per process bring each process to about 112 min (an estimate from CPU seconds, not a timed run).
``--quick``: 142 CPU s in all (2.4 min) before the arm's quick path (40 steps, 2 checkpoints) was added.

Commands (the full study: two processes side by side, then a merge that recomputes every interval)::

    python benchmarks/bench_personalisation.py --first_subject 0 --subjects 12 --json bench_out/study_a.json \\
        --out bench_out/study
    python benchmarks/bench_personalisation.py --first_subject 12 --subjects 12 --json bench_out/study_b.json \\
        --out bench_out/study
    python benchmarks/bench_personalisation.py --merge bench_out/study_a.json bench_out/study_b.json \\
        --json benchmarks/results/personalisation.json
    python benchmarks/bench_personalisation.py --quick                                 # 1 subject, every key, rough

The JSON holds per-subject results (with per-sample values), the averaged figures (``spearman_*_vs_truth``,
``selection_regret_*``, ``base_truth``, ``best_truth``, ``reward_finetune_*``, ``reward_<kind>_*``, ...),
``intervals`` (every averaged figure -> ``[low, high]``), ``paired``, ``intervals_subjects`` and
``paired_subjects`` (the same from resampling subjects only, a sensitivity analysis added after the first full
run: see :func:`summarise`), ``unseen_kinds``, ``reward_baselines``,
``overoptimisation``, ``best_checkpoint_attributes`` (which attributes the oracle-best checkpoints draw),
``overfit_arm`` (when the arm ran), ``seconds`` and ``goals`` (each of the study's
goals, fixed before it ran, checked against the figures: :func:`goals`; also printed as a table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nearid_world import scenes  # noqa: E402
from nearid_world.evaluate import WorldAssets, load_world_pipeline  # noqa: E402
from nearid_world.oracle import AttributeOracle  # noqa: E402
from nearid_world.overfit import CHECKPOINTING_STEPS as OVERFIT_CHECKPOINTING_STEPS  # noqa: E402
from nearid_world.overfit import STEPS as OVERFIT_STEPS  # noqa: E402
from nearid_world.overfit import run_overfit_subject, summarise_overfit  # noqa: E402
from nearid_world.personalise import (  # noqa: E402
    REWARD_KINDS,
    SCORE_KINDS,
    PersonaliseConfig,
    class_images,
    personalise_subject,
    spearman,
)
from nearid_world.stats import Interval, nanmean, resample_indices, two_level_bootstrap  # noqa: E402

__all__ = ["goals", "main", "spearman", "subject_figures", "summarise"]

# Distractor kinds the leave-out head never trained on (fixed before it was trained).
LEFT_OUT: tuple[str, ...] = ("part", "secondary")
OUTCOMES: tuple[str, ...] = ("truth", "prompt_fidelity", "copy_rate", "lookalike_rate")
PAIRED: tuple[str, ...] = ("spearman_nearid_minus_frozen", "spearman_nearid_minus_meanpool",
                           "regret_nearid_minus_frozen", "regret_nearid_minus_meanpool",
                           "reward_gain_nearid_minus_frozen", "reward_gain_nearid_minus_meanpool")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, PersonaliseConfig]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=str(WorldAssets().root), help="the world's shipped models")
    p.add_argument("--out", default="bench_out/personalisation", help="work folder (runs, renders)")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--quick", action="store_true", help="1 subject, short runs, every key (the CI-sized path)")
    p.add_argument("--subjects", type=int, default=12)
    p.add_argument("--first_subject", type=int, default=0, help="index of the first held-out subject")
    p.add_argument("--steps", type=int, default=400, help="DreamBooth steps")
    p.add_argument("--checkpointing_steps", type=int, default=40)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--per_context", type=int, default=4, help="evaluation (and selection) seeds per context prompt")
    p.add_argument("--inference_steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=4.0)
    p.add_argument("--reward_steps", type=int, default=40, help="DRaFT-K steps (0: skip reward fine-tuning)")
    p.add_argument("--reward_learning_rate", type=float, default=1e-3)
    p.add_argument("--reward_backprop_steps", type=int, default=2)
    p.add_argument("--reward_negative_weight", type=float, default=0.5, help="lambda of the look-alike penalty")
    p.add_argument("--reward_kinds", nargs="+", default=list(REWARD_KINDS), choices=REWARD_KINDS,
                   help="the rewards to fine-tune with")
    p.add_argument("--curve_subjects", type=int, default=1,
                   help="the first this many subjects of the run get over-optimisation curves")
    p.add_argument("--curve_steps", type=int, default=160, help="length of the over-optimisation reward runs")
    p.add_argument("--curve_every", type=int, default=20, help="curve checkpoints every this many steps")
    p.add_argument("--no_prior_run", action="store_true", help="curves only with the prior term")
    p.add_argument("--n_resamples", type=int, default=2000, help="bootstrap draws")
    p.add_argument("--overfit_subjects", type=int, default=3,
                   help="run the overfitting arm (nearid_world.overfit) on the first this many subjects of the run")
    p.add_argument("--overfit_steps", type=int, default=OVERFIT_STEPS, help="DreamBooth steps of the overfitting arm")
    p.add_argument("--overfit_checkpointing_steps", type=int, default=OVERFIT_CHECKPOINTING_STEPS,
                   help="checkpoint spacing of the overfitting arm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="only combine the per-subject results of earlier runs (e.g. subjects split over processes); "
                   "every interval is recomputed from the merged subjects")
    if "--quick" in (sys.argv[1:] if argv is None else argv):  # smaller defaults; explicit flags still win
        p.set_defaults(subjects=1, steps=60, checkpointing_steps=20, per_context=2, reward_steps=4,
                       inference_steps=10, curve_steps=8, curve_every=4, n_resamples=200,
                       overfit_subjects=1, overfit_steps=40, overfit_checkpointing_steps=20)
    args = p.parse_args(argv)
    args.reward_kinds = tuple(args.reward_kinds)
    fields = {f.name for f in dataclasses.fields(PersonaliseConfig)}
    return args, PersonaliseConfig(**{k: v for k, v in vars(args).items() if k in fields})


# ---------------------------------------------------------------------------------------------- figures
def _kind_group(subject: dict[str, Any]) -> str:
    return "unseen" if subject["subject"]["changed"] in LEFT_OUT else "seen"


_ARRAYS: dict[int, tuple[list[float], np.ndarray]] = {}  # per-sample lists as arrays, kept while summarising


def _array(values: list[float]) -> np.ndarray:
    """``values`` as a float64 array, converted once per list object (the bootstrap reads each list many times)."""
    hit = _ARRAYS.get(id(values))
    if hit is not None and hit[0] is values:
        return hit[1]
    arr = np.asarray(values, dtype=np.float64)
    _ARRAYS[id(values)] = (values, arr)
    return arr


_MATRICES: dict[tuple[int, str, bool], tuple[list[Any], np.ndarray]] = {}


def _matrix(rows: list[dict[str, Any]], key: str, selection: bool) -> np.ndarray:
    """Per-sample values of ``key`` for every checkpoint: ``[C, N]`` (evaluation or selection renders), cached."""
    hit = _MATRICES.get((id(rows), key, selection))
    if hit is not None and hit[0] is rows:
        return hit[1]
    arr = np.asarray([(r["selection"] if selection else r)["samples"][key] for r in rows], dtype=np.float64)
    _MATRICES[(id(rows), key, selection)] = (rows, arr)
    return arr


def subject_figures(subject: dict[str, Any], rng: np.random.Generator | None) -> dict[str, float]:
    """One subject's figures; with ``rng``, from its samples redrawn with replacement (see the module docstring).

    The evaluation samples are redrawn with one index set for every render of the subject (base, checkpoints,
    reward runs: the same prompts and seeds), the selection samples with another.
    """
    rows = subject["checkpoints"]
    n_eval = len(rows[0]["samples"]["truth"])
    n_sel = len(rows[0]["selection"]["samples"]["truth"])
    ie = resample_indices(rng, n_eval) if rng is not None else np.arange(n_eval)
    isel = resample_indices(rng, n_sel) if rng is not None else np.arange(n_sel)

    def ev(measure: dict[str, Any], key: str) -> float:
        return float(_array(measure["samples"][key])[ie].mean())

    out: dict[str, float] = {}
    truth_arr = _matrix(rows, "truth", False)[:, ie].mean(1)  # [C]
    truth = truth_arr.tolist()
    best = max(truth)
    kinds = [k for k in SCORE_KINDS if k in rows[0]["selection"]["samples"]]
    group = _kind_group(subject)
    for kind in kinds:
        scores = _matrix(rows, kind, True)[:, isel].mean(1)  # [C]
        out[f"spearman_{kind}_vs_truth"] = spearman(scores, truth_arr)
        out[f"selection_regret_{kind}"] = best - truth[int(np.argmax(scores))]
        if kind in ("nearid", "frozen", "leaveout"):
            out[f"spearman_{kind}_vs_truth_{group}"] = out[f"spearman_{kind}_vs_truth"]
            out[f"selection_regret_{kind}_{group}"] = out[f"selection_regret_{kind}"]
    out["selection_regret_last"] = best - truth[-1]
    if "launcher" in subject["picked_step"]:
        steps = [r["step"] for r in rows]
        out["selection_regret_launcher"] = best - truth[steps.index(subject["picked_step"]["launcher"])]
    out["base_truth"] = ev(subject["base"], "truth")
    out["best_truth"] = best
    for other in ("frozen", "meanpool"):
        out[f"spearman_nearid_minus_{other}"] = out["spearman_nearid_vs_truth"] - out[f"spearman_{other}_vs_truth"]
        out[f"regret_nearid_minus_{other}"] = out["selection_regret_nearid"] - out[f"selection_regret_{other}"]
    reward = subject.get("reward")
    if reward:
        before = reward["before"]
        for kind, entry in reward["kinds"].items():
            for name in OUTCOMES:
                out[f"reward_{kind}_{name}_before"] = ev(before, name)
                out[f"reward_{kind}_{name}_after"] = ev(entry["after_prior"], name)
            out[f"reward_{kind}_gain"] = out[f"reward_{kind}_truth_after"] - out[f"reward_{kind}_truth_before"]
            if "after_noprior" in entry:
                for name in OUTCOMES:
                    out[f"reward_{kind}_{name}_after_noprior"] = ev(entry["after_noprior"], name)
            out[f"reward_{kind}_gain_{group}"] = out[f"reward_{kind}_gain"]
            for tag in ("prior", "noprior"):
                curve = entry.get(f"curve_{tag}")
                if curve:
                    values = [float(_array(v)[ie].mean()) for v in curve["samples_truth"]]
                    peak = max(values)
                    out[f"curve_{kind}_{tag}_end_minus_peak"] = values[-1] - peak
                    stop = curve.get("validator_best_step")
                    if stop in curve["steps"]:
                        out[f"curve_{kind}_{tag}_early_stop_minus_peak"] = values[curve["steps"].index(stop)] - peak
        for other in ("frozen", "meanpool"):
            if "nearid" in reward["kinds"] and other in reward["kinds"]:
                out[f"reward_gain_nearid_minus_{other}"] = out["reward_nearid_gain"] - out[f"reward_{other}_gain"]
        if "nearid" in reward["kinds"]:  # the earlier benchmark's names for the NearID reward
            for name, legacy in (("truth", "reward_finetune_truth"),
                                 ("prompt_fidelity", "reward_finetune_prompt_fidelity"),
                                 ("copy_rate", "reward_finetune_copy_rate"),
                                 ("lookalike_rate", "penalty_lookalike_rate")):
                for when in ("before", "after"):
                    out[f"{legacy}_{when}"] = out[f"reward_nearid_{name}_{when}"]
    return out


def _shipped_ssr(assets: WorldAssets) -> dict[str, dict[str, float]]:
    """SSR / PA (%) of each head on the kinds the leave-out head saw and did not see, from the shipped configs."""
    out: dict[str, dict[str, float]] = {}
    sources = {"nearid": (assets.encoder_config, "nearid"), "frozen": (assets.encoder_config, "frozen"),
               "leaveout": (assets.leaveout_config, "nearid")}
    seen = [k for k in scenes.NEAR_ATTRIBUTES if k not in LEFT_OUT]
    if assets.leaveout_config.is_file():
        shipped = json.loads(assets.leaveout_config.read_text())["config"].get("leave_out", [])
        if sorted(shipped) != sorted(LEFT_OUT):
            raise ValueError(f"the leave-out head in {assets.leaveout_config} left out {shipped}, but the study "
                             f"groups subjects by {list(LEFT_OUT)}: rebuild the head or change LEFT_OUT")
    for name, (path, key) in sources.items():
        if not path.is_file():
            out[name] = {f"{m}_{g}": math.nan for m in ("ssr", "pa") for g in ("seen", "unseen")}
            continue
        table = json.loads(path.read_text())["held_out_test_identities"][key]
        out[name] = {f"{m}_{g}": float(np.mean([table[k][m] for k in kinds]))
                     for m in ("ssr", "pa") for g, kinds in (("seen", seen), ("unseen", LEFT_OUT))}
    return out


def _curves(subjects: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean proxy, truth and validator per step over the curve subjects, per reward kind and prior setting."""
    out: dict[str, Any] = {}
    for kind in REWARD_KINDS:
        for tag in ("prior", "noprior"):
            curves = [s["reward"]["kinds"][kind][f"curve_{tag}"] for s in subjects
                      if s.get("reward") and kind in s["reward"]["kinds"]
                      and f"curve_{tag}" in s["reward"]["kinds"][kind]]
            if not curves:
                continue
            steps = curves[0]["steps"]
            curves = [c for c in curves if c["steps"] == steps]
            mean = {key: [nanmean([c[key][i] for c in curves]) for i in range(len(steps))]
                    for key in ("proxy", "truth", "validator")}
            peak = int(np.argmax(mean["truth"]))
            stops = [c["truth"][c["steps"].index(c["validator_best_step"])] for c in curves
                     if c.get("validator_best_step") in c["steps"]]
            out[f"{kind}_{tag}"] = {
                "steps": steps, "proxy": mean["proxy"], "truth": mean["truth"], "validator": mean["validator"],
                "subjects": [s["subject"]["index"] for s in subjects if s.get("reward")
                             and f"curve_{tag}" in s["reward"]["kinds"].get(kind, {})],
                "truth_peak_step": steps[peak], "truth_peak": mean["truth"][peak], "truth_end": mean["truth"][-1],
                "truth_early_stop": nanmean(stops) if stops else math.nan,
            }  # fmt: skip
    return out


def best_checkpoint_attributes(subjects: list[dict[str, Any]]) -> dict[str, Any]:
    """Which of the subject's attributes its oracle-best checkpoint draws: a descriptive figure, no interval.

    Per identity attribute, the share of the best checkpoint's evaluation samples in which the oracle reads the
    subject's value (``match_<attribute>``), averaged over the subjects; ``per_subject`` keeps each subject's rates
    (keyed by index). The best checkpoint is the one with the highest measured true identity (the first on a tie).
    Added after the study's rerun on the rebuilt world, to say what the subjects that stay short of 1.0 miss.
    """
    per_subject: dict[str, dict[str, float]] = {}
    for s in subjects:
        rows = s["checkpoints"]
        if not all(f"match_{a}" in rows[0] for a in scenes.IDENTITY_ATTRIBUTES):
            continue
        best = rows[int(np.argmax([r["truth"] for r in rows]))]
        per_subject[str(s["subject"]["index"])] = {a: float(best[f"match_{a}"]) for a in scenes.IDENTITY_ATTRIBUTES}
    mean = {a: nanmean([r[a] for r in per_subject.values()]) for a in scenes.IDENTITY_ATTRIBUTES}
    return {"mean": mean, "per_subject": per_subject}


def summarise(subjects: list[dict[str, Any]], seconds: float, *, n_resamples: int = 2000, seed: int = 0,
              assets: WorldAssets | None = None) -> dict[str, Any]:
    """The averaged figures with their intervals, and the study's grouped keys (see the module docstring)."""
    try:
        intervals: dict[str, Interval] = two_level_bootstrap(subjects, subject_figures, n_resamples=n_resamples,
                                                             seed=seed)
    finally:
        _ARRAYS.clear()
        _MATRICES.clear()
    out: dict[str, Any] = {"subjects": len(subjects)}
    out |= {k: v.mean for k, v in intervals.items()}
    out["subjects_learning_0.3"] = sum(s["best_truth"] - s["base_truth"] >= 0.3 for s in subjects)
    out["intervals"] = {k: v.bounds() for k, v in intervals.items()}
    nan = Interval(math.nan, math.nan, math.nan)
    out["paired"] = {k: intervals.get(k, nan).as_dict() for k in PAIRED}
    # Sensitivity analysis, added after the study's first full run: subjects resampled, each subject's figures as
    # measured (a one-level bootstrap). Redrawing samples within subjects adds a second round of sampling noise,
    # which lowers rank correlations and raises regrets in every draw, so the two-level interval of such a figure
    # can miss its own point estimate; a subject's measured figure already carries its sampling noise.
    measured = {id(s): subject_figures(s, None) for s in subjects}
    by_subject = two_level_bootstrap(subjects, lambda s, rng: measured[id(s)], n_resamples=n_resamples, seed=seed)
    out["intervals_subjects"] = {k: v.bounds() for k, v in by_subject.items()}
    out["paired_subjects"] = {k: by_subject.get(k, nan).as_dict() for k in PAIRED}
    ssr = _shipped_ssr(assets or WorldAssets())
    groups = {g: [s["subject"]["index"] for s in subjects if _kind_group(s) == g] for g in ("seen", "unseen")}
    out["unseen_kinds"] = {"left_out": list(LEFT_OUT), "subjects_seen": groups["seen"],
                           "subjects_unseen": groups["unseen"]}
    for head in ("leaveout", "frozen", "nearid"):
        entry = dict(ssr[head])
        for g in ("seen", "unseen"):
            entry[f"spearman_{g}"] = intervals.get(f"spearman_{head}_vs_truth_{g}", nan).mean
            entry[f"regret_{g}"] = intervals.get(f"selection_regret_{head}_{g}", nan).mean
            if head != "leaveout":  # the leave-out head is not used as a reward (its scores only)
                entry[f"reward_gain_{g}"] = intervals.get(f"reward_{head}_gain_{g}", nan).mean
        out["unseen_kinds"][head] = entry
    out["reward_baselines"] = {}
    for kind in REWARD_KINDS:
        entry = {}
        for name in OUTCOMES:
            for when in ("before", "after"):
                entry[f"{name}_{when}"] = intervals.get(f"reward_{kind}_{name}_{when}", nan).mean
        out["reward_baselines"][kind] = entry
    out["overoptimisation"] = _curves(subjects)
    out["best_checkpoint_attributes"] = best_checkpoint_attributes(subjects)
    arm = [s["overfit"] for s in subjects if "overfit" in s]
    if arm:
        out["overfit_arm"] = summarise_overfit(arm, seed=seed)
    out["seconds"] = round(seconds, 1)
    return out


def goals(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The study's goals, fixed before it ran, checked against a summary: one row per goal.

    Each row: ``goal`` (what it asks), ``value`` (the measured figure, NaN when it was not measured), ``interval``
    (its 95 % interval ``[low, high]`` or None), ``met`` (True / False, None when it could not be measured).
    A goal on an interval ("above 0") is met only when the whole interval is.
    """
    nan = math.nan
    intervals = summary.get("intervals", {})
    paired = summary.get("paired", {})
    rows: list[dict[str, Any]] = []

    def row(goal: str, value: float, met: bool | None, interval: list[float] | None = None) -> None:
        value = float(value) if value is not None else nan
        rows.append({"goal": goal, "value": value, "interval": interval,
                     "met": None if math.isnan(value) else met})

    def pair(key: str) -> tuple[float, list[float] | None]:
        entry = paired.get(key, {})
        mean = entry.get("mean", nan)
        return mean, ([entry["low"], entry["high"]] if not math.isnan(mean) else None)

    mean, bounds = pair("spearman_nearid_minus_meanpool")
    row("tracking: Spearman NearID - mean pool >= 0.05, interval above 0", mean,
        bool(mean >= 0.05 and bounds and bounds[0] > 0), bounds)
    mean, bounds = pair("spearman_nearid_minus_frozen")
    row("tracking: Spearman NearID - frozen, interval above 0", mean, bool(bounds and bounds[0] > 0), bounds)
    unseen = summary.get("unseen_kinds", {})
    leave, frozen = unseen.get("leaveout", {}), unseen.get("frozen", {})
    for metric, key, better in (("spearman", "spearman_leaveout_vs_truth_unseen", "at least"),
                                ("regret", "selection_regret_leaveout_unseen", "at most")):
        a, b = leave.get(f"{metric}_unseen", nan), frozen.get(f"{metric}_unseen", nan)
        met = a >= b if metric == "spearman" else a <= b
        row(f"unseen kinds: leave-out head's {metric} on unseen-kind subjects {better} the frozen head's "
            f"({b:.3f})", a, bool(met), intervals.get(key))
    a, b = leave.get("ssr_unseen", nan), frozen.get("ssr_unseen", nan)
    row(f"unseen kinds: leave-out head's SSR on unseen kinds above the frozen head's ({b:.1f})", a, bool(a > b))
    gain = summary.get("reward_nearid_gain", nan)
    row("reward: NearID's gain in true identity >= 0.1", gain, bool(gain >= 0.1), intervals.get("reward_nearid_gain"))
    base_gain = summary.get("reward_meanpool_gain", nan)
    margin = gain - 2 * base_gain
    row(f"reward: NearID's gain - 2 x the mean-pool reward's gain ({base_gain:.3f}) >= 0", margin, bool(margin >= 0))
    outcome = summary.get("reward_baselines", {}).get("nearid", {})
    before, after = outcome.get("prompt_fidelity_before", nan), outcome.get("prompt_fidelity_after", nan)
    row(f"reward: prompt fidelity within 0.05 of the start ({before:.3f}), after", after,
        bool(after >= before - 0.05), intervals.get("reward_nearid_prompt_fidelity_after"))
    before, after = outcome.get("copy_rate_before", nan), outcome.get("copy_rate_after", nan)
    row(f"reward: copy rate not above the start ({before:.3f}), after", after, bool(after <= before),
        intervals.get("reward_nearid_copy_rate_after"))
    after = outcome.get("lookalike_rate_after", nan)
    row("reward: look-alike rate after <= 0.05", after, bool(after <= 0.05),
        intervals.get("reward_nearid_lookalike_rate_after"))
    curve = summary.get("overoptimisation", {}).get("nearid_prior", {})
    end = curve.get("truth_end", nan) - curve.get("truth_peak", nan)
    stop = curve.get("truth_early_stop", nan) - curve.get("truth_peak", nan)
    row("over-optimisation: NearID with the prior, truth at the end - peak >= -0.02", end, bool(end >= -0.02))
    row("over-optimisation: NearID with the prior, truth at the validator's early stop - peak >= -0.02", stop,
        bool(stop >= -0.02))
    arm = summary.get("overfit_arm", {})
    arm_intervals = arm.get("intervals", {})
    drop = arm.get("overfit_drop", nan)
    row("overfitting arm: useful identity best - last >= 0.15", drop, bool(drop >= 0.15),
        arm_intervals.get("overfit_drop"))
    regret = arm.get("regret", {}).get("copy_guard", nan)
    row("overfitting arm: regret of selection with the copy guard <= 0.05", regret, bool(regret <= 0.05),
        arm_intervals.get("regret_copy_guard"))
    recall = arm.get("copy_signal_recall", nan)
    row("overfitting arm: copy signal flags >= 80 % of checkpoints with copy rate > 0.5", recall,
        bool(recall >= 0.8))
    seconds = summary.get("seconds", nan)
    row("cost: the full study <= 2 hours (seconds, slowest process)", seconds, bool(seconds <= 7200))
    return rows


def goals_markdown(rows: list[dict[str, Any]]) -> str:
    """:func:`goals` as a Markdown table."""
    lines = ["| goal | measured | 95 % interval | met |", "|---|---|---|---|"]
    for r in rows:
        bounds = f"[{r['interval'][0]:.3f}, {r['interval'][1]:.3f}]" if r["interval"] else ""
        met = {True: "yes", False: "**no**", None: "not measured"}[r["met"]]
        lines.append(f"| {r['goal']} | {r['value']:.3f} | {bounds} | {met} |")
    return "\n".join(lines)


def _missed(rates: dict[str, float] | None) -> str:
    """The attributes drawn in fewer than half of the samples (with their rates), ``none``, or ``-`` if unmeasured."""
    if rates is None:
        return "-"
    missed = [f"{a} {r:.2f}" for a, r in rates.items() if r < 0.5]
    return ", ".join(missed) if missed else "none"


def markdown(summary: dict[str, Any], subjects: list[dict[str, Any]] | None = None) -> str:
    """The averaged figures with their intervals, then (with ``subjects``) one row per subject."""
    lines = ["| figure | value | 95 % interval |", "|---|---|---|"]
    intervals = summary.get("intervals", {})
    for key, value in summary.items():
        if isinstance(value, (dict, list)):
            continue
        bounds = intervals.get(key)
        text = f"[{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else ""
        lines.append(f"| {key} | {value:.3f} | {text} |" if isinstance(value, float) else f"| {key} | {value} | |")
    if subjects:
        lines += ["", "| subject | look-alike changes | base truth | best truth "
                  "| Spearman NearID / frozen / mean pool | regret NearID / frozen / mean pool / last "
                  "| reward NearID / frozen / mean pool: truth before -> after "
                  "| look-alike rate before -> after (NearID reward) | drawn in < half the best samples |",
                  "|---|---|---|---|---|---|---|---|---|"]
        attributes = summary["best_checkpoint_attributes"]["per_subject"]
        for s in subjects:
            sp, rg = s["spearman"], s["regret"]
            kinds = s.get("reward", {}).get("kinds", {})
            before = s.get("reward", {}).get("before", {})

            def f(m: dict[str, Any], k: str) -> str:
                return f"{m[k]:.2f}" if k in m else "-"

            gains = " / ".join(f"{f(before, 'truth')} -> {f(kinds.get(k, {}).get('after_prior', {}), 'truth')}"
                               for k in REWARD_KINDS)
            near = kinds.get("nearid", {}).get("after_prior", {})
            lines.append(
                f"| {s['subject']['index']} | {s['subject']['changed']} | {s['base_truth']:.2f} "
                f"| {s['best_truth']:.2f} "
                f"| {sp['nearid']:.2f} / {sp['frozen']:.2f} / {sp['meanpool']:.2f} "
                f"| {rg['nearid']:.2f} / {rg['frozen']:.2f} / {rg['meanpool']:.2f} / {rg['last']:.2f} "
                f"| {gains} | {f(before, 'lookalike_rate')} -> {f(near, 'lookalike_rate')} "
                f"| {_missed(attributes.get(str(s['subject']['index'])))} |")
    return "\n".join(lines)


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """Summarise the subjects of several runs together (``seconds`` is the slowest run's: they ran side by side)."""
    runs = [json.loads(Path(p).read_text()) for p in args.merge]
    subjects = sorted((s for run in runs for s in run["per_subject"]), key=lambda s: s["subject"]["index"])
    indices = [s["subject"]["index"] for s in subjects]
    if len(set(indices)) != len(indices):
        raise SystemExit(f"--merge: a subject appears in more than one run: {indices}")
    settings = runs[0]["settings"]
    return report(subjects, max(run["seconds"] for run in runs), args.json,
                  {"settings": settings, "merged_from": list(args.merge)}, n_resamples=args.n_resamples,
                  seed=args.seed, assets=WorldAssets(Path(settings.get("weights", WorldAssets().root))))


def report(subjects: list[dict[str, Any]], seconds: float, json_path: str | None, extra: dict[str, Any], *,
           n_resamples: int, seed: int, assets: WorldAssets) -> dict[str, Any]:
    """Summarise, print the Markdown tables, and write the JSON (summary, ``extra``, per-subject results)."""
    started = time.perf_counter()
    summary = summarise(subjects, seconds, n_resamples=n_resamples, seed=seed, assets=assets)
    summary["bootstrap_seconds"] = round(time.perf_counter() - started, 1)
    summary["goals"] = goals(summary)
    result = {**summary, **extra, "per_subject": subjects}
    print(markdown(summary, subjects))
    print()
    print(goals_markdown(summary["goals"]))
    if json_path:
        from nearid_reward.files import write_json_atomic

        write_json_atomic(Path(json_path), result)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, run_config = parse_args(argv)
    if args.merge:
        return merge(args)
    torch.set_num_threads(1)
    started = time.perf_counter()
    assets = WorldAssets(Path(args.weights))
    assets.check()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_world_pipeline(assets)
    oracle = AttributeOracle.from_pretrained(assets.oracle)
    config = run_config.render_config()
    classes = class_images(pipe, out / "class_images", config)
    subjects = []
    for n, index in enumerate(range(args.first_subject, args.first_subject + args.subjects)):
        t = time.perf_counter()
        result = personalise_subject(run_config, assets, pipe, oracle, index, classes, config,
                                     curve=n < args.curve_subjects)
        if n < args.overfit_subjects:
            result["overfit"] = run_overfit_subject(run_config, assets, pipe, oracle, index, config,
                                                    steps=args.overfit_steps,
                                                    checkpointing_steps=args.overfit_checkpointing_steps)
            print(f"subject {index} overfitting arm: useful identity best "
                  f"{result['overfit']['useful_identity_best']:.2f}, last "
                  f"{result['overfit']['useful_identity_last']:.2f}, regret copy guard "
                  f"{result['overfit']['regret']['copy_guard']:.2f}", flush=True)
        result["seconds"] = round(time.perf_counter() - t, 1)
        subjects.append(result)
        sp, rg = result["spearman"], result["regret"]
        print(f"subject {index}: base truth {result['base_truth']:.2f}, best {result['best_truth']:.2f}, "
              f"spearman nearid {sp['nearid']:.2f} frozen {sp['frozen']:.2f} meanpool {sp['meanpool']:.2f}, "
              f"regret nearid {rg['nearid']:.2f} frozen {rg['frozen']:.2f} last {rg['last']:.2f} "
              f"({result['seconds']:.0f} s)", flush=True)
    return report(subjects, time.perf_counter() - started, args.json,
                  {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                                if k != "json"}},
                  n_resamples=args.n_resamples, seed=args.seed, assets=assets)


if __name__ == "__main__":
    main()
