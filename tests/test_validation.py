"""IdentityValidator: metrics against hand computation, crash-safe history, best tracking, early stop, trackers."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from nearid_reward import IdentityReward, IdentityValidator, NearIDModel, ReferenceSet, ValidationConfig
from nearid_reward.files import read_jsonl
from nearid_reward.metrics import METRICS, identity_metrics, metric_names
from nearid_reward.testing import random_images, save_tiny_nearid
from nearid_reward.validation import image_grid


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return NearIDModel.from_pretrained(save_tiny_nearid(tmp_path_factory.mktemp("nearid")))


@pytest.fixture
def refs():
    return random_images(4, 48, seed=11)


def _emb(model, images):
    with torch.no_grad():
        return model.embed(images)


def test_metrics_match_hand_computation(model, refs):
    validator = IdentityValidator(model, refs, threshold=0.95, copy_margin=0.0)
    images = torch.cat([refs[:1], random_images(3, 48, seed=3)])  # first generation is an exact copy of ref 0
    class_images = random_images(2, 48, seed=5)
    base_images = random_images(4, 48, seed=6)
    m = validator.compute(images, class_images=class_images, base_images=base_images)  # names, no prefix

    e, r = _emb(model, images), _emb(model, refs)
    s = (e @ r.T).mean(1)
    oracle = np.mean([float(np.mean([r[i] @ r[j] for j in range(4) if j != i])) for i in range(4)])
    assert m["identity_mean"] == pytest.approx(float(s.mean()), abs=1e-5)
    assert m["identity_min"] == pytest.approx(float(s.min()), abs=1e-5)
    assert m["identity_max"] == pytest.approx(float(s.max()), abs=1e-5)
    assert m["reference_oracle"] == pytest.approx(oracle, abs=1e-5)
    assert m["relative_mean"] == pytest.approx(float(s.mean()) / oracle, abs=1e-5)
    assert m["frac_above_threshold"] == pytest.approx(float((s >= 0.95 * oracle).float().mean()))
    # copy suspicion, written out with loops: closer to some reference than that reference's nearest other one
    flags = []
    for g in e:
        flags.append(any(float(g @ r[i]) > max(float(r[i] @ r[j]) for j in range(4) if j != i) for i in range(4)))
    assert flags[0] is True
    assert m["copy_fraction"] == pytest.approx(sum(flags) / 4)
    c = _emb(model, class_images)
    assert m["class_leakage_mean"] == pytest.approx(float((c @ r.T).mean()), abs=1e-5)
    b = _emb(model, base_images)
    assert m["base_identity_mean"] == pytest.approx(float((b @ r.T).mean()), abs=1e-5)
    assert m["identity_gain"] == pytest.approx(float(s.mean() - (b @ r.T).mean(1).mean()), abs=1e-5)
    assert m["base_similarity"] == pytest.approx(float((e * b).sum(1).mean()), abs=1e-5)
    assert m["num_images"] == 4.0
    assert all(isinstance(v, float) for v in m.values())


def test_adapter_that_changes_nothing_is_visible(model, refs):
    validator = IdentityValidator(model, refs)
    images = random_images(3, 48, seed=2)
    m = validator.compute(images, base_images=images.clone())
    assert m["identity_gain"] == pytest.approx(0.0, abs=1e-6)
    assert m["base_similarity"] == pytest.approx(1.0, abs=1e-5)


def test_negatives_and_shared_reward(model, refs):
    reward = IdentityReward(model, refs, negatives=random_images(2, 48, seed=40), aggregate="max")
    validator = IdentityValidator(reward, prefix="")
    images = random_images(2, 48, seed=41)
    m = validator.compute(images)
    out = reward.score(images)
    assert m["identity_mean"] == pytest.approx(float(out.identity.mean()), abs=1e-6)
    assert m["reward_mean"] == pytest.approx(float(out.reward.mean()), abs=1e-6)
    assert m["negative_max_mean"] == pytest.approx(float(out.negative.mean()), abs=1e-6)
    with pytest.raises(ValueError, match="differs from the reward's aggregate"):
        IdentityValidator(reward, aggregate="mean")
    with pytest.raises(ValueError, match="not to the validator"):
        IdentityValidator(reward, refs)


def test_reward_validator_and_reference_set_share_one_reference_set(model, refs):
    reward = IdentityReward(model, refs, negatives=random_images(2, 48, seed=40))
    validator = IdentityValidator(reward)
    assert validator.references is reward.references and validator.model is reward.model
    images = random_images(2, 48, seed=41)
    before = validator.compute(images)["identity_mean"]
    reward.set_references(random_images(3, 48, seed=42))  # replaced in place: every holder sees the new set
    assert validator.references.num_references == 3
    assert validator.compute(images)["identity_mean"] != pytest.approx(before, abs=1e-6)
    # a ReferenceSet built once serves a validator of the same model without embedding the photos again
    shared = ReferenceSet.from_images(model, refs)
    other = IdentityValidator(model, shared)
    assert other.references is shared
    torch.testing.assert_close(shared.references, IdentityReward(model, refs).reference_embeddings)
    with pytest.raises(ValueError, match="aggregates with 'mean' but RewardConfig.aggregate is 'max'"):
        IdentityReward(model, shared, aggregate="max")
    with pytest.raises(ValueError, match="differs from the ReferenceSet's aggregate"):
        IdentityValidator(model, shared, aggregate="max")
    with pytest.raises(ValueError, match="carries its own negatives"):
        IdentityValidator(model, shared, negatives=refs)
    with pytest.raises(ValueError, match=r"reference embeddings must be a tensor \[R, E\], got \(8,\)"):
        ReferenceSet(torch.ones(8))


def test_compute_embeds_and_scores_each_image_once(model, refs, monkeypatch):
    validator = IdentityValidator(model, refs)
    calls: list[int] = []
    original = ReferenceSet.scores
    monkeypatch.setattr(ReferenceSet, "scores", lambda self, e: calls.append(e.shape[0]) or original(self, e))
    validator.compute(random_images(3, 48, seed=1), class_images=random_images(2, 48, seed=2))
    assert calls == [3, 2]  # the generations once, the class images once
    assert validator.last_scores.shape == (3,)


@pytest.mark.parametrize("with_negatives", [False, True])
@pytest.mark.parametrize("num_refs", [1, 4])
def test_metric_names_declare_exactly_what_compute_returns(model, refs, num_refs, with_negatives):
    negatives = random_images(2, 48, seed=40) if with_negatives else None
    validator = IdentityValidator(model, refs[:num_refs], negatives=negatives)
    images = random_images(3, 48, seed=1)
    for class_images, base_images in [(None, None), (random_images(2, 48, seed=2), images.flip(-1))]:
        m = validator.compute(images, class_images=class_images, base_images=base_images)
        declared = validator.metric_names(class_images=class_images is not None, base_images=base_images is not None)
        assert list(m) == list(declared)
        assert set(m) <= set(metric_names()) == set(METRICS)
    assert METRICS["identity_mean"].higher_is_better is True
    assert METRICS["class_leakage_mean"].higher_is_better is False
    assert METRICS["copy_fraction"].higher_is_better is False
    assert METRICS["num_images"].higher_is_better is None


def test_prefix_only_when_logging(model, refs, tmp_path):
    validator = IdentityValidator(model, refs, history_path=tmp_path / "h.jsonl")
    images = random_images(2, 48, seed=1)
    computed = validator.compute(images)
    assert "identity_mean" in computed and not any(k.startswith("nearid/") for k in computed)
    logged = validator.validate(images, step=3, extra_metrics={"script/identity_mean": 0.25})
    assert logged["nearid/identity_mean"] == pytest.approx(computed["identity_mean"])
    assert logged["nearid/script/identity_mean"] == 0.25 and logged["nearid/is_best"] == 1.0
    record = read_jsonl(tmp_path / "h.jsonl")[0]
    assert record["nearid/identity_mean"] == logged["nearid/identity_mean"] and "identity_mean" not in record
    with pytest.warns(DeprecationWarning, match="unprefixed metric names: use 'identity_mean'"):
        assert computed["nearid/identity_mean"] == computed["identity_mean"]  # the former keys still read
    with pytest.raises(KeyError):
        computed["nearid/no_such_metric"]


def test_former_entry_points_warn_and_agree(model, refs):
    from nearid_reward.validation import identity_metrics as former_identity_metrics

    reward = IdentityReward(model, refs, negatives=random_images(2, 48, seed=40), negative_weight=0.5)
    emb = _emb(model, random_images(2, 48, seed=1))
    with pytest.warns(DeprecationWarning, match="identity_metrics\\(scorer, embeddings, ...\\) is deprecated"):
        former = former_identity_metrics(reward, emb, threshold=0.5)
    assert former == identity_metrics(emb, reward.references, threshold=0.5, negative_weight=0.5)
    assert former["reward_mean"] == pytest.approx(float(reward.score_embeddings(emb).reward.mean()), abs=1e-6)
    validator = IdentityValidator(model, refs)
    with pytest.warns(DeprecationWarning, match="validator.references"):
        scorer = validator.scorer
    assert scorer.references is validator.references and scorer.model is validator.model


def _sequence(validator, values):
    """Validate with images whose identity score is controlled: mix a reference with noise."""
    out = []
    for step, value in values:
        out.append(validator.validate(value, step=step))
    return out


@pytest.mark.parametrize("mode", ["max", "min"])
def test_best_tracking_both_modes_and_patience(model, refs, tmp_path, mode):
    close, far = refs[:2], random_images(2, 48, seed=77)
    v = IdentityValidator(model, refs, mode=mode, patience=2, history_path=tmp_path / "h.jsonl")
    s_close = v.compute(close)["identity_mean"]
    s_far = v.compute(far)["identity_mean"]
    assert s_close > s_far
    good, bad = (close, far) if mode == "max" else (far, close)
    v.validate(bad, step=10)
    assert v.best_step == 10 and v.last_is_best
    m = v.validate(good, step=20)
    assert v.best_step == 20 and m["nearid/is_best"] == 1.0
    v.validate(bad, step=30)
    assert v.best_step == 20 and not v.last_is_best and not v.should_stop
    v.validate(bad, step=40)
    assert v.should_stop and v.validations_without_improvement == 2
    v.validate(good, step=50)  # equal to the best is not an improvement
    assert v.best_step == 20
    assert [r["is_best"] for r in read_jsonl(tmp_path / "h.jsonl")] == [True, True, False, False, False]


def test_history_survives_a_crash_between_two_writes(model, refs, tmp_path):
    path = tmp_path / "identity_history.jsonl"
    v = IdentityValidator(model, refs, history_path=path, patience=3)
    v.validate(refs[:2], step=100)
    v.validate(random_images(2, 48, seed=9), step=200)
    with open(path, "a", encoding="utf-8") as handle:  # a crash in the middle of writing the third line
        handle.write('{"nearid/identity_mean": 0.5, "st')
    resumed = IdentityValidator(model, refs, history_path=path, patience=3)
    assert [r["step"] for r in resumed.history] == [100, 200]
    assert (resumed.best_step, resumed.best_value) == (v.best_step, v.best_value)
    assert resumed.validations_without_improvement == v.validations_without_improvement
    images = random_images(2, 48, seed=10)
    v.history_path = None  # the uninterrupted validator, kept as the reference, stops writing
    expected = v.validate(images, step=300)
    got = resumed.validate(images, step=300)
    assert got["nearid/is_best"] == expected["nearid/is_best"] and resumed.best_step == v.best_step
    assert resumed.validations_without_improvement == v.validations_without_improvement
    assert [r["step"] for r in read_jsonl(path)] == [100, 200, 300]
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4 and lines[2].startswith('{"nearid/identity_mean": 0.5, "st')  # torn line kept apart
    assert json.loads(lines[3])["step"] == 300  # the append after the crash started on a fresh line


def test_failed_history_append_is_not_recorded_in_memory(model, refs, tmp_path, monkeypatch):
    import errno
    import os

    path = tmp_path / "identity_history.jsonl"
    v = IdentityValidator(model, refs, history_path=path, patience=1)
    v.validate(random_images(2, 48, seed=77), step=100)  # far from the references (see the test above)
    before = path.read_bytes()
    state = (len(v.history), v.best_step, v.best_value, v.validations_without_improvement, v.last_is_best)
    real_write = os.write

    def disk_full(fd, data):  # half the line reaches the file, then the disk is full
        real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    with pytest.raises(OSError, match="No space left"):
        v.validate(refs[:2], step=200)  # would have been the new best
    monkeypatch.undo()
    assert path.read_bytes() == before  # cut back: no torn line
    assert (len(v.history), v.best_step, v.best_value, v.validations_without_improvement, v.last_is_best) == state
    assert not v.should_stop
    v.validate(refs[:2], step=300)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["step"] for line in lines] == [100, 300]
    resumed = IdentityValidator(model, refs, history_path=path, patience=1)
    assert v.best_step == 300 and (resumed.best_step, resumed.best_value) == (v.best_step, v.best_value)


def test_missing_monitor_is_warned_not_fatal(model, refs, caplog):
    v = IdentityValidator(model, refs, monitor="identity_gain")
    with caplog.at_level(logging.WARNING):
        m = v.validate(random_images(2, 48), step=1)  # no base images: no identity_gain
    assert "identity_gain" in caplog.text and v.best_step is None and "nearid/identity_mean" in m


def test_bad_input(model, refs):
    v = IdentityValidator(model, refs)
    nan = random_images(2, 32)
    nan[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="invalid `images`.*NaN"):
        v.validate(nan, step=1)
    with pytest.raises(ValueError, match="invalid `base_images`.*NaN"):
        v.compute(random_images(2, 32), base_images=nan)
    with pytest.raises(ValueError, match="`prompts` has 1 entries but `images` has 2"):
        v.validate(random_images(2, 32), step=1, prompts=["a"])
    with pytest.raises(ValueError, match="non-negative int"):
        v.validate(random_images(2, 32), step=-5)
    with pytest.raises(ValueError, match="`images` is empty"):
        v.compute([])
    with pytest.raises(ValueError, match="`references` is required"):
        IdentityValidator(model, None)
    with pytest.raises(ValueError, match="ValidationConfig.mode"):
        ValidationConfig(mode="best")
    with pytest.raises(TypeError, match="unknown options"):
        IdentityValidator(model, refs, monitr="x")
    assert v.history == []  # failed validations are not recorded


def test_image_grid_layout():
    images = torch.zeros(5, 3, 16, 20)
    images[4] = 1.0
    grid = image_grid(images, ["0.5"] * 5)
    assert grid.shape == (2 * 16, 3 * 20, 3) and grid.dtype == np.uint8
    assert grid[16 + 15, 20 + 19].tolist() == [255, 255, 255]  # bottom-right pixel of tile 4 (row 1, col 1)
    assert grid[15, 2 * 20 + 19].tolist() == [0, 0, 0]


def test_accelerator_logging_at_true_step_and_early_stop_trigger(model, refs, tmp_path):
    pytest.importorskip("tensorboard")
    from accelerate import Accelerator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accelerator = Accelerator(log_with="tensorboard", project_dir=str(tmp_path), cpu=True)
    accelerator.init_trackers("run")
    v = IdentityValidator(model, refs, accelerator=accelerator, patience=1, history_path=tmp_path / "h.jsonl")
    v.validate(refs[:2], step=7, prompts=["a photo of sks dog", "sks dog on the beach"])
    assert not accelerator.check_trigger()
    v.validate(random_images(2, 48, seed=3), step=15)  # worse: patience 1 is used up
    assert v.should_stop and accelerator.check_trigger()
    accelerator.end_training()

    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    scalars = events.Scalars("nearid/identity_mean")
    assert [e.step for e in scalars] == [7, 15]
    assert scalars[0].value == pytest.approx(v.history[0]["nearid/identity_mean"], abs=1e-6)
    images = events.Images("nearid/validation")
    assert [e.step for e in images] == [7, 15]
    assert (images[0].height, images[0].width) == (48, 2 * 48)  # a 1x2 grid of 48 px tiles
    texts = events.Tensors("nearid/validation_captions/text_summary")
    caption = texts[0].tensor_proto.string_val[0].decode()
    assert "a photo of sks dog" in caption and f"{v.history[0]['nearid/identity_max']:.3f}" in caption


def test_scored_images_reach_tensorboard_and_a_failing_tracker_is_only_logged(tmp_path, caplog):
    pytest.importorskip("tensorboard")
    from accelerate import Accelerator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nearid_reward.results import log_scored_images

    accelerator = Accelerator(log_with="tensorboard", project_dir=str(tmp_path))
    accelerator.init_trackers("run")
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    log_scored_images(accelerator, images, [0.1, 0.2, 0.3, 0.4, 0.5], None, step=7, tag="nearid/validation",
                      value_range=(-1.0, 1.0), max_images=4)

    class Broken:
        name = "wandb"

        def log(self, *args, **kwargs):
            raise RuntimeError("tracker down")

        def finish(self):
            pass

    accelerator.trackers.append(Broken())
    log_scored_images(accelerator, images, [0.1] * 5, ["p"] * 5, step=8, tag="t")
    accelerator.end_training()
    found = []
    for file in tmp_path.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(file), size_guidance={"images": 0})
        acc.Reload()
        found += [(e.step, e.width, e.height) for e in acc.Images("nearid/validation")] \
            if "nearid/validation" in acc.Tags()["images"] else []
    assert (7, 2 * 16, 2 * 16) in found  # 4 of the 5 images, in a 2x2 grid
    assert "could not log validation images to the wandb tracker" in caplog.text


def test_record_keeps_a_line_of_scores_made_elsewhere_out_of_best_tracking(model, refs, tmp_path):
    """A validation whose prompt set could not be rendered keeps its line (the script's own scores), neither best
    nor counted against patience, and the best found before survives a resume."""
    path = tmp_path / "h.jsonl"
    v = IdentityValidator(model, refs, history_path=path, patience=1)
    v.validate(refs[:2], step=10)
    logged = v.record({"script/identity_mean": 0.25}, step=20, source="validation")
    assert logged == {"nearid/script/identity_mean": 0.25}
    assert (v.best_step, v.validations_without_improvement, v.should_stop) == (10, 0, False)
    lines = read_jsonl(path)
    assert [(r["step"], r["is_best"]) for r in lines] == [(10, True), (20, False)]
    assert lines[1]["source"] == "validation" and "nearid/identity_mean" not in lines[1]
    resumed = IdentityValidator(model, refs, history_path=path, patience=1)
    assert (resumed.best_step, resumed.best_value) == (10, v.best_value)
    with pytest.raises(ValueError, match="`step` must be a non-negative int"):
        v.record({"script/identity_mean": 0.25}, step=-1)
