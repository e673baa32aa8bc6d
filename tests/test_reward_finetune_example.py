"""``examples/train_lora_identity_reward.py`` end to end on a tiny pipeline (each mode, 2 steps)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nearid_reward.files import read_jsonl
from nearid_reward.testing import save_tiny_nearid, write_random_images
from nearid_reward.testing.pipelines import save_tiny_sd_pipeline

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_lora_identity_reward.py"


def _load_example():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("train_lora_identity_reward", EXAMPLE)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reward_ft")
    write_random_images(root / "refs", 3, 64, seed=1)
    write_random_images(root / "class", 2, 64, seed=2)
    (root / "prompts.json").write_text(json.dumps({"instance": ["a photo of {token} {class}"], "class": []}))
    return {"sd": save_tiny_sd_pipeline(root / "sd", seed=0), "nearid": save_tiny_nearid(root / "nearid"),
            "refs": root / "refs", "class": root / "class", "prompts": root / "prompts.json", "root": root}


@pytest.mark.parametrize("mode", ["draft", "refl", "rwr"])
def test_each_mode_trains_scores_and_keeps_the_best(assets: dict[str, Path], mode: str) -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    out = assets["root"] / mode
    argv = ["--pretrained_model_name_or_path", str(assets["sd"]), "--nearid_model", str(assets["nearid"]),
            "--reference_dir", str(assets["refs"]), "--class_noun", "dog", "--prompts", str(assets["prompts"]),
            "--mode", mode, "--num_inference_steps", "3", "--backprop_num_steps", "2", "--max_train_steps", "2",
            "--checkpointing_steps", "1", "--validation_steps", "1", "--validation_inference_steps", "2",
            "--train_batch_size", "2", "--learning_rate", "1e-3", "--class_data_dir", str(assets["class"]),
            "--prior_type", "kl" if mode != "rwr" else "mse", "--output_dir", str(out)]  # fmt: skip
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state(*([True] if state is AcceleratorState else []))
    result = _load_example().main(argv)
    steps = [r["step"] for r in read_jsonl(out / "reward_history.jsonl")]
    assert steps == [1, 2] and len(result["history"]) == 2
    assert all(0.0 <= r["prior_loss"] for r in read_jsonl(out / "reward_history.jsonl"))
    assert [r["step"] for r in read_jsonl(out / "identity_history.jsonl")] == [1, 2]
    assert (out / "checkpoint-2" / "identity_scores.json").is_file()
    best = out / "best_identity"
    assert (best / "pytorch_lora_weights.safetensors").is_file()
    final = load_file(str(out / "pytorch_lora_weights.safetensors"))
    first = load_file(str(out / "checkpoint-1" / "pytorch_lora_weights.safetensors"))
    assert any((final[k] != first[k]).any() for k in final), "the second step did not change the LoRA"
    assert result["best_step"] in (1, 2)


def test_bad_arguments_are_rejected(assets: dict[str, Path]) -> None:
    module = _load_example()
    base = ["--pretrained_model_name_or_path", "x", "--nearid_model", "y", "--reference_dir", "z"]
    with pytest.raises(SystemExit):
        module.parse_args([*base, "--num_inference_steps", "2", "--backprop_num_steps", "3"])
    with pytest.raises(SystemExit):
        module.parse_args([*base, "--refl_range", "0.9", "0.2"])


def test_custom_loop_example(assets: dict[str, Path]) -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    spec = importlib.util.spec_from_file_location("custom_loop_callback", EXAMPLE.parent / "custom_loop_callback.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state(*([True] if state is AcceleratorState else []))
    out = assets["root"] / "custom"
    callback = module.main(["--pretrained_model_name_or_path", str(assets["sd"]), "--nearid_model",
                            str(assets["nearid"]), "--instance_data_dir", str(assets["refs"]),
                            "--output_dir", str(out),
                            "--max_train_steps", "2", "--validation_steps", "1", "--identity_loss_weight", "1.0",
                            "--prompts", str(assets["prompts"]), "--validation_inference_steps", "2"])
    assert callback.prompts.instance == ["a photo of sks dog"]
    assert [r["step"] for r in read_jsonl(out / "identity_history.jsonl")] == [1, 2]
    assert json.loads((out / "checkpoint-2" / "identity_scores.json").read_text())["step"] == 2
    assert (out / "best_identity" / "pytorch_lora_weights.safetensors").is_file()


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    for state in (AcceleratorState, GradientState, PartialState):
        state._reset_state(*([True] if state is AcceleratorState else []))


def test_init_lora_starts_from_the_given_adapter(assets: dict[str, Path]) -> None:
    from diffusers import StableDiffusionPipeline

    from nearid_reward.testing.pipelines import add_lora_adapter, write_lora_checkpoint

    pipe = StableDiffusionPipeline.from_pretrained(str(assets["sd"]), use_safetensors=True)
    add_lora_adapter(pipe.unet, rank=6, seed=3)
    init = assets["root"] / "init_run" / "checkpoint-5"
    write_lora_checkpoint(init, pipe)
    out = assets["root"] / "from_init"
    argv = ["--pretrained_model_name_or_path", str(assets["sd"]), "--nearid_model", str(assets["nearid"]),
            "--reference_dir", str(assets["refs"]), "--class_noun", "dog", "--prompts", str(assets["prompts"]),
            "--init_lora", str(init), "--num_inference_steps", "2", "--backprop_num_steps", "1",
            "--max_train_steps", "1", "--checkpointing_steps", "1", "--validation_steps", "1",
            "--validation_inference_steps", "2", "--train_batch_size", "1", "--learning_rate", "0",
            "--output_dir", str(out)]  # fmt: skip
    _reset_accelerate()
    _load_example().main(argv)
    started = load_file(str(Path(init) / "pytorch_lora_weights.safetensors"))
    saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert set(saved) == set(started)  # same layers, rank 6 taken from the file (not --rank's 4)
    assert all(torch.equal(saved[k], started[k]) for k in saved)  # learning rate 0: the adapter is the initial one


def test_init_lora_names_a_missing_file(assets: dict[str, Path]) -> None:
    argv = ["--pretrained_model_name_or_path", str(assets["sd"]), "--nearid_model", str(assets["nearid"]),
            "--reference_dir", str(assets["refs"]), "--init_lora", str(assets["root"] / "nowhere"),
            "--output_dir", str(assets["root"] / "never")]
    _reset_accelerate()
    with pytest.raises(FileNotFoundError, match="--init_lora .*nowhere"):
        _load_example().main(argv)


@pytest.mark.parametrize("reference", ["init", "base"])
def test_kl_prior_regresses_onto_the_starting_adapter_or_the_base(assets: dict[str, Path], reference: str) -> None:
    from diffusers import StableDiffusionPipeline

    from nearid_reward.files import read_jsonl
    from nearid_reward.testing.pipelines import add_lora_adapter, write_lora_checkpoint

    pipe = StableDiffusionPipeline.from_pretrained(str(assets["sd"]), use_safetensors=True)
    add_lora_adapter(pipe.unet, rank=4, seed=7, b_std=0.2)
    init = assets["root"] / f"prior_{reference}_init" / "checkpoint-1"
    write_lora_checkpoint(init, pipe)
    out = assets["root"] / f"prior_{reference}"
    argv = ["--pretrained_model_name_or_path", str(assets["sd"]), "--nearid_model", str(assets["nearid"]),
            "--reference_dir", str(assets["refs"]), "--class_noun", "dog", "--prompts", str(assets["prompts"]),
            "--init_lora", str(init), "--prior_reference", reference, "--class_data_dir", str(assets["class"]),
            "--prior_type", "kl", "--num_inference_steps", "2", "--backprop_num_steps", "1",
            "--max_train_steps", "2", "--checkpointing_steps", "2", "--validation_steps", "2",
            "--validation_inference_steps", "2", "--train_batch_size", "1", "--learning_rate", "0",
            "--output_dir", str(out)]  # fmt: skip
    _reset_accelerate()
    _load_example().main(argv)
    priors = [r["prior_loss"] for r in read_jsonl(out / "reward_history.jsonl")]
    if reference == "init":  # the adapter is still the starting one: nothing to pull back
        assert all(p <= 1e-10 for p in priors) and len(priors) == 2
    else:  # the starting adapter differs from the base model
        assert all(p > 1e-6 for p in priors)
    saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert not any("prior_reference" in k for k in saved)  # only the trained adapter is saved
