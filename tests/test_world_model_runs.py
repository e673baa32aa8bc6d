"""nearid-make-world on a shortened configuration: same bytes on a rerun, after kills and resumes, and per-component
random streams that a change elsewhere cannot shift."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nearid_world import seeding
from nearid_world.training_state import load_training_state, module_sha256, save_training_state
from nearid_world.world_model import (
    CHECKPOINTS_DIR,
    CONFIG_NAME,
    CURVE_NAME,
    WorldModelConfig,
    build_world_pipeline,
    main,
    render_training_set,
)

ROOT = Path(__file__).resolve().parents[1]
# 5 autoencoder steps, 9 denoiser steps, a checkpoint every 3 steps of each, prompt following every 3 denoiser steps
TINY = ["--num_images", "48", "--vae_steps", "5", "--unet_steps", "9", "--batch_size", "4", "--vae_batch_size", "4",
        "--unet_channels", "16", "32", "--text_width", "32", "--threads", "1", "--checkpoint_every", "3",
        "--eval_every", "3", "--eval_count", "4"]


def _files(folder: Path) -> dict[str, bytes]:
    """Every file the run wrote, but its config (which holds timings), by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != CONFIG_NAME}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world") / "reference"
    assert main([*TINY, "--output_dir", str(out)]) == 0
    return out


# ---------------------------------------------------------------------------------------------- seeding
def test_component_streams_are_the_seed_sequence_spawn() -> None:
    n = len(seeding.COMPONENTS)
    for seed in (0, 7):
        children = np.random.SeedSequence(seed).spawn(n)
        for i, name in enumerate(seeding.COMPONENTS):
            ours = seeding.component_seed_sequence(seed, name)
            assert np.array_equal(ours.generate_state(4), children[i].generate_state(4)), name
        grandchildren = children[0].spawn(3)
        assert np.array_equal(seeding.child_seed_sequence(seed, "render", 2).generate_state(4),
                              grandchildren[2].generate_state(4))
    seeds = {seeding.component_seed(0, name) for name in seeding.COMPONENTS}
    assert len(seeds) == n and all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError, match="component must be one of .*got 'ema'"):
        seeding.component_seed(0, "ema")


def test_a_rendered_view_does_not_depend_on_how_many_are_rendered() -> None:
    few, more = render_training_set(3, seed=5), render_training_set(5, seed=5)
    assert np.array_equal(few.images, more.images[:3]) and few.identities == more.identities[:3]
    assert not np.array_equal(render_training_set(3, seed=6).images, few.images)


def test_one_models_size_leaves_the_other_models_initial_weights_alone() -> None:
    """Before per-component seeding the three models were drawn one after the other from the global generator:
    a wider UNet then shifted the autoencoder's initial weights."""
    small = build_world_pipeline(WorldModelConfig(unet_channels=[16, 32], text_width=32))
    wide = build_world_pipeline(WorldModelConfig(unet_channels=[32, 64], text_width=32))
    for name in ("vae", "text_encoder"):
        a, b = getattr(small, name).state_dict(), getattr(wide, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert module_sha256(small.unet) != module_sha256(wide.unet)
    other_seed = build_world_pipeline(WorldModelConfig(unet_channels=[16, 32], text_width=32, seed=1))
    assert module_sha256(other_seed.vae) != module_sha256(small.vae)


# ---------------------------------------------------------------------------------------------- checkpoint state
def test_restored_training_state_continues_exactly(tmp_path: Path) -> None:
    def setup() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.Generator, np.random.Generator]:
        with seeding.seeded_init(0, "unet_init"):
            model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
        return (model, torch.optim.AdamW(model.parameters(), lr=0.1), torch.Generator().manual_seed(1),
                np.random.default_rng(2))

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer, g: torch.Generator, rng: np.random.Generator) -> None:
        x = torch.randn(8, 3, generator=g) * float(rng.random())
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    model, opt, g, rng = setup()
    for _ in range(3):
        step(model, opt, g, rng)
    save_training_state(tmp_path / "ckpt", modules={"model": model}, optimizers={"opt": opt},
                        torch_generators={"g": g}, numpy_generators={"rng": rng}, scalars={"step": 3})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "generators.safetensors", "model.safetensors", "opt.optimizer.safetensors", "state.json"]
    step(model, opt, g, rng)
    fresh = setup()
    assert load_training_state(tmp_path / "ckpt", modules={"model": fresh[0]}, optimizers={"opt": fresh[1]},
                               torch_generators={"g": fresh[2]}, numpy_generators={"rng": fresh[3]}) == {"step": 3}
    step(*fresh)
    for a, b in zip(model.state_dict().values(), fresh[0].state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(g.get_state(), fresh[2].get_state()) and rng.random() == fresh[3].random()


# ---------------------------------------------------------------------------------------------- whole runs
def test_rerun_writes_the_same_bytes_and_records_their_hashes(reference: Path, tmp_path: Path) -> None:
    info = json.loads((reference / CONFIG_NAME).read_text())
    written = _files(reference)
    assert info["sha256"] == {k: hashlib.sha256(v).hexdigest() for k, v in written.items()}
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors", CURVE_NAME} <= set(written)
    assert not (reference / CHECKPOINTS_DIR).exists()  # removed once the model is saved
    assert info["command"].startswith("nearid-make-world --num_images 48") and info["seed"] == 0
    assert info["threads"] == 1 and info["torch"] == torch.__version__ and info["device"] == "cpu"
    assert info["seeding_components"] == list(seeding.COMPONENTS)
    assert set(info["seconds_per_step"]) == {"autoencoder", "denoiser"}
    # another global seed before the rerun: nothing in the pretraining may read the global generators
    torch.manual_seed(12345)
    np.random.seed(12345)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    assert main([*TINY, "--output_dir", str(tmp_path / "again")]) == 0
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))
    again = _files(tmp_path / "again")
    assert again.keys() == written.keys()
    assert [k for k in written if written[k] != again[k]] == []


def test_prompt_following_curve_measures_the_weights_as_saved(reference: Path) -> None:
    from nearid_reward.pipelines import load_pipeline
    from nearid_world.evaluate import WorldAssets, autoencoder_ceiling, prompt_following
    from nearid_world.oracle import AttributeOracle

    rows = [json.loads(line) for line in (reference / CURVE_NAME).read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 9]
    keys = {"shape", "primary", "secondary", "pattern", "part", "context", "all_identity_attributes"}
    for row in rows:
        assert set(row) == keys | {"step", "count"} and row["count"] == 4
        assert all(0.0 <= row[k] <= 1.0 for k in keys)
    oracle = AttributeOracle.from_pretrained(WorldAssets().oracle).eval()
    # the last row is what the saved files draw, read back from disk
    saved = load_pipeline(reference, torch_dtype=torch.float32)
    final = prompt_following(saved, oracle, count=4)
    assert {k: round(v, 6) for k, v in final.items()} == {k: rows[-1][k] for k in keys}
    # the autoencoder's ceiling is measured once, on the autoencoder as saved, with 5 x --eval_count views
    ceiling = json.loads((reference / CONFIG_NAME).read_text())["metrics"]["autoencoder_ceiling"]
    again = autoencoder_ceiling(saved.vae, oracle, count=20)
    assert ceiling == {k: round(v, 6) for k, v in again.items()} and set(ceiling) == keys


def test_settings_of_one_component_leave_the_others_alone(reference: Path, tmp_path: Path) -> None:
    ref = json.loads((reference / CONFIG_NAME).read_text())
    no_eval = [*TINY, "--eval_every", "0"]
    assert main([*no_eval, "--empty_caption", "0.5", "--output_dir", str(tmp_path / "captions")]) == 0
    assert main([*no_eval, "--vae_steps", "0", "--output_dir", str(tmp_path / "no_vae")]) == 0
    captions = json.loads((tmp_path / "captions" / CONFIG_NAME).read_text())
    no_vae = json.loads((tmp_path / "no_vae" / CONFIG_NAME).read_text())
    assert captions["init_sha256"] == no_vae["init_sha256"] == ref["init_sha256"]
    vae, unet = "vae/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors"
    assert captions["sha256"][vae] == ref["sha256"][vae]  # caption dropout is not the autoencoder's business
    assert captions["sha256"][unet] != ref["sha256"][unet]  # ... but it is the denoiser's
    assert no_vae["sha256"][vae] != ref["sha256"][vae]
    fresh = build_world_pipeline(WorldModelConfig(unet_channels=[16, 32], text_width=32))
    assert ref["init_sha256"] == {n: module_sha256(getattr(fresh, n)) for n in ("vae", "text_encoder", "unet")}


# A run killed with SIGKILL: at the n-th gradient clipping of this process (mid-step), or just before it writes the
# named checkpoint folder.
KILLER = """
import os, signal, sys, torch
from nearid_world import world_model
how, when = sys.argv[1], sys.argv[2]
calls = [0]
clip, save = torch.nn.utils.clip_grad_norm_, world_model.save_training_state
def clip_then_maybe_die(*args, **kwargs):
    calls[0] += 1
    if how == "step" and calls[0] == int(when):
        os.kill(os.getpid(), signal.SIGKILL)
    return clip(*args, **kwargs)
def save_unless(folder, **kwargs):
    if how == "checkpoint" and os.path.basename(folder) == when:
        os.kill(os.getpid(), signal.SIGKILL)
    return save(folder, **kwargs)
torch.nn.utils.clip_grad_norm_ = clip_then_maybe_die
world_model.save_training_state = save_unless
raise SystemExit(world_model.main(sys.argv[3:]))
"""


def _run_killed(how: str, when: str, argv: list[str]) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", KILLER, how, when, *argv], env=env, capture_output=True, text=True,
                          timeout=600)
    return done.returncode


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / CHECKPOINTS_DIR).iterdir() if not p.name.startswith("."))


def test_killed_runs_resume_to_the_bytes_of_an_uninterrupted_run(reference: Path, tmp_path: Path) -> None:
    """Three SIGKILLs: mid-autoencoder, in the first denoiser step (resumes from the stage boundary), and after a
    prompt-following row was appended but before its checkpoint was written; the fourth start completes.

    Without the generators' states in the checkpoint, or without dropping the curve rows past the checkpoint, the
    bytes differ."""
    out = tmp_path / "killed"
    argv = [*TINY, "--output_dir", str(out)]
    assert _run_killed("step", "5", argv) == -9  # autoencoder step 5 of 5; step 3's checkpoint is on disk
    assert _checkpoints(out) == ["autoencoder-000003"] and not (out / "model_index.json").exists()
    with pytest.raises(SystemExit, match="holds checkpoints of an earlier run .*pass --resume"):
        main(argv)
    with pytest.raises(SystemExit, match="other settings .*learning_rate 0.001 there, 0.002 here"):
        main([*argv, "--resume", "--learning_rate", "0.002"])
    assert _run_killed("step", "3", [*argv, "--resume"]) == -9  # autoencoder steps 4-5, then denoiser step 1
    assert _checkpoints(out) == ["denoiser-000000"]
    assert _run_killed("checkpoint", "denoiser-000006", [*argv, "--resume"]) == -9
    assert _checkpoints(out) == ["denoiser-000003"]
    assert [json.loads(line)["step"] for line in (out / CURVE_NAME).read_text().splitlines()] == [3, 6]
    assert main([*argv, "--resume"]) == 0
    info = json.loads((out / CONFIG_NAME).read_text())
    assert info["resumed_from"] == "denoiser-000003" and not (out / CHECKPOINTS_DIR).exists()
    resumed, uninterrupted = _files(out), _files(reference)
    assert resumed.keys() == uninterrupted.keys()
    assert [k for k in resumed if resumed[k] != uninterrupted[k]] == []


def test_bad_run_options_name_the_flag() -> None:
    from nearid_world.world_model import parse_args

    with pytest.raises(ValueError, match="--device: expected a torch device .*got 'gpu0'"):
        parse_args(["--output_dir", "o", "--device", "gpu0"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device: 'cuda': no CUDA device is available here"):
            parse_args(["--output_dir", "o", "--device", "cuda"])
    with pytest.raises(ValueError, match="--checkpoint_every must be >= 0, got -1"):
        parse_args(["--output_dir", "o", "--checkpoint_every", "-1"])
    with pytest.raises(ValueError, match="--eval_count must be >= 1, got 0"):
        parse_args(["--output_dir", "o", "--eval_count", "0"])


# ---------------------------------------------------------------------------------------------- training levers
def test_denoising_loss_targets_and_min_snr_weights_by_hand() -> None:
    from nearid_world.world_model import denoising_loss

    # two samples, one value each: alpha_bar 0.25 (SNR 1/3) and 0.9 (SNR 9); x0 = 1, noise = 2, prediction 0
    a = torch.tensor([0.25, 0.9]).view(2, 1, 1, 1)
    x0, noise, zero = torch.ones(2, 1, 1, 1), torch.full((2, 1, 1, 1), 2.0), torch.zeros(2, 1, 1, 1)
    eps = WorldModelConfig(prediction_type="epsilon", snr_gamma=0.0)
    assert denoising_loss(zero, x0, noise, a, eps).item() == pytest.approx(4.0)  # (0 - 2)^2
    v = WorldModelConfig(prediction_type="v_prediction", snr_gamma=0.0)
    # v = sqrt(a) * 2 - sqrt(1 - a) * 1: 1 - sqrt(0.75) and 2 sqrt(0.9) - sqrt(0.1)
    v0, v1 = 1 - 0.75**0.5, 2 * 0.9**0.5 - 0.1**0.5
    assert denoising_loss(zero, x0, noise, a, v).item() == pytest.approx((v0**2 + v1**2) / 2)
    # gamma 5: the low-SNR sample keeps weight 1 (eps) or 1/3 / (4/3) = 1/4 (v); the high-SNR one 5/9 or 5/10
    eps5 = WorldModelConfig(prediction_type="epsilon", snr_gamma=5)
    assert denoising_loss(zero, x0, noise, a, eps5).item() == pytest.approx((4.0 + 5 / 9 * 4.0) / 2)
    assert denoising_loss(zero, x0, noise, a, WorldModelConfig(prediction_type="v_prediction", snr_gamma=5)).item() \
        == pytest.approx((0.25 * v0**2 + 0.5 * v1**2) / 2)


def test_levers_reach_the_saved_pipeline(tmp_path: Path) -> None:
    """Full-resolution cross-attention and the prediction type are in the saved UNet and scheduler, so sampling uses
    them; the defaults are the shipped recipe (attention only in the second block, v-prediction, min-SNR 5)."""
    from diffusers import StableDiffusionPipeline

    default = build_world_pipeline(WorldModelConfig(unet_channels=[16, 32], text_width=32))
    assert not hasattr(default.unet.down_blocks[0], "attentions")
    assert (default.scheduler.config.prediction_type, WorldModelConfig().snr_gamma) == ("v_prediction", 5.0)
    out = tmp_path / "levers"
    argv = [*TINY, "--eval_every", "0", "--checkpoint_every", "0", "--unet_steps", "3", "--vae_steps", "2",
            "--attention_at_full_resolution", "--prediction_type", "epsilon", "--snr_gamma", "2"]
    assert main([*argv, "--output_dir", str(out)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert len(pipe.unet.down_blocks[0].attentions) == 1 and len(pipe.unet.up_blocks[1].attentions) == 2
    config = json.loads((out / CONFIG_NAME).read_text())["config"]
    assert (config["prediction_type"], config["snr_gamma"], config["attention_at_full_resolution"]) == (
        "epsilon", 2.0, True)


def test_bad_lever_values_name_the_field() -> None:
    with pytest.raises(ValueError, match="prediction_type must be one of .*got 'sample'"):
        WorldModelConfig(prediction_type="sample")
    with pytest.raises(ValueError, match="snr_gamma must be >= 0"):
        WorldModelConfig(snr_gamma=-1.0)
