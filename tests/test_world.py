"""The personalisation world: scenes, the shipped world model and oracle, and the benchmark's quick path."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from nearid_world import scenes
from nearid_world.evaluate import EvalSet, WorldAssets, load_world_pipeline
from nearid_world.oracle import AttributeOracle, lookalike_hits, true_identity

ROOT = Path(__file__).resolve().parents[1]
ASSETS = WorldAssets()


# ---------------------------------------------------------------------------------------------- scenes
def test_world_has_every_combination_once() -> None:
    everything = scenes.all_identities()
    assert len(everything) == 5 * 6 * 5 * 4 * 4
    assert len(set(everything)) == len(everything)


def test_held_out_identities_are_seeded_prefixes() -> None:
    assert scenes.held_out_identities(8) == scenes.held_out_identities(48)[:8]
    assert scenes.held_out_identities(8, seed=1) != scenes.held_out_identities(8)


def test_sample_identity_never_draws_an_excluded_one() -> None:
    banned = scenes.all_identities()[:-3]  # only three identities left
    rng = np.random.default_rng(0)
    drawn = {scenes.sample_identity(rng, banned) for _ in range(50)}
    assert drawn <= set(scenes.all_identities()[-3:])


@pytest.mark.parametrize("attribute", scenes.NEAR_ATTRIBUTES)
def test_near_identity_changes_exactly_one_attribute(attribute: str) -> None:
    rng = np.random.default_rng(1)
    for ident in scenes.held_out_identities(10):
        other = scenes.near_identity(ident, attribute, rng)
        changed = [a for a in scenes.IDENTITY_ATTRIBUTES if getattr(other, a) != getattr(ident, a)]
        assert changed == [attribute]
        assert other.primary != other.secondary


def test_every_world_word_is_one_token() -> None:
    from nearid_reward.testing.pipelines import build_clip_tokenizer

    # "an" before "cyan" and "red" inside "checkered": plain left-to-right merges split the later words
    tokenizer = build_clip_tokenizer(scenes.VOCABULARY, model_max_length=20)
    for word in scenes.VOCABULARY:
        assert tokenizer.convert_ids_to_tokens(tokenizer(word).input_ids)[1:-1] == [f"{word}</w>"], word
    longest = "a photo of a sks magenta and yellow checkered triangle with an antenna on the night"
    assert len(tokenizer(longest).input_ids) <= 20


def test_identity_rejects_unknown_names_and_equal_colours() -> None:
    with pytest.raises(ValueError, match="Identity.shape"):
        scenes.Identity("blob", "red", "blue", "plain", "hat")
    with pytest.raises(ValueError, match="secondary must differ"):
        scenes.Identity("star", "red", "red", "plain", "hat")


def test_prompt_names_the_kept_attributes() -> None:
    ident = scenes.Identity("star", "red", "blue", "striped", "antenna")
    assert scenes.prompt_for(ident, "beach") == "a red and blue striped star with an antenna on the beach"
    assert scenes.prompt_for(ident, None, keep={"shape": False, "primary": False, "part": False}) == "a striped object"
    assert scenes.prompt_for(None, "snow", token="sks") == "a sks object on the snow"


def test_distractor_view_differs_from_the_view_only_on_the_object() -> None:
    ident = scenes.Identity("square", "green", "magenta", "checkered", "hat")
    other = scenes.near_identity(ident, "primary", np.random.default_rng(0))
    ctx = scenes.view_context("grass", np.random.default_rng(3))
    a = scenes.render_view(ident, "grass", np.random.default_rng(5), ctx=ctx).astype(int)
    b = scenes.render_view(other, "grass", np.random.default_rng(5), ctx=ctx).astype(int)
    differs = np.abs(a - b).sum(-1) > 0
    assert 0.05 < differs.mean() < 0.5  # the body changed colour; the background is the same
    assert not differs[:, :3].any()  # the left border is background only


# ---------------------------------------------------------------------------------------------- truth
def test_true_identity_counts_matching_attributes() -> None:
    subject = scenes.Identity("star", "red", "blue", "striped", "hat")
    predicted = {"shape": "star", "primary": "red", "secondary": "green", "pattern": "plain", "part": "hat",
                 "context": "beach"}
    assert true_identity(predicted, subject) == pytest.approx(3 / 5)
    assert true_identity({**predicted, "secondary": "blue", "pattern": "striped"}, subject) == 1.0


def test_lookalike_hits_reads_the_changed_attribute() -> None:
    subject = scenes.Identity("star", "red", "blue", "striped", "hat")
    lookalike = scenes.Identity("star", "red", "blue", "checkered", "hat")
    predicted = {"shape": "circle", "primary": "red", "secondary": "blue", "pattern": "checkered", "part": "hat",
                 "context": "snow"}
    assert lookalike_hits(predicted, lookalike, subject)
    assert not lookalike_hits({**predicted, "pattern": "striped"}, lookalike, subject)
    with pytest.raises(ValueError, match="exactly one attribute"):
        lookalike_hits(predicted, subject, subject)


def test_spearman_matches_scipy() -> None:
    from scipy.stats import spearmanr

    from nearid_world.personalise import spearman

    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.normal(size=9).round(1).tolist(), rng.normal(size=9).round(1).tolist()
        assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert math.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


# ---------------------------------------------------------------------------------------------- shipped models
@pytest.fixture(scope="module")
def oracle() -> AttributeOracle:
    return AttributeOracle.from_pretrained(ASSETS.oracle)


def test_shipped_oracle_reads_fresh_renders(oracle: AttributeOracle) -> None:
    rng = np.random.default_rng(424242)  # seeds the oracle never trained on
    idents, contexts, images = [], [], []
    for _ in range(120):
        ident = scenes.sample_identity(rng)
        context = list(scenes.CONTEXTS)[int(rng.integers(4))]
        idents.append(ident)
        contexts.append(context)
        images.append(scenes.render_view(ident, context, rng))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    predicted = oracle.predict(pixels)
    for name in scenes.IDENTITY_ATTRIBUTES:
        accuracy = np.mean([p[name] == getattr(i, name) for p, i in zip(predicted, idents)])
        assert accuracy >= 0.9, (name, accuracy)
    assert np.mean([p["context"] == c for p, c in zip(predicted, contexts)]) >= 0.95


def test_shipped_oracle_config_records_held_out_accuracy() -> None:
    meta = json.loads((ASSETS.oracle / "oracle_config.json").read_text())
    assert set(meta["held_out_accuracy"]) == set(scenes.ATTRIBUTES)
    assert min(meta["held_out_accuracy"].values()) >= 0.95  # the oracle's goal, on its 2000 held-out renders


def test_shipped_world_model_draws_the_prompted_colour_and_context(oracle: AttributeOracle) -> None:
    from nearid_reward.rendering import RenderConfig, render_images

    pipe = load_world_pipeline(ASSETS)
    colours = list(scenes.COLOURS)
    contexts = list(scenes.CONTEXTS)
    prompts, wanted = [], []
    for i in range(12):
        colour, context = colours[i % 6], contexts[i % 4]
        prompts.append(f"a {colour} circle on the {context}")
        wanted.append((colour, context))
    images = render_images(pipe, prompts, seeds=list(range(12)),
                           config=RenderConfig(num_inference_steps=15, guidance_scale=4.0, batch_size=12))
    assert images.shape == (12, 3, 32, 32)
    predicted = oracle.predict(images)
    colour_hits = np.mean([p["primary"] == c for p, (c, _) in zip(predicted, wanted)])
    context_hits = np.mean([p["context"] == c for p, (_, c) in zip(predicted, wanted)])
    shape_hits = np.mean([p["shape"] == "circle" for p in predicted])
    assert colour_hits >= 0.5, colour_hits  # chance: 1/6
    assert context_hits >= 0.6, context_hits  # chance: 1/4
    assert shape_hits >= 0.5, shape_hits  # chance: 1/5


class _Autoencoder(torch.nn.Module):
    """``encode(x).latent_dist.mean`` / ``decode(z).sample`` like AutoencoderKL: the identity, or a flat grey."""

    def __init__(self, flat: bool) -> None:
        super().__init__()
        self.flat = flat
        self.weight = torch.nn.Parameter(torch.zeros(1))  # gives the device and dtype

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=torch.zeros_like(z) if self.flat else z)


def test_autoencoder_ceiling_reads_the_reconstructions(oracle: AttributeOracle) -> None:
    from nearid_world.evaluate import autoencoder_ceiling

    perfect = autoencoder_ceiling(_Autoencoder(flat=False), oracle, count=64, batch_size=24)
    assert min(perfect.values()) >= 0.95  # the oracle reads renders themselves (its goal: >= 0.95 per attribute)
    grey = autoencoder_ceiling(_Autoencoder(flat=True), oracle, count=64, batch_size=24)
    # one grey image for all 64 views: one reading, so each attribute is right only where the views agree with it
    assert grey["all_identity_attributes"] <= 0.05 and grey["shape"] <= 0.5 and grey["context"] <= 0.5
    with pytest.raises(ValueError, match="count"):
        autoencoder_ceiling(_Autoencoder(flat=False), oracle, count=0)


def test_eval_set_is_fixed() -> None:
    a, b = EvalSet(per_context=2), EvalSet(per_context=2)
    assert a.prompts() == b.prompts() and a.seeds() == b.seeds()
    assert a.prompts()[0] == "a sks object on the beach" and len(set(a.seeds())) == 8


# ---------------------------------------------------------------------------------------------- build scripts
def test_world_model_script_builds_a_loadable_pipeline(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from nearid_world.world_model import main

    out = tmp_path / "world"
    assert main(["--output_dir", str(out), "--num_images", "64", "--vae_steps", "2", "--unet_steps", "2",
                 "--batch_size", "4", "--vae_batch_size", "4", "--unet_channels", "16", "32", "--threads", "1"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(out), use_safetensors=True)
    assert pipe.unet.dtype == torch.float32  # stored as float16, loads as float32
    assert pipe.tokenizer("a sks object").input_ids == [pipe.tokenizer.bos_token_id,
                                                         *pipe.tokenizer.convert_tokens_to_ids(["a</w>", "sks</w>",
                                                                                                "object</w>"]),
                                                         pipe.tokenizer.eos_token_id]
    info = json.loads((out / "world_model_config.json").read_text())
    assert info["config"]["unet_steps"] == 2 and "denoiser" in info["seconds"]


def test_leave_out_head_trains_on_the_shipped_backbone_without_the_left_out_kinds(tmp_path: Path) -> None:
    import shutil

    from nearid_world.encoder import main

    out = tmp_path / "nearid"
    shutil.copytree(ASSETS.backbone, out / "backbone")
    before = (out / "backbone" / "model.safetensors").read_bytes()
    assert main(["--output_dir", str(out), "--work_dir", str(tmp_path / "work"), "--head_name", "head_lo",
                 "--leave_out", "part", "secondary", "--num_identities", "40", "--head_steps", "2",
                 "--batch_size", "8"]) == 0
    trained = json.loads((tmp_path / "work" / "run_head_lo" / "train_config.json").read_text())
    assert [Path(d).name for d in trained["distractors"]] == ["shape", "primary", "pattern"]
    assert [Path(d).name for d in trained["val_distractors"]] == ["shape", "primary", "pattern"]
    info = json.loads((out / "head_lo_config.json").read_text())
    assert info["config"]["leave_out"] == ["part", "secondary"]
    for head in ("frozen", "nearid"):  # evaluated on every kind, the unseen ones included
        assert set(info["held_out_test_identities"][head]) == {*scenes.NEAR_ATTRIBUTES, "pooled"}
    assert json.loads((out / "head_lo" / "nearid_config.json").read_text())["backbone"] == "../backbone"
    assert (out / "backbone" / "model.safetensors").read_bytes() == before  # the backbone is not retrained


def test_encoder_rejects_bad_leave_out_and_head_names(tmp_path: Path) -> None:
    from nearid_world.encoder import EncoderConfig, train_head_only

    with pytest.raises(ValueError, match="leave_out must name kinds of .*got \\['colour'\\]"):
        EncoderConfig(leave_out=["colour"])
    with pytest.raises(ValueError, match="keep at least one distractor kind"):
        EncoderConfig(leave_out=list(scenes.NEAR_ATTRIBUTES))
    with pytest.raises(FileNotFoundError, match="needs a trained backbone"):
        train_head_only(tmp_path, "head_lo", EncoderConfig())


def test_backbone_pretraining_rejects_an_unknown_world() -> None:
    from train_head.synthetic_backbone import BackbonePretrainConfig

    with pytest.raises(ValueError, match="world must be one of"):
        BackbonePretrainConfig(world="nowhere")


# ---------------------------------------------------------------------------------------------- benchmark
def test_benchmark_quick_path_end_to_end(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_personalisation import PAIRED, main

    out = tmp_path / "json" / "bench.json"
    report = main(["--quick", "--out", str(tmp_path / "work"), "--json", str(out), "--steps", "20",
                   "--checkpointing_steps", "10", "--per_context", "1", "--inference_steps", "6",
                   "--reward_steps", "2", "--curve_steps", "4", "--curve_every", "2", "--no_prior_run",
                   "--n_resamples", "50", "--overfit_steps", "20", "--overfit_checkpointing_steps", "10"])
    saved = json.loads(out.read_text())
    assert saved["subjects"] == report["subjects"] == 1
    subject = saved["per_subject"][0]
    assert [r["step"] for r in subject["checkpoints"]] == [10, 20]
    for key in ("selection_regret_nearid", "selection_regret_frozen", "selection_regret_last"):
        assert 0.0 <= saved[key] <= 1.0
    for key in ("base_truth", "best_truth", "reward_finetune_truth_before", "reward_finetune_truth_after",
                "penalty_lookalike_rate_before", "penalty_lookalike_rate_after"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved["best_truth"] == max(r["truth"] for r in subject["checkpoints"])
    # the selectors score other renders than the truth's: same prompts, other seeds, 4 samples each
    row = subject["checkpoints"][0]
    assert len(row["samples"]["truth"]) == len(row["selection"]["samples"]["nearid"]) == 4
    assert row["samples"]["nearid"] != row["selection"]["samples"]["nearid"]
    picked = max(subject["checkpoints"], key=lambda r: r["selection"]["nearid"])
    assert subject["picked_step"]["nearid"] == picked["step"]
    # the reward run starts from the checkpoint NearID ranks first
    assert subject["reward_finetune"]["init_step"] == subject["picked_step"]["nearid"]
    # the launcher scored every checkpoint with NearID during training
    assert {r["step"] for r in subject["launcher_history"] if r.get("source") == "checkpoint"} >= {10, 20}
    # every averaged figure has an interval around it
    intervals = saved["intervals"]
    wanted = {"spearman_nearid_vs_truth", "selection_regret_nearid", "base_truth", "reward_nearid_gain"}
    assert wanted <= set(intervals)
    for key, (low, high) in intervals.items():
        if not math.isnan(saved[key]) and key.startswith(("base_", "best_", "reward_", "selection_")):
            assert low <= saved[key] + 1e-9 and saved[key] <= high + 1e-9, key
    assert set(saved["paired"]) == set(PAIRED)
    for value in saved["paired"].values():
        assert set(value) == {"mean", "low", "high"}
    unseen = saved["unseen_kinds"]
    assert unseen["left_out"] == ["part", "secondary"]
    assert 0 <= unseen["leaveout"]["ssr_unseen"] <= 100 and 0 <= unseen["frozen"]["ssr_seen"] <= 100
    for head in ("leaveout", "frozen"):
        assert {"ssr_seen", "ssr_unseen", "spearman_seen", "spearman_unseen"} <= set(unseen[head])
    baselines = saved["reward_baselines"]
    assert set(baselines) == {"nearid", "frozen", "meanpool"}
    for kind, figures in baselines.items():
        assert len(figures) == 8 and all(0.0 <= v <= 1.0 for v in figures.values()), kind
        assert figures["truth_before"] == baselines["nearid"]["truth_before"]  # the same starting checkpoint
    curves = saved["overoptimisation"]
    assert set(curves) == {"nearid_prior", "frozen_prior", "meanpool_prior"}
    for curve in curves.values():
        assert curve["steps"] == [0, 2, 4]
        assert len(curve["proxy"]) == len(curve["truth"]) == len(curve["steps"])
    # the curve's step 2 is the reward baseline's "after"
    assert curves["nearid_prior"]["truth"][1] == pytest.approx(baselines["nearid"]["truth_after"])
    # the overfitting arm: checkpoints 10 and 20 of a one-place run, every selector's regret on useful identity
    arm, arm_subject = saved["overfit_arm"], subject["overfit"]
    assert [r["step"] for r in arm_subject["checkpoints"]] == [10, 20]
    assert set(arm["regret"]) == {"nearid", "frozen", "meanpool", "last", "copy_guard"}
    useful = [r["useful_identity"] for r in arm_subject["checkpoints"]]
    assert arm["useful_identity_best"] == max(useful) and arm["useful_identity_last"] == useful[-1]
    for selector, regret in arm["regret"].items():
        assert 0.0 <= regret <= arm["useful_identity_best"], selector


def test_class_images_never_leave_a_torn_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Study processes share the class-image folder: a crash mid-save leaves no half-written PNG that a later
    run would count and read."""
    from PIL import Image

    import nearid_reward.rendering
    from nearid_reward.rendering import RenderConfig
    from nearid_world.personalise import class_images

    monkeypatch.setattr(nearid_reward.rendering, "render_images",
                        lambda pipe, prompts, seeds, config: torch.rand(len(prompts), 3, 8, 8))
    real_save = Image.Image.save

    def torn_save(self: Image.Image, fp: Any, format: str | None = None, **kw: Any) -> None:
        fp.write(b"\x89PNG partial")  # some bytes reach the file, then the process dies
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        class_images(None, tmp_path / "classes", RenderConfig(), count=2)
    assert [p.name for p in (tmp_path / "classes").iterdir()] == []
    monkeypatch.setattr(Image.Image, "save", real_save)
    folder = class_images(None, tmp_path / "classes", RenderConfig(), count=2)
    assert sorted(p.name for p in folder.iterdir()) == ["class0.png", "class1.png"]
    for p in folder.iterdir():
        Image.open(p).load()
