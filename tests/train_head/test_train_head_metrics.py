"""SSR / PA / MTG metrics on hand-worked examples (including the spec's "17 trials vs 14 trials" case)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from train_head.metrics import (
    fisher_z_mean,
    mtg_metrics,
    mtg_oracle,
    nearid_margins,
    nearid_metrics,
    pearson,
    pool_metrics,
    similarity_profile,
)

E = np.eye(4)


def _three_samples():
    """A: all six margins win; B: 2 of 6 win, mean margin exactly 0 (a loss); C: 2 views, 1 of 2 wins, mean wins."""
    pos = np.zeros((3, 3, 4))
    neg = np.zeros((3, 3, 4))
    pos[0] = [E[0], E[0], E[0]]
    neg[0] = [E[1], E[1], E[1]]
    pos[1] = [E[0], E[0], E[1]]
    neg[1] = [E[2], E[2], E[1]]
    pos[2, 0], pos[2, 1] = E[0], 0.6 * E[0] + 0.8 * E[1]
    neg[2, 0], neg[2, 1] = 0.8 * E[0] + 0.6 * E[1], E[2]
    pos_mask = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0]], dtype=bool)
    neg_mask = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0]], dtype=bool)
    return pos, neg, pos_mask, neg_mask


def test_margins_by_hand():
    pos, neg, pm, nm = _three_samples()
    margins, terms = nearid_margins(pos, neg, pm, nm)
    assert terms == [(0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 2), (1, 2, 1), (1, 2, 2)]
    np.testing.assert_allclose(margins[0], [1, 1, 1, 1, 1, 1])
    np.testing.assert_allclose(margins[1], [1, 1, 0, -1, 0, -1], atol=1e-12)
    np.testing.assert_allclose(margins[2, :2], [-0.2, 0.6], atol=1e-12)
    assert np.isnan(margins[2, 2:]).all()


def test_ssr_pa_paper_convention_17_vs_14_trials():
    pos, neg, pm, nm = _three_samples()
    m = nearid_metrics(torch.tensor(pos), torch.tensor(neg), torch.tensor(pm), torch.tensor(nm))
    assert m["n_samples"] == 3
    assert m["pair_trials"] == 14 and m["pa_trials"] == 17  # 6 + 6 + 2 pairwise trials, + one mean-win per sample
    assert m["pair_wins"] == 9 and m["mean_wins"] == 2 and m["ssr_wins"] == 1
    assert m["ssr"] == pytest.approx(100 / 3)
    assert m["pa"] == pytest.approx(100 * 11 / 17)
    assert m["pa_pairwise"] == pytest.approx(100 * 9 / 14)
    assert m["ssr_mean"] == pytest.approx(200 / 3)
    assert m["hm"] == pytest.approx(2 * m["ssr"] * m["pa"] / (m["ssr"] + m["pa"]))


def test_strict_threshold_and_missing_distractor():
    pos = np.array([[E[0], E[0]]])
    neg = np.array([[E[0], E[1]]])  # view 0's distractor is identical to the view: margin exactly 0 -> a loss
    m = nearid_metrics(pos, neg)
    assert m["pair_wins"] == 1 and m["pair_trials"] == 2 and m["ssr"] == 0.0
    # without that distractor the remaining single term wins and SSR is 100
    m2 = nearid_metrics(pos, neg, neg_mask=np.array([[False, True]]))
    assert m2["pair_trials"] == 1 and m2["ssr"] == 100.0


def test_samples_without_valid_terms_are_not_counted():
    pos, neg, pm, nm = _three_samples()
    pos = np.concatenate([pos, pos[:1]])
    neg = np.concatenate([neg, neg[:1]])
    pm = np.concatenate([pm, [[True, False, False]]])  # one view only: no cross-view pair
    nm = np.concatenate([nm, [[True, True, True]]])
    assert nearid_metrics(pos, neg, pm, nm)["n_samples"] == 3
    empty = nearid_metrics(pos[:1], neg[:1], np.array([[True, False, False]]))
    assert empty["n_samples"] == 0 and math.isnan(empty["ssr"])


def test_pooling_is_a_micro_average():
    pos, neg, pm, nm = _three_samples()
    a = nearid_metrics(pos[:1], neg[:1], pm[:1], nm[:1])  # 1 sample, SSR 100
    b = nearid_metrics(pos[1:], neg[1:], pm[1:], nm[1:])  # 2 samples, SSR 0
    pooled = pool_metrics([a, b])
    whole = nearid_metrics(pos, neg, pm, nm)
    for key in ("ssr", "pa", "pa_pairwise", "n_samples", "pa_trials"):
        assert pooled[key] == pytest.approx(whole[key])
    assert pooled["ssr"] != pytest.approx((a["ssr"] + b["ssr"]) / 2)  # not the macro average
    with pytest.raises(ValueError, match="count keys"):
        pool_metrics([{"ssr": 1.0}])


def test_nearid_metrics_input_errors():
    with pytest.raises(ValueError, match=r"`pos` must be \[N, V, D\]"):
        nearid_metrics(np.zeros((2, 4)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="`neg` must have the shape"):
        nearid_metrics(np.zeros((2, 3, 4)), np.zeros((2, 2, 4)))
    with pytest.raises(ValueError, match="`pos_mask` must have shape"):
        nearid_metrics(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)), pos_mask=np.ones((2, 2)))


def test_mtg_oracle():
    obj = np.zeros((4, 4))
    obj[:2] = 1  # 8 object pixels
    part = np.zeros((4, 4))
    part[0, :2] = 255  # 2 part pixels
    assert mtg_oracle(obj, part) == pytest.approx(0.75)
    assert mtg_oracle(None, part) == 0.0
    assert mtg_oracle(np.zeros((4, 4)), part) == 0.0


def test_pearson_and_fisher_z():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    y = np.array([1.0, 3.0, 2.0, 5.0])
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert pearson(x, np.ones(4)) == 0.0  # undefined -> 0
    assert pearson([1.0, np.nan, 3.0, 4.0], [2.0, 5.0, 6.0, 8.0]) == pytest.approx(
        np.corrcoef([1.0, 3.0, 4.0], [2.0, 6.0, 8.0])[0, 1])
    assert fisher_z_mean([0.5, 0.5]) == pytest.approx(0.5)
    assert fisher_z_mean([1.0, 0.0]) == pytest.approx(math.tanh(math.atanh(0.999) / 2))


def _unit(theta):
    return np.array([math.cos(theta), math.sin(theta), 0.0])


def test_mtg_metrics_by_hand():
    # I1 = I2 direction per sample; edits rotated by known angles so every cosine is cos(angle).
    angles1 = np.array([0.2, 0.5, 0.9, 1.2])  # s11' = cos(angle1)
    angles2 = np.array([0.3, 0.1, 1.0, 0.05])
    s12_angle = np.array([0.25, 0.3, 0.1, 0.1])  # I2 rotated from I1
    i1 = np.stack([_unit(0.0)] * 4)
    i2 = np.stack([_unit(t) for t in s12_angle])
    e1 = np.stack([_unit(-t) for t in angles1])
    e2 = np.stack([_unit(s + t) for s, t in zip(s12_angle, angles2)])
    o1 = np.array([0.9, 0.6, 0.4, 0.1])
    o2 = np.array([0.8, 0.95, 0.3, 0.99])
    m = mtg_metrics(i1, i2, e1, e2, o1, o2)
    s11, s22 = np.cos(angles1), np.cos(angles2)
    s12e = np.cos(s12_angle + angles2)  # cos(I1, I2')
    s21e = np.cos(s12_angle + angles1)  # cos(I2, I1')
    r = [np.corrcoef(s11, o1)[0, 1], np.corrcoef(s22, o2)[0, 1], np.corrcoef(s12e, o2)[0, 1],
         np.corrcoef(s21e, o1)[0, 1]]
    assert [m["r1"], m["r2"], m["r3"], m["r4"]] == pytest.approx(r)
    assert m["m_o"] == pytest.approx(math.tanh(np.mean(np.arctanh(r))))
    assert m["m_opair"] == pytest.approx(math.tanh(np.mean(np.arctanh(r[:2]))))
    # margins win when the I1-I2 angle is smaller than the edit angle: sample 0 (.25 vs .2 | .3) wins 1,
    # sample 1 (.3 vs .5 | .1) wins 1, sample 2 (.1 vs .9 | 1.0) wins 2, sample 3 (.1 vs 1.2 | .05) wins 1
    assert m["pa"] == pytest.approx(100 * 5 / 8)
    assert m["ssr"] == pytest.approx(25.0)
    assert m["n_samples"] == 4 and m["pa_trials"] == 8
    # a NaN embedding drops that sample's margins
    i1n = i1.copy()
    i1n[3] = np.nan
    assert mtg_metrics(i1n, i2, e1, e2, o1, o2)["n_samples"] == 3


def test_similarity_profile_by_hand_and_against_a_loop():
    pos = np.zeros((2, 3, 4))
    neg = np.zeros((2, 3, 4))
    pos[0], neg[0] = [E[0], E[0], E[1]], [E[2], E[0], E[1]]
    pos[1], neg[1] = [E[3], E[3], E[0]], [E[3], E[2], E[0]]
    pm = np.array([[1, 1, 1], [1, 1, 0]], dtype=bool)  # sample 1's third view and distractor are missing
    nm = pm.copy()
    prof = similarity_profile(pos, neg, pm, nm)
    assert prof["positive"] == pytest.approx(4 / 8)  # sample 0: 2 of 6 ordered pairs are 1; sample 1: 2 of 2
    assert prof["same_context_distractor"] == pytest.approx(3 / 5)  # 0, 1, 1 and 1, 0
    assert prof["other_context_distractor"] == pytest.approx(2 / 8)  # P0.N1 in sample 0, P1.N0 in sample 1
    assert prof["other_identity"] == pytest.approx(0.0)  # E0/E1 views vs E3 views (the masked E0 is left out)

    rng = np.random.default_rng(0)
    pos, neg = rng.normal(size=(5, 3, 6)), rng.normal(size=(5, 3, 6))
    pm, nm = rng.random((5, 3)) > 0.2, rng.random((5, 3)) > 0.2
    unit = lambda x: x / np.linalg.norm(x)  # noqa: E731
    sums = {k: [] for k in prof}
    for a in range(5):
        for i in range(3):
            for j in range(3):
                if pm[a, i] and nm[a, j]:
                    key = "same_context_distractor" if i == j else "other_context_distractor"
                    sums[key].append(unit(pos[a, i]) @ unit(neg[a, j]))
                if i != j and pm[a, i] and pm[a, j]:
                    sums["positive"].append(unit(pos[a, i]) @ unit(pos[a, j]))
                for b in range(5):
                    if b != a and pm[a, i] and pm[b, j]:
                        sums["other_identity"].append(unit(pos[a, i]) @ unit(pos[b, j]))
    got = similarity_profile(torch.tensor(pos), torch.tensor(neg), torch.tensor(pm), torch.tensor(nm))
    for key, values in sums.items():
        assert got[key] == pytest.approx(np.mean(values)), key
    with pytest.raises(ValueError, match="`neg` must have the shape"):
        similarity_profile(pos, neg[:, :2])
