"""``nearid-dreambooth`` across the DreamBooth-LoRA families (SDXL, Flux, SD3, Sana, Qwen-Image, HiDream, Lumina2, and
a host that offloads inside its ``log_validation``).

Each run hosts a minimal script of ``tests/fixtures`` that reproduces its diffusers script's ``log_validation``
signature, pipeline construction (Qwen-Image's ``tokenizer=None, text_encoder=None`` and HiDream's four text
encoders left out included) and LoRA saving, over
a tiny random pipeline of that family. As in a real run, validations (end of each 3-step epoch: steps 3 and 5, then
the final one) do not fall on checkpoint steps (2 and 4).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from launcher_runs import run_dreambooth

from integrations import dreambooth
from integrations.host_pipelines import TextComponents, host_conditioning
from nearid_reward.files import read_jsonl
from nearid_reward.rendering import render_images
from nearid_reward.testing import save_tiny_nearid, write_random_images
from nearid_reward.testing.pipelines import (
    LORA_WEIGHT_NAME,
    build_tiny_flux_pipeline,
    save_tiny_pipeline,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SCRIPTS = {
    "sdxl": FIXTURES / "dreambooth_sdxl_minimal.py",
    "flux": FIXTURES / "dreambooth_flux_minimal.py",
    "hidream": FIXTURES / "dreambooth_hidream_minimal.py",
    "qwen_image": FIXTURES / "dreambooth_qwen_image_minimal.py",
    "sd3": FIXTURES / "dreambooth_sd3_minimal.py",
    "sana": FIXTURES / "dreambooth_sana_minimal.py",
    "lumina2": FIXTURES / "dreambooth_lumina2_minimal.py",
    "offload": FIXTURES / "dreambooth_offload_minimal.py",  # Flux2-klein / Z-Image shaped, over tiny Flux
}
FAMILY = {"qwen_image": "qwen_image", "sd3": "sd3", "sana": "sana", "lumina2": "lumina2", "offload": "flux",
          "sdxl": "sdxl", "flux": "flux_dev", "hidream": "hidream_hub"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    write_random_images(root / "instance", 3, 32, seed=1)  # 3 photos, batch 1: an epoch is 3 steps
    write_random_images(root / "references", 3, 64, seed=1)
    (root / "prompts.json").write_text(json.dumps({"instance": ["a photo of {token} {class}"],
                                                   "class": ["a photo of a {class}"]}))
    return {"root": root, "instance": root / "instance", "references": root / "references",
            "prompts": root / "prompts.json", "nearid": save_tiny_nearid(root / "nearid", format="head")}


@pytest.fixture(scope="module")
def bases(assets: dict[str, Path]) -> dict[str, Path]:
    """Tiny base models by family, written on first use."""

    class Bases(dict):
        def __missing__(self, family: str) -> Path:
            folder = assets["root"] / f"base-{family}"
            if family == "flux_dev":  # guidance-distilled, as Flux.1-dev that the Flux LoRA script trains
                build_tiny_flux_pipeline(0, guidance_embeds=True).save_pretrained(str(folder))
                self[family] = folder
            elif family == "hidream_hub":  # a base without the Llama, which the script loads apart
                whole = self["hidream"]
                shutil.copytree(whole, folder, ignore=shutil.ignore_patterns("*_4"))
                index = json.loads((whole / "model_index.json").read_text())
                (folder / "model_index.json").write_text(json.dumps({**index, "tokenizer_4": [None, None],
                                                                     "text_encoder_4": [None, None]}))
                self[family] = folder
            else:
                self[family] = save_tiny_pipeline(folder, family, seed=0)
            return self[family]

    return Bases()


def _launch(assets: dict[str, Path], base: Path, script: Path, out: Path, *ours: str) -> None:
    theirs = []
    if script == SCRIPTS["hidream"]:  # its Llama, from where the HiDream script loads it
        theirs = [f"--pretrained_{name}_name_or_path={base.parent / 'base-hidream' / name}"
                  for name in ("tokenizer_4", "text_encoder_4")]
    argv = [
        "--script", str(script), "--nearid_model", str(assets["nearid"]),
        "--nearid_reference_dir", str(assets["references"]), "--nearid_num_inference_steps", "2",
        "--nearid_resolution", "32", "--nearid_prompts", str(assets["prompts"]), *ours, "--",
        "--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(assets["instance"]),
        "--instance_prompt", "a photo of sks dog", "--class_prompt", "a photo of dog",
        "--validation_prompt", "a photo of sks dog", "--num_validation_images", "1", "--validation_epochs", "1",
        "--output_dir", str(out), "--max_train_steps", "5", "--checkpointing_steps", "2",
        "--checkpoints_total_limit", "1", "--seed", "0", "--resolution", "32", "--learning_rate", "1e-3", *theirs,
    ]  # fmt: skip
    run_dreambooth(argv)


def _loaded_lora_tensors(base: Path, folder: Path) -> tuple[int, list[str]]:
    """How many LoRA tensors a fresh pipeline of the base model ``base`` loads from ``folder``, and its warnings."""
    import warnings

    from diffusers import DiffusionPipeline

    index = json.loads((base / "model_index.json").read_text())
    held_elsewhere = {name: None for name, spec in index.items() if spec == [None, None]}  # HiDream's Llama
    pipe = DiffusionPipeline.from_pretrained(str(base), use_safetensors=True, **held_elsewhere)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(str(folder), weight_name=LORA_WEIGHT_NAME)
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    count = sum(1 for name, _ in denoiser.named_parameters() if ".lora_A." in name or ".lora_B." in name)
    return count, [str(w.message) for w in caught]


def _failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and "NearID" in r.getMessage()]


@pytest.mark.parametrize(("host", "ours", "expected"), [
    ("qwen_image", (), [(2, "checkpoint"), (3, "validation"), (4, "checkpoint"), (5, "validation"), (5, "final")]),
    ("sd3", ("--nearid_no_score_checkpoints",), [(3, "validation"), (5, "validation"), (5, "final")]),
    ("sana", ("--nearid_no_score_checkpoints",), [(3, "validation"), (5, "validation"), (5, "final")]),
    ("lumina2", ("--nearid_no_score_checkpoints",), [(3, "validation"), (5, "validation"), (5, "final")]),
    ("sdxl", ("--nearid_no_score_checkpoints",), [(3, "validation"), (5, "validation"), (5, "final")]),
    ("flux", ("--nearid_no_score_checkpoints",), [(3, "validation"), (5, "validation"), (5, "final")]),
    ("hidream", ("--nearid_no_score_checkpoints",), [(3, "validation"), (5, "validation"), (5, "final")]),
])  # fmt: skip
def test_family_is_scored_at_every_validation_and_its_best_adapter_loads_back_whole(
    assets: dict[str, Path], bases: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture,
    host: str, ours: tuple[str, ...], expected: list[tuple[int, str]],
) -> None:
    out = tmp_path / host
    with caplog.at_level(logging.WARNING):
        _launch(assets, bases[FAMILY[host]], SCRIPTS[host], out, *ours)
    assert _failures(caplog) == []  # no "NearID validation at step N failed; training continues"
    records = read_jsonl(out / dreambooth.HISTORY_NAME)
    assert [(r["step"], r["source"]) for r in records] == expected  # one line per validation and checkpoint
    for r in records:
        assert -1.0 <= r["nearid/identity_mean"] <= 1.0 and "nearid/base_identity_mean" in r
        assert "nearid/class_leakage_mean" in r
        if r["source"] != "checkpoint":  # the script's own validation image, scored into the same line
            assert r["nearid/script/num_images"] == 1.0 and -1.0 <= r["nearid/script/identity_mean"] <= 1.0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    best = out / "best_identity"
    scores = json.loads((best / "identity_scores.json").read_text())
    assert scores["step"] in (2, 3, 4, 5)
    ours_count, our_warnings = _loaded_lora_tensors(bases[FAMILY[host]], best)
    theirs_count, _ = _loaded_lora_tensors(bases[FAMILY[host]], out)  # the script's own final file
    print(f"{host}: best_identity from {scores['source']} loads {ours_count} LoRA tensors, the script's file "
          f"{theirs_count}")
    assert ours_count == theirs_count > 0 and our_warnings == []


def test_qwen_image_scored_even_when_the_text_encoder_cannot_be_loaded(
    assets: dict[str, Path], bases: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The prompt set cannot be rendered (here: the base model's text encoder fails to load); every validation still
    gets its history line, with the scores of the script's own images."""

    def unavailable(self, name, device, dtype):
        raise OSError(f"{name} of {self.base} is not available")

    monkeypatch.setattr(TextComponents, "load", unavailable)
    out = tmp_path / "no_text_encoder"
    with caplog.at_level(logging.ERROR):
        _launch(assets, bases["qwen_image"], SCRIPTS["qwen_image"], out, "--nearid_no_score_checkpoints")
    assert "is not available" in caplog.text  # the failure is logged, training continued
    records = read_jsonl(out / dreambooth.HISTORY_NAME)
    assert [(r["step"], r["source"]) for r in records] == [(3, "validation"), (5, "validation"), (5, "final")]
    for r in records:
        assert -1.0 <= r["nearid/script/identity_mean"] <= 1.0 and "nearid/identity_mean" not in r
        assert r["is_best"] is False
    assert (out / "pytorch_lora_weights.safetensors").is_file()  # training finished


@pytest.mark.skipif(bool(getattr(torch, "accelerator", None)) and torch.accelerator.is_available(),
                    reason="enable_model_cpu_offload works on a machine with an accelerator")
def test_a_host_that_offloads_in_log_validation_degrades_to_a_warning_without_an_accelerator(
    assets: dict[str, Path], bases: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    out = tmp_path / "offload"
    with caplog.at_level(logging.WARNING):
        _launch(assets, bases["flux"], SCRIPTS["offload"], out, "--nearid_no_score_checkpoints")
    warnings = [r.getMessage() for r in caplog.records if "enable_model_cpu_offload" in r.getMessage()]
    assert len(warnings) == 3 and all("needs an accelerator" in w for w in warnings)  # once per validation
    assert _failures(caplog) == [] and "Traceback" not in caplog.text
    records = read_jsonl(out / dreambooth.HISTORY_NAME)
    assert [(r["step"], r["source"]) for r in records] == [(3, "validation"), (5, "validation"), (5, "final")]
    assert all(-1.0 <= r["nearid/script/identity_mean"] <= 1.0 and "nearid/identity_mean" in r for r in records)


# ---------------------------------------------------------------------------------------------- pieces
LEFT_OUT = {  # what each script leaves out of its validation pipeline
    "qwen_image": ("text_encoder", "tokenizer"),
    "sd": ("text_encoder",),  # train_dreambooth_lora.py --pre_compute_text_embeddings
    "hidream": tuple(f"{kind}{n}" for n in ("", "_2", "_3", "_4") for kind in ("text_encoder", "tokenizer")),
}


@pytest.mark.parametrize("family", sorted(LEFT_OUT))
def test_text_components_filled_from_the_base_render_as_the_whole_pipeline(
    bases: dict[str, Path], family: str
) -> None:
    """A pipeline built without text components (Qwen-Image's and HiDream's, or SD's with
    --pre_compute_text_embeddings) renders the same images, once filled, as the base pipeline with its own."""
    from diffusers import DiffusionPipeline

    base = bases[family]
    whole = DiffusionPipeline.from_pretrained(str(base), use_safetensors=True)
    left_out = dict.fromkeys(LEFT_OUT[family])
    partial = DiffusionPipeline.from_pretrained(str(base), use_safetensors=True, **left_out)
    components = TextComponents(str(base))
    assert components.missing(partial) == sorted(left_out)
    seeds = [10**8, 10**8 + 1]
    prompts = ["a photo of sks dog", "a photo of sks dog on the beach"]
    from nearid_reward.rendering import RenderConfig

    config = RenderConfig(num_inference_steps=2, height=32, width=32, scheduler=None)
    expected = render_images(whole, prompts, seeds=seeds, config=config)
    with components.filled(partial) as filled:
        assert filled == sorted(left_out)
        images = render_images(partial, prompts, seeds=seeds, config=config)
    torch.testing.assert_close(images, expected)
    assert all(getattr(partial, name) is None for name in left_out)  # the script's pipeline is left as it was
    with components.filled(partial):
        first = components.loaded["text_encoder"]
    with components.filled(partial):
        assert components.loaded["text_encoder"] is first  # loaded once


def test_sana_renders_under_the_scripts_complex_human_instruction(bases: dict[str, Path]) -> None:
    from integrations.script_hooks import load_script

    module = load_script(SCRIPTS["sana"], module_name="sana_fixture_for_its_arguments")
    args = module.parse_args(["--pretrained_model_name_or_path", str(bases["sana"]), "--instance_data_dir", "x",
                              "--instance_prompt", "a photo of sks dog"])
    kwargs, guidance = host_conditioning(args, str(bases["sana"]))
    assert kwargs == {"max_sequence_length": 300, "complex_human_instruction": None} and guidance is None
    from diffusers import SanaPipeline

    pipe = SanaPipeline.from_pretrained(str(bases["sana"]), use_safetensors=True)
    prompt = ["a photo of sks dog"]

    def render(**extra):
        return pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="pt",
                    generator=[torch.Generator().manual_seed(0)], **extra).images

    from nearid_reward.rendering import RenderConfig

    ours = render_images(pipe, prompt, seeds=[0], config=RenderConfig(num_inference_steps=2, height=32, width=32,
                                                                       scheduler=None, pipeline_kwargs=kwargs))
    torch.testing.assert_close(ours, render(complex_human_instruction=None, max_sequence_length=300))
    assert not torch.allclose(ours, render())  # the pipeline's default instruction is other conditioning


def test_guidance_of_a_guidance_distilled_transformer_follows_the_script(bases: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    base = tmp_path / "flux-dev-like"
    (base / "transformer").mkdir(parents=True)
    shutil.copy(bases["flux"] / "model_index.json", base / "model_index.json")
    config = json.loads((bases["flux"] / "transformer" / "config.json").read_text())
    (base / "transformer" / "config.json").write_text(json.dumps({**config, "guidance_embeds": True}))
    args = argparse.Namespace(guidance_scale=2.5, max_sequence_length=128)
    assert host_conditioning(args, str(base)) == ({"max_sequence_length": 128}, 2.5)
    assert host_conditioning(args, str(bases["flux"])) == ({"max_sequence_length": 128}, None)  # not distilled


def test_nearid_resolution_is_kept_by_hidream_which_rescales_every_request_to_its_default_area(
    bases: dict[str, Path],
) -> None:
    """HiDream's pipeline scales any requested size to the area of its default one (256 px for the tiny model,
    1024 px for the real one): NearID's renders at ``--nearid_resolution`` come out at that size anyway."""
    from diffusers import HiDreamImagePipeline

    from nearid_reward.rendering import RenderConfig

    pipe = HiDreamImagePipeline.from_pretrained(str(bases["hidream"]), use_safetensors=True)
    prompt = ["a photo of sks dog"]
    asked = pipe(prompt, num_inference_steps=1, height=32, width=32, output_type="pt",
                 generator=[torch.Generator().manual_seed(0)]).images
    assert asked.shape[-2:] == (256, 256)  # the pipeline alone ignores the request
    config = RenderConfig(num_inference_steps=2, height=32, width=24, scheduler=None)
    ours = render_images(pipe, prompt, seeds=[0], config=config)
    assert ours.shape == (1, 3, 32, 24) and pipe.default_sample_size == 128  # the default is restored
    pipe.default_sample_size = 14  # by hand: an area of (14 * 2)^2 px, 32 x 24 after rounding to multiples of 4
    expected = pipe(prompt, num_inference_steps=2, height=32, width=24, output_type="pt",
                    generator=[torch.Generator().manual_seed(0)]).images
    torch.testing.assert_close(ours, expected)


def test_text_components_a_script_loads_from_its_own_flags_are_found() -> None:
    from integrations.host_pipelines import text_component_sources

    args = argparse.Namespace(pretrained_model_name_or_path="base", pretrained_vae_model_name_or_path="vae",
                              pretrained_text_encoder_4_name_or_path="llama", pretrained_tokenizer_4_name_or_path=None,
                              pretrained_tokenizer_name_or_path="tok")
    assert text_component_sources(args) == {"text_encoder_4": "llama", "tokenizer": "tok"}
