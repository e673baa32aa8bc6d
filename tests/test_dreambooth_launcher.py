"""``nearid-dreambooth`` hosting an unmodified DreamBooth-LoRA script (ours, shaped like the diffusers ones)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from launcher_runs import run_dreambooth
from safetensors.torch import load_file

from integrations import dreambooth
from integrations.script_hooks import split_argv, validation_family
from nearid_reward.files import read_jsonl
from nearid_reward.testing import save_tiny_nearid, write_random_images
from nearid_reward.testing.pipelines import save_tiny_sd_pipeline

# Our minimal script shaped like diffusers' train_dreambooth_lora.py (including its reliance on a global `args`).
FIXTURE = Path(__file__).resolve().parents[1] / "examples" / "dreambooth_lora_minimal.py"
# ... and one shaped like the full (non-LoRA) train_dreambooth.py, whose log_validation takes the live components.
FULL_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "dreambooth_full_minimal.py"


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dreambooth")
    write_random_images(root / "instance", 4, 64, seed=1)
    write_random_images(root / "class", 4, 64, seed=2)
    write_random_images(root / "references", 3, 64, seed=1)  # the subject's photos
    return {
        "sd": save_tiny_sd_pipeline(root / "tiny-sd", seed=0, scheduler="ddpm"),
        "nearid": save_tiny_nearid(root / "nearid", format="head"),
        "instance": root / "instance",
        "class": root / "class",
        "references": root / "references",
        "root": root,
    }


def _argv(assets: dict[str, Path], out: Path, *extra_ours: str, steps: int = 4) -> list[str]:
    return [
        "--script", str(FIXTURE), "--nearid_model", str(assets["nearid"]),
        "--nearid_reference_dir", str(assets["references"]), "--nearid_num_inference_steps", "2",
        "--nearid_prompts", str(assets["root"] / "prompts.json"), *extra_ours, "--",
        "--pretrained_model_name_or_path", str(assets["sd"]), "--instance_data_dir", str(assets["instance"]),
        "--instance_prompt", "a photo of sks dog", "--class_data_dir", str(assets["class"]),
        "--class_prompt", "a photo of dog", "--with_prior_preservation", "--validation_prompt", "a photo of sks dog",
        "--num_validation_images", "1", "--output_dir", str(out), "--max_train_steps", str(steps),
        "--train_batch_size", "2", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1", "--seed", "0",
        "--report_to", "tensorboard",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run(assets: dict[str, Path]) -> Path:
    (assets["root"] / "prompts.json").write_text(json.dumps(
        {"instance": ["a photo of {token} {class}", "a photo of {token} {class} on the beach"],
         "class": ["a photo of a {class}"]}))  # fmt: skip
    out = assets["root"] / "run"
    run_dreambooth(_argv(assets, out))
    return out


def test_history_lines_and_their_true_global_steps(run: Path) -> None:
    records = read_jsonl(run / dreambooth.HISTORY_NAME)
    # 4 instance images, batch 2 -> 2 steps per epoch: checkpoints at 2 and 4, validations at the end of each epoch
    # (steps 2 and 4), then the final validation on the reloaded LoRA (step 4)
    assert [(r["step"], r["source"]) for r in records] == [
        (2, "checkpoint"), (2, "validation"), (4, "checkpoint"), (4, "validation"), (4, "final"),
    ]
    for r in records:
        assert -1.0 <= r["nearid/identity_mean"] <= 1.0
        assert "nearid/base_identity_mean" in r and "nearid/class_leakage_mean" in r
    # the script's own validation images are scored into the same line
    assert all("nearid/script/identity_mean" in r for r in records if r["source"] != "checkpoint")
    # a validation at the same step as its checkpoint reuses that render: identical prompt-set scores
    assert records[0]["nearid/identity_mean"] == records[1]["nearid/identity_mean"]


@pytest.fixture(scope="module")
def min_run(assets: dict[str, Path], run: Path) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    """The same run with ``--nearid_mode min`` and ``--nearid_loss_weight 0``, and the LoRA weights of every
    checkpoint as they were just before pruning removed it."""
    import shutil

    pruned: dict[str, dict[str, torch.Tensor]] = {}
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):  # what the script's pruning deletes, seen on its way out
        lora = Path(path) / "pytorch_lora_weights.safetensors"
        if Path(path).name.startswith("checkpoint-") and lora.is_file():
            pruned[Path(path).name] = load_file(str(lora))
        return real_rmtree(path, *args, **kwargs)

    out = assets["root"] / "min_run"
    shutil.rmtree = rmtree
    try:
        run_dreambooth(_argv(assets, out, "--nearid_mode", "min", "--nearid_loss_weight", "0"))
    finally:
        shutil.rmtree = real_rmtree
    return out, pruned


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_sidecars_and_best_identity_survive_pruning(
    run: Path, min_run: tuple[Path, dict[str, dict[str, torch.Tensor]]]
) -> None:
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4"]  # checkpoint-2 was pruned
    sidecar = json.loads((run / "checkpoint-4" / "identity_scores.json").read_text())
    assert sidecar["step"] == 4 and sidecar["validation_step"] == 4
    assert sidecar["metrics"]["nearid/identity_mean"] == pytest.approx(
        read_jsonl(run / dreambooth.HISTORY_NAME)[2]["nearid/identity_mean"])
    other, pruned = min_run
    assert sorted(pruned) == ["checkpoint-2"]
    assert sorted(p.name for p in other.glob("checkpoint-*")) == ["checkpoint-4"]
    final = load_file(str(run / "pytorch_lora_weights.safetensors"))
    assert _same_tensors(final, load_file(str(other / "pytorch_lora_weights.safetensors")))  # the same training
    best_steps = {}
    for folder, pick in ((run, max), (other, min)):  # the best step is 2 in one of the two modes, 4 in the other
        best = folder / "best_identity"
        scores = json.loads((best / "identity_scores.json").read_text())
        weights = load_file(str(best / "pytorch_lora_weights.safetensors"))
        assert weights and all(k.startswith("unet.") for k in weights)
        records = read_jsonl(folder / dreambooth.HISTORY_NAME)
        assert scores["best_value"] == pytest.approx(pick(r["nearid/identity_mean"] for r in records))
        assert scores["best_step"] == scores["step"]  # the kept weights are the best step's
        best_steps[pick.__name__] = scores["step"]
        if scores["step"] == 4:  # the last step: the final LoRA's weights
            assert _same_tensors(weights, final)
        else:  # an early step whose checkpoint was pruned: still its weights, bit for bit
            assert scores["step"] == 2 and _same_tensors(weights, pruned["checkpoint-2"])
            assert not _same_tensors(weights, final)
    assert sorted(best_steps.values()) == [2, 4], best_steps


def test_scalars_reach_the_scripts_tracker_at_the_global_step(run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((run / "logs").rglob("events.out.tfevents.*"))
    assert events
    steps: list[int] = []
    for file in events:
        acc = EventAccumulator(str(file))
        acc.Reload()
        if "nearid/identity_mean" in acc.Tags()["scalars"]:
            steps += [e.step for e in acc.Scalars("nearid/identity_mean")]
    assert sorted(steps) == [2, 2, 4, 4, 4]


def test_summary_written_at_the_end(run: Path) -> None:
    text = (run / "identity_summary.md").read_text()
    assert "Best step" in text and "| 4 |" in text
    assert (run / "identity_summary.png").stat().st_size > 1000


def test_full_dreambooth_script_with_a_real_accelerator_scores_its_own_images(
    assets: dict[str, Path], run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The "components" log_validation family (train_dreambooth.py): the launcher rebuilds a pipeline from the live
    models the script passes, tokenizer included, under a real accelerate Accelerator."""
    out = tmp_path / "full"
    argv = [
        "--script", str(FULL_FIXTURE), "--nearid_model", str(assets["nearid"]),
        "--nearid_reference_dir", str(assets["references"]), "--nearid_num_inference_steps", "2",
        "--nearid_prompts", str(assets["root"] / "prompts.json"), "--",
        "--pretrained_model_name_or_path", str(assets["sd"]), "--instance_data_dir", str(assets["instance"]),
        "--instance_prompt", "a photo of sks dog", "--validation_prompt", "a photo of sks dog",
        "--num_validation_images", "1", "--output_dir", str(out), "--max_train_steps", "4", "--train_batch_size", "2",
        "--checkpointing_steps", "2", "--validation_steps", "2", "--seed", "0", "--report_to", "tensorboard",
    ]  # fmt: skip
    with caplog.at_level(logging.ERROR):
        run_dreambooth(argv)
    assert "training continues" not in caplog.text  # no scoring failure was swallowed
    records = read_jsonl(out / dreambooth.HISTORY_NAME)
    assert [(r["step"], r["source"]) for r in records] == [
        (2, "checkpoint"), (2, "validation"), (4, "checkpoint"), (4, "validation"),
    ]
    for r in records:
        assert -1.0 <= r["nearid/identity_mean"] <= 1.0
    scored = [r for r in records if r["source"] == "validation"]
    assert all(r["nearid/script/num_images"] == 1.0 and -1.0 <= r["nearid/script/identity_mean"] <= 1.0
               for r in scored)  # the script's own validation image, scored into the same line
    assert (out / "checkpoint-4" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((out / "checkpoint-4" / "identity_scores.json").read_text())["validation_step"] == 4
    assert (out / "best_identity" / "unet" / "diffusion_pytorch_model.safetensors").is_file()  # whole UNet kept


def test_scoring_errors_never_kill_the_run(assets: dict[str, Path], tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    bad_refs = tmp_path / "refs"
    bad_refs.mkdir()
    (bad_refs / "broken.png").write_bytes(b"not an image")
    argv = _argv(assets, tmp_path / "out", steps=2)
    argv[argv.index("--nearid_reference_dir") + 1] = str(bad_refs)
    with caplog.at_level(logging.ERROR):
        run_dreambooth(argv)
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()  # training finished
    assert "training continues" in caplog.text and "broken.png" in caplog.text
    with pytest.raises(SystemExit, match="nearid-dreambooth: .*broken.png"):
        run_dreambooth(["--nearid_strict", *argv])


def test_identity_loss_weight_zero_is_the_plain_run_and_a_positive_weight_changes_the_lora(
    assets: dict[str, Path], run: Path, min_run: tuple[Path, dict[str, dict[str, torch.Tensor]]], tmp_path: Path
) -> None:
    # --nearid_loss_weight 0 (min_run; its other difference, --nearid_mode min, only chooses the kept step): the
    # plain run's LoRA, byte for byte
    lora = "pytorch_lora_weights.safetensors"
    assert (min_run[0] / lora).read_bytes() == (run / lora).read_bytes()
    out = tmp_path / "with_loss"
    run_dreambooth(_argv(assets, out, "--nearid_loss_weight", "5.0", "--nearid_loss_max_timestep", "1000",
                         "--nearid_no_score_checkpoints"))
    plain = load_file(str(run / lora))
    with_loss = load_file(str(out / lora))
    assert plain.keys() == with_loss.keys()
    assert any(not torch.allclose(plain[k], with_loss[k]) for k in plain)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for file in (out / "logs").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(file))
        acc.Reload()
        if "nearid/train_identity_loss" in acc.Tags()["scalars"]:
            values += [e.value for e in acc.Scalars("nearid/train_identity_loss")]
    assert len(values) == 4 and all(0.0 <= v <= 2.0 for v in values)  # applied at every step (all t < 1000)


def test_argv_split_and_token_derivation() -> None:
    assert split_argv(["--script", "x.py", "--", "--lr", "1"]) == (["--script", "x.py"], ["--lr", "1"])
    assert split_argv(["--script", "x.py"]) == (["--script", "x.py"], [])
    assert dreambooth.derive_token_and_class("a photo of sks dog", "a photo of dog") == ("sks", "dog")
    assert dreambooth.derive_token_and_class("a photo of sks dog", None) == ("sks", "dog")
    assert dreambooth.derive_token_and_class("a zwx toy in the garden", "a toy in the garden") == ("zwx", "toy")
    assert dreambooth.derive_token_and_class("a photo of dog", "a photo of dog") == ("", "dog")


def test_both_log_validation_signature_families_are_recognised() -> None:
    def lora(pipeline, args, accelerator, pipeline_args, epoch, torch_dtype, is_final_validation=False): ...

    def full(text_encoder, tokenizer, unet, vae, args, accelerator, weight_dtype, global_step, prompt_embeds,
             negative_prompt_embeds): ...

    assert validation_family(lora) == "pipeline"
    assert validation_family(full) == "components"
    with pytest.raises(ValueError, match="unrecognised log_validation signature"):
        validation_family(lambda images, step: None)


def test_script_without_main_is_rejected(tmp_path: Path) -> None:
    script = tmp_path / "not_a_trainer.py"
    script.write_text("x = 1\n")
    with pytest.raises(SystemExit, match="nearid-dreambooth: .*no module-level `main`"):
        dreambooth.main(["--script", str(script), "--nearid_model", "m", "--nearid_reference_dir", "r"])


def test_under_accelerate_launch_with_two_processes(assets: dict[str, Path], run: Path, tmp_path: Path) -> None:
    """Scoring on the main process only must not hang the other rank (no collective inside the main-only block)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    argv = _argv(assets, out, steps=4)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "--main_process_port", "0",
           "-m", "integrations.dreambooth", *argv]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_jsonl(out / dreambooth.HISTORY_NAME)
    assert records and all(r["step"] in (2, 4) for r in records)
    assert [r["source"] for r in records].count("final") == 1  # written once, by the main process only
    assert (out / "checkpoint-4" / "identity_scores.json").is_file()
    assert (out / "best_identity" / "pytorch_lora_weights.safetensors").is_file()


def test_summary_has_a_column_for_every_declared_summary_metric(assets: dict[str, Path], tmp_path: Path) -> None:
    from nearid_reward import IdentityValidator
    from nearid_reward.testing import random_images

    validator = IdentityValidator(str(assets["nearid"]), assets["references"],
                                  history_path=tmp_path / dreambooth.HISTORY_NAME)
    for step in (1, 2):
        validator.validate(random_images(2, 64, seed=step), step=step)
    md, _ = dreambooth.write_summary(tmp_path, validator)
    header = md.read_text().splitlines()[4]
    assert "identity_mean" in header and "relative_mean" in header and "copy_fraction" in header


def _session(assets: dict[str, Path], out: Path, *ours: str) -> dreambooth.DreamBoothSession:
    """A session bound to the tiny base model's arguments, without running a training script."""
    import argparse

    options = dreambooth.parse_options(["--script", str(FIXTURE), "--nearid_model", str(assets["nearid"]),
                                        "--nearid_reference_dir", str(assets["references"]), *ours])
    session = dreambooth.DreamBoothSession(options)
    session.bind_args(argparse.Namespace(
        pretrained_model_name_or_path=str(assets["sd"]), output_dir=str(out), instance_prompt="a photo of sks dog",
        class_prompt="a photo of dog", with_prior_preservation=False,
    ))  # fmt: skip
    return session


class _Accelerator:
    """What the session and the identity-loss hook use of an accelerate.Accelerator."""

    device = torch.device("cpu")
    is_main_process = True

    def prepare(self, *objects):
        return objects

    def backward(self, loss, **kwargs):
        loss.backward()


@pytest.fixture
def count_model_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from nearid_reward import NearIDModel

    loads: list[str] = []
    original = NearIDModel.from_pretrained.__func__

    def counting(cls, path, **kwargs):
        loads.append(str(path))
        return original(cls, path, **kwargs)

    monkeypatch.setattr(NearIDModel, "from_pretrained", classmethod(counting))
    return loads


def test_nearid_dtype_is_the_dtype_of_the_nearid_model(assets: dict[str, Path], tmp_path: Path) -> None:
    session = _session(assets, tmp_path, "--nearid_dtype", "bfloat16")
    session.on_accelerator(_Accelerator())
    model = session.callback().validator.model
    assert model.dtype == torch.bfloat16 and model.head.probe.dtype == torch.float32  # the head stays float32


def test_identity_loss_shares_the_one_nearid_model(assets: dict[str, Path], tmp_path: Path,
                                                   count_model_loads: list[str]) -> None:
    session = _session(assets, tmp_path, "--nearid_loss_weight", "1.0")
    session.on_accelerator(_Accelerator())
    validator = session.callback().validator
    reward, _, _ = session._identity_loss._components()
    assert reward.model is validator.model and reward.references.references is validator.references.references
    assert count_model_loads == [str(assets["nearid"])]  # loaded once for validation and the loss


def test_select_after_ranks_with_the_sessions_monitor_mode_and_negatives(assets: dict[str, Path], run: Path,
                                                                         tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("identity_selection*"))
    write_random_images(tmp_path / "negatives", 2, 64, seed=5)
    session = _session(assets, out, "--nearid_negative_dir", str(tmp_path / "negatives"), "--nearid_monitor",
                       "class_leakage_mean", "--nearid_mode", "min", "--nearid_select_after",
                       "--nearid_num_inference_steps", "2", "--nearid_prompts", str(assets["root"] / "prompts.json"))
    session.on_accelerator(_Accelerator())
    session.callback()
    session.on_end_training()  # writes the summary, then selects
    data = json.loads((out / "identity_selection.json").read_text())
    assert (data["monitor"], data["mode"]) == ("class_leakage_mean", "min")
    assert data["settings"]["num_negatives"] == 2 and data["settings"]["render"]["num_inference_steps"] == 2
    assert [r["name"] for r in data["checkpoints"]] == ["checkpoint-4"]
    assert "negative_max_mean" in data["checkpoints"][0] and "class_leakage_mean" in data["checkpoints"][0]
