"""The copy signal (``context_copy_fraction``) and the copy guard of the validator, the selector and the CLIs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from integrations import dreambooth
from nearid_reward import CheckpointSelector, IdentityValidator, PromptSet, ReferenceSet, RenderConfig, SelectionConfig
from nearid_reward.cli import select
from nearid_reward.metrics import context_copy_scores, identity_metrics, metric_names
from nearid_reward.references import embed_images, embed_images_with_context
from nearid_reward.rendering import render_validation_set
from nearid_reward.selection import copy_guarded_order
from nearid_reward.testing import random_images, tiny_nearid_model
from nearid_reward.testing.pipelines import add_lora_adapter, build_tiny_sd_pipeline, write_lora_checkpoints
from train_head.batching import mean_pool


def _unit(rows: list[list[float]]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows), dim=-1)


def test_context_copy_scores_hand_worked():
    # three photos of one place: cosines ref0-ref1 0.8, ref0-ref2 0.6, ref1-ref2 0.96 (all unit vectors)
    refs = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.6, 0.8, 0.0]])
    # leave-one-out means: ref0 (0.8 + 0.6) / 2 = 0.7, ref1 (0.8 + 0.96) / 2 = 0.88, ref2 (0.6 + 0.96) / 2 = 0.78
    images = torch.tensor([[1.0, 0.0, 0.0],  # a copy of ref0: mean cosine (1 + 0.8 + 0.6) / 3 = 0.8
                           [0.0, 0.0, 1.0],  # another place: 0
                           [0.0, 1.0, 0.0]])  # (0 + 0.6 + 0.8) / 3 = 0.4667
    expected = torch.tensor([0.8 - 0.7, 0.0 - 0.7, 1.4 / 3 - 0.7])
    assert torch.allclose(context_copy_scores(images, refs), expected, atol=1e-6)


def test_metrics_flag_copies_of_the_references_and_not_varied_samples():
    refs = _unit([[1.0, 0.1, 0.0, 0.0], [1.0, 0.0, 0.1, 0.0], [1.0, 0.0, 0.0, 0.1]])  # one place, small changes
    identity = _unit([[0.0, 1.0, 0.0, 0.0]] * 3)
    references = ReferenceSet(identity, contexts=refs)
    copies = refs[[0, 1, 2, 0]]
    varied = _unit([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.3, 1.0, 1.0, 0.0]])
    emb = identity[[0, 0, 0, 0]]
    assert identity_metrics(emb, references, contexts=copies)["context_copy_fraction"] == 1.0
    assert identity_metrics(emb, references, contexts=varied)["context_copy_fraction"] == 0.0
    half = torch.cat([copies[:2], varied[:2]])
    assert identity_metrics(emb, references, contexts=half)["context_copy_fraction"] == 0.5
    assert "context_copy_fraction" not in identity_metrics(emb, references)  # only when asked for
    # the margin: a scene 0.1 below the band is a copy with the default margin 0.2, not with 0.05
    band = float(min((refs[i] @ torch.cat([refs[:i], refs[i + 1:]]).T).mean() for i in range(3)))
    near = F.normalize(refs.mean(0, keepdim=True), dim=-1)  # mean cosine to the references m
    m = float((near @ refs.T).mean())
    assert m - band > 0  # the mean of one place is inside its band; move it 0.1 below by mixing in another axis
    t = torch.linspace(0, 1, 2001)[:, None]
    mixes = F.normalize((1 - t) * near + t * torch.tensor([[0.0, 0.0, 0.0, 1.0]]), dim=-1)
    excess = context_copy_scores(mixes, refs)
    below = mixes[int((excess - (-0.1)).abs().argmin())][None]
    assert float(context_copy_scores(below, refs)) == pytest.approx(-0.1, abs=1e-3)
    assert identity_metrics(emb[:1], references, contexts=below)["context_copy_fraction"] == 1.0
    assert identity_metrics(emb[:1], references, contexts=below, context_margin=0.05)["context_copy_fraction"] == 0.0
    with pytest.raises(ValueError, match="context features"):
        identity_metrics(emb, ReferenceSet(identity), contexts=copies)
    assert "context_copy_fraction" in metric_names() and "context_copy_fraction" not in metric_names(contexts=False)
    assert metric_names()["context_copy_fraction"].higher_is_better is False


def test_reference_contexts_are_the_mean_pooled_tokens_of_the_same_pass():
    model = tiny_nearid_model()
    images = torch.rand(5, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    emb, contexts = embed_images_with_context(model, images, chunk_size=2)
    with torch.no_grad():
        tokens, mask = model.encode_tokens(model.prepare(images))
    assert torch.allclose(emb, embed_images(model, images), atol=1e-6)
    assert torch.allclose(contexts, mean_pool(tokens, mask), atol=1e-6)  # the mean-pool baseline of the same tokens
    refs = ReferenceSet.from_images(model, images[:3])
    assert refs.has_contexts and torch.allclose(refs.contexts, contexts[:3], atol=1e-6)
    refs.set_references(emb[3:])  # new references: the old context features no longer describe them
    assert not refs.has_contexts


def _one_place(seed: int, count: int) -> torch.Tensor:
    """``count`` images of one scene with a little noise each: [count, 3, 32, 32] in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    scene = torch.rand(1, 3, 32, 32, generator=g)
    return (scene + 0.02 * torch.randn(count, 3, 32, 32, generator=g)).clamp(0, 1)


def test_validator_copy_guard_keeps_a_copying_validation_from_being_best():
    model = tiny_nearid_model()
    refs = _one_place(1, 3)
    others = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    guarded = IdentityValidator(model, refs, copy_guard=0.5, prefix="")
    plain = IdentityValidator(model, refs, prefix="")
    logged = {}
    for name, validator in (("guarded", guarded), ("plain", plain)):
        first = validator.validate(others, step=100)
        second = validator.validate(refs[[0, 1, 2, 0]], step=200)  # the references themselves: the best score
        assert second["identity_mean"] > first["identity_mean"]
        logged[name] = first, second
    first, second = logged["guarded"]
    assert first["context_copy_fraction"] == 0.0 and second["context_copy_fraction"] == 1.0
    assert not second["is_best"] and logged["plain"][1]["is_best"]
    assert guarded.best_step == 100 and guarded.validations_without_improvement == 1
    assert plain.best_step == 200 and "context_copy_fraction" not in plain.history[-1]
    assert "context_copy_fraction" in guarded.metric_names() and "context_copy_fraction" not in plain.metric_names()
    with pytest.raises(ValueError, match="copy_guard must be in"):
        IdentityValidator(model, refs, copy_guard=1.5)
    with pytest.raises(ValueError, match="context features of >= 2 references"):
        IdentityValidator(model, ReferenceSet(model.embed(refs)), copy_guard=0.5)


def test_copy_guarded_order_hand_worked():
    rows = [
        {"step": 100, "identity_mean": 0.50, "context_copy_fraction": 0.00},
        {"step": 200, "identity_mean": 0.80, "context_copy_fraction": 0.25},
        {"step": 300, "identity_mean": 0.95, "context_copy_fraction": 0.75},  # best score, copies
        {"step": 400, "identity_mean": 0.99, "context_copy_fraction": 1.00},  # copies most
        {"step": 500, "identity_mean": 0.80, "context_copy_fraction": 0.50},  # at the bar: not flagged
    ]
    assert copy_guarded_order(rows, threshold=0.5) == [1, 4, 0, 2, 3]
    assert copy_guarded_order(rows, threshold=1.0) == [3, 2, 1, 4, 0]  # nothing flagged: by score, ties by step
    assert copy_guarded_order(rows, mode="min", threshold=0.5) == [0, 1, 4, 2, 3]
    assert copy_guarded_order(rows[2:4], threshold=0.5) == [0, 1]  # all flagged: the least copying first
    with pytest.raises(ValueError, match="lack a number"):
        copy_guarded_order([{"identity_mean": 0.5}])


def test_selector_with_copy_guard_ranks_by_the_guarded_rule(tmp_path):
    # The tiny random pipeline draws nearly the same picture whatever the adapter (2 sampler steps from the same
    # noise), so every checkpoint "copies" the references here; the exact copy (checkpoint-200) must be flagged with
    # fraction 1.0, the order must follow copy_guarded_order on the selector's own rows, and a guard of 1.0 (flag
    # nothing) must give the plain ranking.
    prompts = PromptSet(["a photo of sks dog", "a sks dog on the beach", "sks dog in the snow"])
    render = RenderConfig(num_inference_steps=2, guidance_scale=1.0, render_class=False, render_base=False)
    pipe = build_tiny_sd_pipeline(seed=0)
    add_lora_adapter(pipe.unet, rank=4, seed=3, b_std=0.3)
    refs = render_validation_set(pipe, prompts, config=render).images  # what checkpoint-200 renders exactly
    write_lora_checkpoints(tmp_path / "out", pipe, {100: 0.5, 200: 1.0, 300: 0.0})
    model = tiny_nearid_model()
    validator = IdentityValidator(model, refs, prefix="", aggregate="max", copy_guard=0.5)

    def run(guard: float | None):
        config = SelectionConfig(render=render, copy_guard=guard, plot=False)
        return CheckpointSelector(build_tiny_sd_pipeline(seed=0), validator, prompts, config=config).run(
            tmp_path / "out")

    guarded = run(0.5)
    rows = {r["name"]: r for r in guarded.rows}
    assert rows["checkpoint-200"]["context_copy_fraction"] == 1.0 and rows["checkpoint-200"]["copy_flagged"]
    assert all(r["copy_flagged"] == (r["context_copy_fraction"] > 0.5) for r in guarded.rows)
    order = copy_guarded_order(guarded.rows, monitor="identity_mean", mode="max", threshold=0.5)
    assert order == list(range(len(guarded.rows)))  # the rows come back in the guarded order
    assert [r["name"] for r in run(1.0).rows] == [r["name"] for r in run(None).rows]  # nothing flagged: plain
    plain = IdentityValidator(model, refs, prefix="")
    with pytest.raises(ValueError, match="needs the copy signal"):
        CheckpointSelector(pipe, plain, prompts, config=SelectionConfig(render=render, copy_guard=0.5)).run(
            tmp_path / "out")


def test_selector_ranks_a_flagged_best_checkpoint_below_the_clean_ones():
    # The end-to-end test above cannot tell the guard from the plain ranking (every tiny checkpoint copies); here
    # the selector's ranking step gets rows that differ: the best identity copies, so the guard must pass it over.
    rows = [
        {"name": "checkpoint-100", "step": 100, "identity_mean": 0.40, "context_copy_fraction": 0.00},
        {"name": "checkpoint-200", "step": 200, "identity_mean": 0.55, "context_copy_fraction": 0.25},
        {"name": "checkpoint-300", "step": 300, "identity_mean": 0.90, "context_copy_fraction": 0.75},
    ]
    pipe = build_tiny_sd_pipeline(seed=0)
    validator = IdentityValidator(tiny_nearid_model(), random_images(3, 32, seed=1), prefix="", copy_guard=0.5)
    prompts = PromptSet(["a photo of sks dog"])

    def ranked(guard: float | None) -> list[str]:
        selector = CheckpointSelector(pipe, validator, prompts, config=SelectionConfig(copy_guard=guard, plot=False))
        return [r["name"] for r in selector._rank(rows).rows]

    assert ranked(None) == ["checkpoint-300", "checkpoint-200", "checkpoint-100"]
    assert ranked(0.5) == ["checkpoint-200", "checkpoint-100", "checkpoint-300"]  # the copying best goes last


def test_cli_flags():
    required = ["--output_dir", "o", "--pretrained_model_name_or_path", "p", "--nearid_model", "m",
                "--nearid_reference_dir", "r"]
    assert select.parse_args([*required, "--copy_guard", "0.5"]).selection_config().copy_guard == 0.5
    with pytest.raises(ValueError, match="--copy_guard must be in"):
        select.parse_args([*required, "--copy_guard", "2"])
    launcher = ["--script", "s.py", "--nearid_model", "m", "--nearid_reference_dir", "r"]
    assert dreambooth.parse_options([*launcher, "--nearid_copy_guard", "0.25"]).nearid_copy_guard == 0.25
    with pytest.raises(ValueError, match="--nearid_copy_guard must be in"):
        dreambooth.parse_options([*launcher, "--nearid_copy_guard", "-0.1"])
