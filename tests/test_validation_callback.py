"""Rendering from a diffusers pipeline and NearIDValidationCallback: seeds, base model, mode restoration,
offloading, identity_scores.json, the best adapter outside checkpoint pruning, and never killing the run."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from nearid_reward import IdentityValidator, NearIDModel, NearIDValidationCallback, PromptSet, RenderConfig
from nearid_reward.callback import save_pipeline_adapter
from nearid_reward.rendering import has_active_adapter, render_images, render_validation_set
from nearid_reward.testing import random_images, save_tiny_nearid
from nearid_reward.testing.pipelines import (
    LORA_WEIGHT_NAME,
    add_lora_adapter,
    build_tiny_sd_pipeline,
    write_lora_checkpoint,
)

PROMPTS = PromptSet(["a photo of {token} {class}", "a {} on the beach"], ["a photo of a {class}"])
RENDER = RenderConfig(num_inference_steps=2, guidance_scale=1.0, batch_size=4)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return NearIDModel.from_pretrained(save_tiny_nearid(tmp_path_factory.mktemp("nearid")))


@pytest.fixture
def refs():
    return random_images(3, 64, seed=11)


@pytest.fixture
def lora_pipe():
    pipe = build_tiny_sd_pipeline(seed=0)
    add_lora_adapter(pipe.unet, rank=4, seed=1, b_std=0.3)
    return pipe


def test_prompt_sets(tmp_path):
    default = PromptSet.default()
    assert len(default.instance) >= 4 and len(default.class_prompts) >= 2 and default.has_placeholders
    filled = default.fill("sks", "dog")
    assert not filled.has_placeholders and all("sks dog" in p for p in filled.instance)
    assert all("sks" not in p and "dog" in p for p in filled.class_prompts)
    assert PROMPTS.fill("zwx", "toy").instance == ["a photo of zwx toy", "a zwx toy on the beach"]
    no_class = default.fill("sks", "")
    assert no_class.class_prompts == [] and no_class.instance[0] == "a photo of sks"
    text = tmp_path / "prompts.txt"
    text.write_text("# comment\na photo of {}\n\n{token} in the snow\n", encoding="utf-8")
    assert PromptSet.load(text).instance == ["a photo of {}", "{token} in the snow"]
    js = tmp_path / "prompts.json"
    js.write_text(json.dumps(PROMPTS.to_dict()), encoding="utf-8")
    assert PromptSet.load(js) == PROMPTS
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        PromptSet.load(tmp_path / "missing.json")
    js.write_text("{broken", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        PromptSet.load(js)
    with pytest.raises(ValueError, match="PromptSet.instance is empty"):
        PromptSet([])
    with pytest.raises(ValueError, match="placeholders"):
        render_validation_set(build_tiny_sd_pipeline(), PROMPTS, config=RENDER)


def test_render_seeded_paired_with_base_and_restores_state(lora_pipe):
    pipe = lora_pipe
    pipe.unet.train()  # a training loop's modes: the UNet trains, the rest is frozen in eval mode
    pipe.text_encoder.eval()
    pipe.vae.eval()
    seen_modes = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a: seen_modes.append(m.training))
    lora = [p for n, p in pipe.unet.named_parameters() if "lora_" in n]
    lora[0].requires_grad_(False)  # a trainer's own choice of trainable tensors must survive
    flags = [p.requires_grad for p in lora]
    prompts = PROMPTS.fill("sks", "dog")
    rendered = render_validation_set(pipe, prompts, config=RENDER)
    hook.remove()
    assert seen_modes and not any(seen_modes)  # rendered in eval mode
    assert pipe.unet.training and not pipe.text_encoder.training and not pipe.vae.training
    assert all(m.training for m in pipe.unet.modules())
    assert [p.requires_grad for p in lora] == flags
    assert has_active_adapter(pipe)
    assert rendered.images.shape == (2, 3, 64, 64) and rendered.class_images.shape == (1, 3, 64, 64)
    assert rendered.seeds == [10**8, 10**8 + 1] and rendered.prompts == prompts.instance
    # the base images are exactly what the same weights render without the adapter
    plain = build_tiny_sd_pipeline(seed=0)
    expected_base = render_images(plain, prompts.instance, seeds=rendered.seeds, config=RENDER)
    torch.testing.assert_close(rendered.base_images, expected_base, atol=1e-5, rtol=0)
    assert (rendered.images - rendered.base_images).abs().mean() > 1e-3  # the adapter matters
    # per-image generators: the batch size does not change the images
    one_by_one = render_images(pipe, prompts.instance, seeds=rendered.seeds,
                               config=RenderConfig(num_inference_steps=2, guidance_scale=1.0, batch_size=1))
    torch.testing.assert_close(one_by_one, rendered.images, atol=1e-5, rtol=0)
    assert not has_active_adapter(plain) and render_validation_set(plain, prompts, config=RENDER).base_images is None


def test_render_with_model_cpu_offload(lora_pipe):
    prompts = PROMPTS.fill("sks", "dog")
    before = render_validation_set(lora_pipe, prompts, config=RENDER)
    lora_pipe.enable_model_cpu_offload(device="cpu")
    after = render_validation_set(lora_pipe, prompts, config=RENDER)
    torch.testing.assert_close(after.images, before.images, atol=1e-5, rtol=0)
    torch.testing.assert_close(after.base_images, before.base_images, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="same length"):
        render_images(lora_pipe, ["a"], seeds=[1, 2], config=RENDER)


def test_on_validation_with_pipeline_keeps_best_adapter(model, refs, lora_pipe, tmp_path):
    validator = IdentityValidator(model, refs, history_path=tmp_path / "identity_history.jsonl")
    callback = NearIDValidationCallback(validator, output_dir=tmp_path, prompts=PROMPTS, class_noun="dog",
                                        render=RENDER)
    metrics = callback.on_validation(lora_pipe, 10)
    for key in ("identity_mean", "identity_gain", "base_similarity", "class_leakage_mean", "copy_fraction"):
        assert f"nearid/{key}" in metrics
    assert metrics["nearid/base_similarity"] < 1.0
    best = tmp_path / "best_identity"
    assert (best / LORA_WEIGHT_NAME).is_file()
    saved = json.loads((best / "identity_scores.json").read_text())
    assert saved["step"] == 10 and saved["best_step"] == 10 and saved["source"] == "pipeline"
    # the saved file is the live adapter: a fresh pipeline that loads it renders the same images
    fresh = build_tiny_sd_pipeline(seed=0)
    fresh.load_lora_weights(str(best), weight_name=LORA_WEIGHT_NAME)
    prompts = PROMPTS.fill("sks", "dog")
    seeds = RENDER.seeds(2)
    torch.testing.assert_close(render_images(fresh, prompts.instance, seeds=seeds, config=RENDER),
                               render_images(lora_pipe, prompts.instance, seeds=seeds, config=RENDER),
                               atol=1e-5, rtol=0)


def test_checkpoint_scores_and_best_outside_pruning(model, refs, lora_pipe, tmp_path):
    validator = IdentityValidator(model, refs)
    callback = NearIDValidationCallback(validator, output_dir=tmp_path)
    close, far = refs[:2], random_images(2, 64, seed=50)
    assert validator.compute(close)["identity_mean"] > validator.compute(far)["identity_mean"]
    write_lora_checkpoint(tmp_path / "checkpoint-100", lora_pipe, scale=1.0)
    write_lora_checkpoint(tmp_path / "checkpoint-200", lora_pipe, scale=0.5)
    write_lora_checkpoint(tmp_path / "checkpoint-300", lora_pipe, scale=0.25)
    best_bytes = (tmp_path / "checkpoint-100" / LORA_WEIGHT_NAME).read_bytes()

    callback.on_validation(close, 100)
    path = callback.on_checkpoint(tmp_path, 100)
    assert json.loads(path.read_text())["best_step"] == 100
    assert (tmp_path / "best_identity" / LORA_WEIGHT_NAME).read_bytes() == best_bytes

    callback.on_validation(far, 200)
    scores = json.loads(callback.on_checkpoint(tmp_path / "checkpoint-200", 200).read_text())  # hook style
    assert scores["validation_step"] == 200 and scores["best_step"] == 100
    assert scores["metrics"]["is_best"] is False
    shutil.rmtree(tmp_path / "checkpoint-100")  # checkpoints_total_limit pruning the oldest checkpoint
    assert (tmp_path / "best_identity" / LORA_WEIGHT_NAME).read_bytes() == best_bytes

    # train_dreambooth.py order: the checkpoint is saved first, validation at the same step comes after
    scores = json.loads(callback.on_checkpoint(tmp_path, 300).read_text())
    assert scores["validation_step"] == 200
    scores_of_refs = validator.references.scores(validator.embed(refs))  # [R]
    top = refs[int(scores_of_refs.argmax())].expand(2, -1, -1, -1)  # beats the mean of any two references
    callback.on_validation(top, 300)  # best: the weights come from checkpoint-300
    kept = json.loads((tmp_path / "best_identity" / "identity_scores.json").read_text())
    assert kept["step"] == 300 and kept["source"].endswith("checkpoint-300")
    assert (tmp_path / "best_identity" / LORA_WEIGHT_NAME).read_bytes() == \
        (tmp_path / "checkpoint-300" / LORA_WEIGHT_NAME).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".best_identity")]  # no temporary leftovers


def test_callback_never_kills_the_run(model, refs, tmp_path, caplog):
    callback = NearIDValidationCallback(IdentityValidator(model, refs), output_dir=tmp_path)
    nan = random_images(2, 32)
    nan[0, 0, 0, 0] = float("nan")
    with caplog.at_level(logging.ERROR, logger="nearid_reward.callback"):
        assert callback.on_validation(nan, 5) is None
        assert callback.on_checkpoint(tmp_path, 5) is None  # no checkpoint-5 folder
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and all(r.exc_info is not None for r in errors)  # logged with the traceback
    assert "training continues" in errors[0].getMessage()
    assert isinstance(callback.last_error, FileNotFoundError)
    assert callback.on_validation(random_images(2, 32), 6) is not None  # the next validation works
    strict = NearIDValidationCallback(IdentityValidator(model, refs), output_dir=tmp_path, strict=True)
    with pytest.raises(ValueError, match="NaN"):
        strict.on_validation(nan, 5)
    with pytest.raises(FileNotFoundError, match="checkpoint-5"):
        strict.on_checkpoint(tmp_path, 5)
    with pytest.raises(ValueError, match="best_dir_name"):
        NearIDValidationCallback(IdentityValidator(model, refs), best_dir_name="checkpoint-best")


def test_callback_removes_what_a_killed_run_left_half_written(model, refs, tmp_path):
    import os
    import subprocess
    import sys

    from nearid_reward.files import _host_tag

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    (tmp_path / "checkpoint-4").mkdir()
    stale = [tmp_path / f".best_identity.tmp-{_host_tag()}-{child.pid}-0123abcd",
             tmp_path / "checkpoint-4" / f".identity_scores.json.tmp-{_host_tag()}-{child.pid}-0123abcd"]
    live = tmp_path / f".best_identity.tmp-{_host_tag()}-{os.getpid()}-0123abcd"
    stale[0].mkdir()
    live.mkdir()
    stale[1].write_text("{")
    NearIDValidationCallback(IdentityValidator(model, refs), output_dir=tmp_path)
    assert not any(p.exists() for p in stale) and live.exists()


def test_save_pipeline_adapter_full_model(tmp_path):
    pipe = build_tiny_sd_pipeline(seed=0)
    files = save_pipeline_adapter(pipe, tmp_path / "best")
    assert (tmp_path / "best" / "unet" / "config.json") in files
    from diffusers import UNet2DConditionModel

    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "best" / "unet")
    for (name, a), b in zip(pipe.unet.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_tiny_pipelines_round_trip_and_sdxl_base_rendering(tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from nearid_reward.testing.pipelines import (
        build_tiny_sdxl_pipeline,
        save_tiny_sd_pipeline,
        save_tiny_sdxl_pipeline,
    )

    prompts = PROMPTS.fill("sks", "dog")
    seeds = RENDER.seeds(2)
    built = render_images(build_tiny_sd_pipeline(seed=4), prompts.instance, seeds=seeds, config=RENDER)
    loaded = StableDiffusionPipeline.from_pretrained(save_tiny_sd_pipeline(tmp_path / "sd", seed=4))
    torch.testing.assert_close(render_images(loaded, prompts.instance, seeds=seeds, config=RENDER), built)
    words = [loaded.tokenizer.convert_tokens_to_ids(w + "</w>") for w in ("a", "photo", "of", "sks", "dog")]
    assert loaded.tokenizer("a photo of sks dog").input_ids[1:-1] == words  # one token per listed word
    xl = StableDiffusionXLPipeline.from_pretrained(save_tiny_sdxl_pipeline(tmp_path / "sdxl", seed=0))
    add_lora_adapter(xl.unet, rank=4, seed=2, b_std=0.3)
    dtypes = {p.dtype for p in xl.unet.parameters()}
    rendered = render_validation_set(xl, prompts, config=RENDER)
    assert {p.dtype for p in xl.unet.parameters()} == dtypes == {torch.float32}  # nothing was cast
    plain = render_images(build_tiny_sdxl_pipeline(seed=0), prompts.instance, seeds=seeds, config=RENDER)
    torch.testing.assert_close(rendered.base_images, plain, atol=1e-5, rtol=0)
    assert (rendered.images - rendered.base_images).abs().mean() > 1e-4


def test_render_scheduler_is_fixed_and_restored():
    """Renders stay comparable when a training script swaps its pipeline's scheduler (the diffusers scripts do)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    pipe = build_tiny_sd_pipeline(seed=0, scheduler="ddpm")
    ddpm = pipe.scheduler
    cfg = RenderConfig(num_inference_steps=3, scheduler="auto")
    a = render_images(pipe, ["a photo of sks dog"], seeds=[7], config=cfg)
    assert pipe.scheduler is ddpm  # swapped back
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(ddpm.config)  # what log_validation leaves behind
    b = render_images(pipe, ["a photo of sks dog"], seeds=[7], config=cfg)
    pipe.scheduler = DDIMScheduler.from_config(ddpm.config)
    c = render_images(pipe, ["a photo of sks dog"], seeds=[7], config=RenderConfig(num_inference_steps=3))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-6, rtol=0)
    as_is = render_images(pipe, ["a photo of sks dog"], seeds=[7],
                          config=RenderConfig(num_inference_steps=3, scheduler=None))
    pipe.scheduler = ddpm
    other = render_images(pipe, ["a photo of sks dog"], seeds=[7], config=RenderConfig(num_inference_steps=3))
    assert not torch.allclose(as_is, other)  # without a fixed scheduler the render depends on the pipeline's
    with pytest.raises(ValueError, match="not a diffusers scheduler"):
        render_images(pipe, ["x"], seeds=[0], config=RenderConfig(scheduler="NoSuchScheduler"))
