"""The personalisation study's summary: figures, intervals and merging, on per-subject results built by hand."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_personalisation as bench  # noqa: E402
from bench_personalisation import PAIRED, goals, main, spearman, subject_figures, summarise  # noqa: E402

KINDS = ("nearid", "frozen", "meanpool", "leaveout")


def _measure(rng: np.random.Generator, level: float, n: int = 4) -> dict[str, Any]:
    samples = {k: rng.uniform(level - 0.1, level + 0.1, n).round(3).tolist() for k in KINDS}
    samples |= {"truth": rng.choice([0.2, 0.4, 0.6, 0.8, 1.0], n).tolist(),
                "prompt_fidelity": rng.integers(0, 2, n).astype(float).tolist(),
                "copy_rate": [0.0] * n, "lookalike_rate": rng.integers(0, 2, n).astype(float).tolist()}
    return {**{k: float(np.mean(v)) for k, v in samples.items()}, "samples": samples}


def _subject(index: int, seed: int, curve: bool = False) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    rows = []
    for i, step in enumerate((40, 80, 120)):
        row = {"step": step, **_measure(rng, 0.2 * i)}
        row["selection"] = _measure(rng, 0.2 * i)
        rows.append(row)
    truth = [r["truth"] for r in rows]
    pick = {k: int(np.argmax([r["selection"][k] for r in rows])) for k in KINDS}
    kinds: dict[str, Any] = {}
    for kind in ("nearid", "frozen", "meanpool"):
        entry: dict[str, Any] = {"after_prior": _measure(rng, 0.5)}
        if curve:
            entry["curve_prior"] = {"steps": [0, 20, 40], "truth": [0.5, 0.6, 0.55], "proxy": [0.1, 0.2, 0.3],
                                    "validator": [math.nan, 0.2, 0.3], "validator_best_step": 40,
                                    "samples_truth": [[0.4, 0.6] * 2, [0.6] * 4, [0.6, 0.5] * 2]}
        kinds[kind] = entry
    changed = ("shape", "primary", "secondary", "pattern", "part")[index % 5]
    return {"subject": {"index": index, "changed": changed}, "base": _measure(rng, 0.0), "checkpoints": rows,
            "spearman": {k: 0.5 for k in KINDS}, "regret": {k: max(truth) - truth[pick[k]] for k in KINDS} | {
                "last": max(truth) - truth[-1]}, "picked_step": {k: rows[i]["step"] for k, i in pick.items()},
            "base_truth": rows[0]["truth"], "best_truth": max(truth),
            "reward": {"init_step": rows[pick["nearid"]]["step"], "before": rows[pick["nearid"]], "kinds": kinds}}


def test_rank_correlation_matches_scipy_with_ties() -> None:
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.integers(0, 4, 8).astype(float), rng.normal(size=8).round(1)
        assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12, nan_ok=True)
    assert math.isnan(spearman(np.ones(5), np.arange(5.0)))


def test_subject_figures_as_measured_follow_the_definitions() -> None:
    s = _subject(2, seed=0)
    fig = subject_figures(s, None)
    rows = s["checkpoints"]
    truth = [r["truth"] for r in rows]
    for kind in KINDS:  # picks and ranks come from the selection renders, the truth from the evaluation renders
        scores = [r["selection"][kind] for r in rows]
        assert fig[f"selection_regret_{kind}"] == pytest.approx(max(truth) - truth[int(np.argmax(scores))])
    assert fig["spearman_nearid_minus_frozen"] == pytest.approx(
        fig["spearman_nearid_vs_truth"] - fig["spearman_frozen_vs_truth"], nan_ok=True)
    gain = s["reward"]["kinds"]["nearid"]["after_prior"]["truth"] - s["reward"]["before"]["truth"]
    assert fig["reward_nearid_gain"] == pytest.approx(gain)
    assert fig["reward_nearid_gain_unseen"] == fig["reward_nearid_gain"]  # subject 2's look-alike: secondary
    assert "reward_nearid_gain_seen" not in fig


def test_summary_has_every_study_key_with_intervals(tmp_path: Path) -> None:
    subjects = [_subject(i, seed=i, curve=i == 0) for i in range(5)]
    out = summarise(subjects, 1.0, n_resamples=300)
    assert set(out["paired"]) == set(PAIRED)
    for key, (low, high) in out["intervals"].items():
        if not math.isnan(out[key]) and not key.startswith("spearman"):
            assert low - 1e-9 <= out[key] <= high + 1e-9, key
    assert out["unseen_kinds"]["subjects_unseen"] == [2, 4] and out["unseen_kinds"]["subjects_seen"] == [0, 1, 3]
    gains = [subject_figures(s, None)["reward_nearid_gain"] for s in subjects]
    assert out["unseen_kinds"]["nearid"]["reward_gain_unseen"] == pytest.approx(np.mean([gains[2], gains[4]]))
    assert out["unseen_kinds"]["leaveout"]["spearman_unseen"] == pytest.approx(np.nanmean(
        [subject_figures(subjects[i], None)["spearman_leaveout_vs_truth"] for i in (2, 4)]))
    assert set(out["reward_baselines"]) == {"nearid", "frozen", "meanpool"}
    curve = out["overoptimisation"]["nearid_prior"]
    assert curve["steps"] == [0, 20, 40] and curve["truth_peak_step"] == 20 and curve["truth_end"] == 0.55


def test_merge_recomputes_the_intervals_from_the_merged_subjects(tmp_path: Path) -> None:
    subjects = [_subject(i, seed=10 + i) for i in range(6)]
    paths = []
    for name, part in (("a", subjects[:3]), ("b", subjects[3:])):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"per_subject": part, "seconds": 5.0, "settings": {}}))
        paths.append(str(path))
    merged = main(["--merge", *paths, "--json", str(tmp_path / "m.json"), "--n_resamples", "300"])
    expected = summarise(subjects, 5.0, n_resamples=300)
    assert merged["subjects"] == 6 and merged["intervals"] == expected["intervals"]
    half = summarise(subjects[:3], 5.0, n_resamples=300)
    assert merged["intervals"]["base_truth"] != half["intervals"]["base_truth"]
    assert json.loads((tmp_path / "m.json").read_text())["intervals"] == json.loads(json.dumps(merged["intervals"]))
    with pytest.raises(SystemExit, match="more than one run"):
        main(["--merge", paths[0], paths[0], "--n_resamples", "10"])


def test_overoptimisation_figure_is_drawn_from_the_summary(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image
    from plot_overoptimisation import plot

    summary = summarise([_subject(i, seed=i, curve=True) for i in range(2)], 1.0, n_resamples=20)
    png = plot(summary, tmp_path / "images" / "overoptimisation.png")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 2 * image.height
    with pytest.raises(SystemExit, match="no 'overoptimisation' curves"):
        plot({"overoptimisation": {}}, tmp_path / "none.png")


def _goal_summary() -> dict[str, Any]:
    """A hand-made summary that meets every goal of the study."""
    return {
        "paired": {"spearman_nearid_minus_meanpool": {"mean": 0.08, "low": 0.01, "high": 0.15},
                   "spearman_nearid_minus_frozen": {"mean": 0.02, "low": 0.005, "high": 0.04}},
        "unseen_kinds": {"leaveout": {"spearman_unseen": 0.8, "regret_unseen": 0.01, "ssr_unseen": 91.0},
                         "frozen": {"spearman_unseen": 0.7, "regret_unseen": 0.02, "ssr_unseen": 43.0}},
        "reward_nearid_gain": 0.12, "reward_meanpool_gain": 0.04,
        "reward_baselines": {"nearid": {"prompt_fidelity_before": 0.9, "prompt_fidelity_after": 0.86,
                                        "copy_rate_before": 0.1, "copy_rate_after": 0.1,
                                        "lookalike_rate_after": 0.05}},
        "overoptimisation": {"nearid_prior": {"truth_peak": 0.8, "truth_end": 0.79, "truth_early_stop": 0.8}},
        "overfit_arm": {"overfit_drop": 0.2, "regret": {"copy_guard": 0.04}, "copy_signal_recall": 0.8},
        "seconds": 7000.0, "intervals": {"reward_nearid_gain": [0.08, 0.16]},
    }


@pytest.mark.parametrize("change", [
    ("paired", "spearman_nearid_minus_meanpool", "low", -0.01),     # interval touches 0
    ("paired", "spearman_nearid_minus_meanpool", "mean", 0.04),     # below 0.05
    ("paired", "spearman_nearid_minus_frozen", "low", -0.001),
    ("unseen_kinds", "leaveout", "spearman_unseen", 0.69),
    ("unseen_kinds", "leaveout", "regret_unseen", 0.021),
    ("unseen_kinds", "leaveout", "ssr_unseen", 43.0),
    (None, None, "reward_nearid_gain", 0.099),
    (None, None, "reward_meanpool_gain", 0.0601),                   # 0.12 < 2 x 0.0601
    ("reward_baselines", "nearid", "prompt_fidelity_after", 0.849),
    ("reward_baselines", "nearid", "copy_rate_after", 0.11),
    ("reward_baselines", "nearid", "lookalike_rate_after", 0.051),
    ("overoptimisation", "nearid_prior", "truth_end", 0.779),
    ("overoptimisation", "nearid_prior", "truth_early_stop", 0.779),
    (None, "overfit_arm", "overfit_drop", 0.149),
    ("overfit_arm", "regret", "copy_guard", 0.051),
    (None, "overfit_arm", "copy_signal_recall", 0.79),
    (None, None, "seconds", 7201.0),
])
def test_goals_are_met_exactly_at_their_bars_and_missed_beyond(change: tuple[Any, ...]) -> None:
    assert [r["met"] for r in goals(_goal_summary())] == [True] * 16
    summary = _goal_summary()
    outer, inner, key, value = change
    target = summary if outer is None else summary[outer]
    target = target if inner is None else target[inner]
    target[key] = value
    rows = goals(summary)
    assert sum(r["met"] is False for r in rows) == 1, [r["goal"] for r in rows if not r["met"]]


def test_goals_not_measured_are_not_met_or_missed() -> None:
    rows = goals({"paired": {}, "seconds": 60.0})
    assert [r["met"] for r in rows][:-1] == [None] * 15 and rows[-1]["met"] is True
    assert goals(_goal_summary())[4]["interval"] is None and goals(_goal_summary())[5]["interval"] == [0.08, 0.16]


def test_subject_level_intervals_depend_only_on_each_subjects_measured_figures() -> None:
    """``intervals_subjects`` resamples subjects only: shuffling the samples inside a subject (same figures as
    measured) leaves it unchanged, while the two-level ``intervals`` see the shuffle; it brackets linear means."""
    subjects = [_subject(i, seed=30 + i) for i in range(5)]
    out = summarise(subjects, 1.0, n_resamples=300)
    shuffled = json.loads(json.dumps(subjects))
    for s in shuffled:  # the same permutation for every render of the subject keeps every figure as measured
        n = len(s["base"]["samples"]["truth"])
        order = np.random.default_rng(s["subject"]["index"]).permutation(n)
        for measure in [s["base"], *s["checkpoints"], s["reward"]["before"],
                        *[k["after_prior"] for k in s["reward"]["kinds"].values()]]:
            measure["samples"] = {k: [v[i] for i in order] for k, v in measure["samples"].items()}
    again = summarise(shuffled, 1.0, n_resamples=300)
    def close(a: dict[str, list[float]], b: dict[str, list[float]]) -> bool:  # equal up to summation order
        return a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=1e-12, equal_nan=True) for k in a)

    assert close(again["intervals_subjects"], out["intervals_subjects"])
    assert not close(again["intervals"], out["intervals"])
    assert set(out["paired_subjects"]) == set(PAIRED)
    for key in ("base_truth", "best_truth", "reward_nearid_gain"):
        low, high = out["intervals_subjects"][key]
        assert low <= out[key] <= high


def test_best_checkpoint_attributes_read_the_oracle_best_checkpoint() -> None:
    attrs = ("shape", "primary", "secondary", "pattern", "part")

    def row(truth: float, rates: tuple[float, ...]) -> dict[str, Any]:
        return {"truth": truth, **{f"match_{a}": r for a, r in zip(attrs, rates)}}

    first = {"subject": {"index": 3}, "checkpoints": [row(0.4, (1, 1, 0, 0, 0)), row(0.8, (1, 1, 1, 1, 0)),
                                                       row(0.6, (1, 1, 1, 0, 0))]}
    second = {"subject": {"index": 7}, "checkpoints": [row(1.0, (1, 1, 1, 1, 1)), row(1.0, (0, 0, 0, 0, 0))]}
    unmeasured = {"subject": {"index": 9}, "checkpoints": [{"truth": 0.5}]}
    out = bench.best_checkpoint_attributes([first, second, unmeasured])
    assert out["per_subject"] == {"3": dict(zip(attrs, (1.0, 1.0, 1.0, 1.0, 0.0))),
                                  "7": dict.fromkeys(attrs, 1.0)}  # a tie keeps the first checkpoint
    assert out["mean"] == {"shape": 1.0, "primary": 1.0, "secondary": 1.0, "pattern": 1.0, "part": 0.5}
    assert bench._missed(out["per_subject"]["3"]) == "part 0.00"
    assert bench._missed(out["per_subject"]["7"]) == "none"
    assert bench._missed(None) == "-"
