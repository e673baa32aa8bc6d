"""The overfitting arm's pieces (nearid_world.overfit), by hand: useful identity, the selectors' picks, the summary."""

from __future__ import annotations

import math

import pytest

from nearid_world.evaluate import make_subject
from nearid_world.overfit import selector_picks, summarise_overfit, useful_identity


def test_useful_identity_hand_worked():
    # prompted snow / night / night / beach; shown snow (kept), beach (copy: 0), night (kept), night (0)
    truth = [1.0, 0.8, 0.6, 0.4]
    shown = ["snow", "beach", "night", "night"]
    prompted = ["snow", "night", "night", "beach"]
    assert useful_identity(truth, shown, prompted) == pytest.approx((1.0 + 0.6) / 4)
    assert useful_identity([0.2], ["grass"], ["grass"]) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="equally many"):
        useful_identity([1.0], ["snow", "snow"], ["snow"])


def test_single_context_subject_shares_one_place(tmp_path):
    one = make_subject(41, tmp_path / "one", single_context=True)
    three = make_subject(41, tmp_path / "three")
    assert one.contexts == [three.contexts[0]] * 3 and len(set(three.contexts)) == 3
    assert one.identity == three.identity and one.lookalike == three.lookalike
    assert len(list(one.instance_dir.glob("*.png"))) == 3


def _row(useful: float, copy_rate: float, nearid: float, frozen: float, meanpool: float, signal: float,
         copy_fraction: float = 0.0) -> dict:
    return {"useful_identity": useful, "copy_rate": copy_rate,
            "selection": {"nearid": nearid, "frozen": frozen, "meanpool": meanpool, "identity_mean": nearid,
                          "context_copy_fraction": signal, "copy_fraction": copy_fraction}}


# Subject A: useful identity peaks at checkpoint 1 (0.6) and falls as the run copies the training place.
A = [_row(0.2, 0.0, 0.30, 0.50, 0.40, 0.00),
     _row(0.6, 0.1, 0.50, 0.60, 0.50, 0.25),
     _row(0.4, 0.6, 0.70, 0.55, 0.80, 0.75, copy_fraction=1.0),  # copies; NearID and mean pool like it best
     _row(0.1, 0.9, 0.60, 0.40, 0.90, 1.00)]
# Subject B: no copying; the last checkpoint is the best.
B = [_row(0.3, 0.0, 0.40, 0.40, 0.40, 0.00),
     _row(0.5, 0.2, 0.60, 0.70, 0.50, 0.25),
     _row(0.7, 0.3, 0.55, 0.50, 0.60, 0.50)]


def test_selector_picks_hand_worked():
    assert selector_picks(A) == {"nearid": 2, "frozen": 1, "meanpool": 3, "last": 3, "copy_guard": 1}
    assert selector_picks(B) == {"nearid": 1, "frozen": 1, "meanpool": 2, "last": 2, "copy_guard": 1}
    assert selector_picks(A, guard=1.0)["copy_guard"] == 2  # a guard that flags nothing picks as NearID does


def _result(rows: list[dict], index: int) -> dict:
    useful = [r["useful_identity"] for r in rows]
    picks = selector_picks(rows)
    return {"subject": {"index": index}, "trained_context": "snow", "checkpoints": rows,
            "useful_identity_best": max(useful), "useful_identity_last": useful[-1],
            "regret": {k: max(useful) - useful[i] for k, i in picks.items()}}


def test_summarise_overfit_hand_worked():
    summary = summarise_overfit([_result(A, 40), _result(B, 41)], seed=3)
    # regrets: A nearid 0.2, frozen 0, meanpool 0.5, last 0.5, copy_guard 0; B 0.2, 0.2, 0, 0, 0.2
    expected = {"nearid": 0.2, "frozen": 0.1, "meanpool": 0.25, "last": 0.25, "copy_guard": 0.1}
    assert summary["regret"] == pytest.approx(expected)
    assert summary["useful_identity_best"] == pytest.approx(0.65)
    assert summary["useful_identity_last"] == pytest.approx(0.4)
    assert summary["overfit_drop"] == pytest.approx(0.25)
    # copy rate > 0.5: A's checkpoints 2 and 3, both with context_copy_fraction above the guard 0.4 -> recall 1.0;
    # of the five others only B's last (0.5) is above it: one false alarm in five; none with a guard of 0.5
    assert summary["copying_checkpoints"] == 2
    assert summary["copy_signal_recall"] == 1.0 and summary["copy_signal_false_alarms"] == pytest.approx(0.2)
    assert summarise_overfit([_result(A, 40), _result(B, 41)], guard=0.5)["copy_signal_false_alarms"] == 0.0
    assert summary["copy_fraction_recall"] == 0.5  # today's NearID-space signal flags only checkpoint 2
    low, high = summary["intervals"]["regret_meanpool"]
    assert 0.0 <= low <= 0.25 <= high <= 0.5  # the mean of two subjects' 0.5 and 0.0, resampled
    assert summary["intervals"] == summarise_overfit([_result(A, 40), _result(B, 41)], seed=3)["intervals"]
    assert [s["subject"] for s in summary["per_subject"]] == [40, 41]
    only_b = summarise_overfit([_result(B, 41)])
    assert math.isnan(only_b["copy_signal_recall"]) and only_b["copying_checkpoints"] == 0
    with pytest.raises(ValueError, match="at least one"):
        summarise_overfit([])
