"""Checkpoint selection: a real tiny diffusers pipeline with LoRA checkpoints whose identity order is known by
construction, the content-hash cache, full-model checkpoints, outputs, the CLI, bad input and two processes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from nearid_reward import CheckpointSelector, IdentityValidator, NearIDModel, PromptSet, RenderConfig, SelectionConfig
from nearid_reward.files import CheckpointError
from nearid_reward.rendering import render_validation_set
from nearid_reward.run_checkpoints import content_hash, find_checkpoints, inspect_checkpoint
from nearid_reward.testing import save_tiny_nearid, write_random_images
from nearid_reward.testing.pipelines import (
    LORA_WEIGHT_NAME,
    add_lora_adapter,
    build_tiny_sd_pipeline,
    save_tiny_sd_pipeline,
    write_full_checkpoint,
    write_lora_checkpoints,
)

PROMPTS = PromptSet(["a photo of sks dog", "a sks dog on the beach", "sks dog in the snow"])
RENDER = RenderConfig(num_inference_steps=2, guidance_scale=1.0, render_class=False)
# step -> lora_B scale. The references are the renders of the full adapter (scale 1), so the right ranking
# follows the scale, not the step: 200 (an exact reproduction), 400, 100, 300, then 500 (scale 0 = base model).
SCALES = {100: 0.5, 200: 1.0, 300: 0.25, 400: 0.75, 500: 0.0}
EXPECTED = ["checkpoint-200", "checkpoint-400", "checkpoint-100", "checkpoint-300", "checkpoint-500"]


@pytest.fixture(scope="module")
def nearid(tmp_path_factory):
    path = save_tiny_nearid(tmp_path_factory.mktemp("nearid"))
    return path, NearIDModel.from_pretrained(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with five LoRA checkpoints and the reference images (renders of the full adapter)."""
    root = tmp_path_factory.mktemp("run")
    pipe = build_tiny_sd_pipeline(seed=0)
    add_lora_adapter(pipe.unet, rank=4, seed=3, b_std=0.3)
    refs = render_validation_set(pipe, PROMPTS, config=RENDER).images
    write_lora_checkpoints(root / "out", pipe, SCALES)
    return root / "out", refs


def _selector(model, refs, **overrides):
    validator = IdentityValidator(model, refs, prefix="", aggregate="max")
    config = SelectionConfig(**{"render": RENDER, **overrides})
    return CheckpointSelector(build_tiny_sd_pipeline(seed=0), validator, PROMPTS, config=config)


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("identity_selection*", "best_identity"))
    return dst


@pytest.fixture(scope="module")
def ranked(nearid, run, tmp_path_factory):
    """One full selection (with the winner copied), shared by the tests that inspect its outputs."""
    out = _copy_run(run[0], tmp_path_factory.mktemp("ranked") / "out")
    return out, _selector(nearid[1], run[1], winner="copy").run(out)


def test_ranking_known_by_construction_and_outputs(ranked):
    out, result = ranked
    assert [r["name"] for r in result.rows] == EXPECTED
    winner = result.winner
    assert winner["identity_min"] == pytest.approx(1.0, abs=1e-5)  # every render reproduces its reference
    assert winner["copy_fraction"] == 1.0  # ... and is flagged as a copy, as it should be
    rows = {r["name"]: r for r in result.rows}
    assert rows["checkpoint-500"]["identity_gain"] == pytest.approx(0.0, abs=1e-6)  # scale 0 is the base model
    assert result.base["identity_mean"] == pytest.approx(rows["checkpoint-500"]["identity_mean"], abs=1e-6)
    assert all(rows[n]["identity_gain"] > 0 for n in EXPECTED[:-1])
    # files
    data = json.loads((out / "identity_selection.json").read_text())
    assert data["winner"] == "checkpoint-200" and [r["name"] for r in data["checkpoints"]] == EXPECTED
    with open(out / "identity_selection.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [r["name"] for r in table] == EXPECTED and [r["rank"] for r in table] == ["1", "2", "3", "4", "5"]
    with Image.open(out / "identity_selection.png") as png:
        assert png.format == "PNG" and png.width > 100
    best = out / "best_identity"
    assert (best / LORA_WEIGHT_NAME).read_bytes() == (out / "checkpoint-200" / LORA_WEIGHT_NAME).read_bytes()
    assert json.loads((best / "identity_scores.json").read_text())["row"]["name"] == "checkpoint-200"
    # timings are measured per phase
    assert all(r["time_render_s"] > 0 and r["time_load_s"] > 0 for r in result.rows)


def test_rerun_uses_the_content_hash_cache(nearid, run, ranked, tmp_path, monkeypatch):
    import shutil

    import nearid_reward.selection as selection

    out = tmp_path / "out"
    shutil.copytree(ranked[0], out)
    rendered: list[str] = []
    original = selection.render_validation_set
    monkeypatch.setattr(selection, "render_validation_set",
                        lambda *a, **k: rendered.append("x") or original(*a, **k))
    again = _selector(nearid[1], run[1], plot=False).run(out)
    assert rendered == [] and all(r["cached"] for r in again.rows)
    assert [r["name"] for r in again.rows] == EXPECTED
    # new weights in one checkpoint (same name): only that one is rendered again
    src = out / "checkpoint-200" / LORA_WEIGHT_NAME
    (out / "checkpoint-300" / LORA_WEIGHT_NAME).write_bytes(src.read_bytes())
    third = _selector(nearid[1], run[1], plot=False).run(out)
    assert len(rendered) == 1
    rows = {r["name"]: r for r in third.rows}
    assert not rows["checkpoint-300"]["cached"] and rows["checkpoint-100"]["cached"]
    assert rows["checkpoint-300"]["identity_mean"] == pytest.approx(rows["checkpoint-200"]["identity_mean"], abs=1e-6)
    # other references, aggregation or prompts change the settings fingerprint: nothing would be reused
    fingerprint = _selector(nearid[1], run[1]).fingerprint()
    assert _selector(nearid[1], run[1][:2]).fingerprint() != fingerprint
    other = _selector(nearid[1], run[1])
    other.prompts = PromptSet(["a photo of sks dog"])
    assert other.fingerprint() != fingerprint


def test_without_matplotlib_the_ranking_is_written_and_only_the_plot_is_skipped(
    nearid, run, ranked, tmp_path, monkeypatch, caplog
):
    import logging
    import shutil

    out = tmp_path / "out"
    shutil.copytree(ranked[0], out)
    (out / "identity_selection.png").unlink()
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with caplog.at_level(logging.WARNING):
        result = _selector(nearid[1], run[1]).run(out)  # plot=True, the default; every row comes from the cache
    assert [r["name"] for r in result.rows] == EXPECTED
    assert "png" not in result.files and not (out / "identity_selection.png").exists()
    assert json.loads((out / "identity_selection.json").read_text())["winner"] == "checkpoint-200"
    assert (out / "identity_selection.csv").is_file()
    assert "matplotlib is not installed" in caplog.text and "nearid-reward[plot]" in caplog.text


def test_hotswap_gives_the_same_scores(nearid, run, ranked):
    names = ["checkpoint-100", "checkpoint-200", "checkpoint-300"]
    render = RenderConfig(num_inference_steps=2, guidance_scale=1.0, render_class=False, render_base=False)
    swapped = _selector(nearid[1], run[1], use_cache=False, plot=False, hotswap=True, render=render)
    loaded_before = swapped.pipeline.unet
    result = swapped.run(run[0], checkpoints=names)
    assert swapped.pipeline.unet is loaded_before and not swapped.pipeline.get_list_adapters()
    expected = {r["name"]: r["identity_mean"] for r in ranked[1].rows}
    for row in result.rows:
        assert row["identity_mean"] == pytest.approx(expected[row["name"]], abs=1e-6)
    assert [r["name"] for r in result.rows] == ["checkpoint-200", "checkpoint-100", "checkpoint-300"]


def test_full_unet_checkpoints_are_loaded_in_place(nearid, run, tmp_path):
    refs = run[1]
    out = tmp_path / "full"
    same = build_tiny_sd_pipeline(seed=0).unet
    write_full_checkpoint(out / "checkpoint-10", same)  # identical to the base model
    other = build_tiny_sd_pipeline(seed=7).unet  # different weights
    write_full_checkpoint(out / "checkpoint-20", other)
    selector = _selector(nearid[1], refs, plot=False, winner="symlink")
    pipeline_unet = selector.pipeline.unet
    result = selector.run(out)
    rows = {r["name"]: r for r in result.rows}
    assert rows["checkpoint-10"]["kind"] == "unet"
    assert rows["checkpoint-10"]["identity_gain"] == pytest.approx(0.0, abs=1e-6)
    assert selector.pipeline.unet is pipeline_unet  # weights were swapped into the same module
    expected = _selector(nearid[1], refs)
    expected.pipeline.unet.load_state_dict(other.state_dict())
    images = render_validation_set(expected.pipeline, PROMPTS, config=RENDER).images
    assert rows["checkpoint-20"]["identity_mean"] == pytest.approx(
        expected.validator.compute(images)["identity_mean"], abs=1e-6)
    link = out / "best_identity"
    assert link.is_symlink() and link.resolve() == (out / result.winner["name"]).resolve()


def test_checkpoint_layout_errors(tmp_path):
    with pytest.raises(CheckpointError, match="output_dir not found"):
        find_checkpoints(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint-\\* folders"):
        find_checkpoints(tmp_path / "empty")
    run = tmp_path / "run"
    (run / "checkpoint-5").mkdir(parents=True)
    (run / "checkpoint-5" / "optimizer.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"checkpoint-5 holds no weights: expected pytorch_lora_weights"):
        find_checkpoints(run)
    (run / "checkpoint-6").mkdir()
    (run / "checkpoint-6" / LORA_WEIGHT_NAME).write_bytes(b"not really")
    assert [c.name for c in find_checkpoints(run, skip_invalid=True)] == ["checkpoint-6"]
    with pytest.raises(CheckpointError, match="not found.*checkpoint-7"):
        find_checkpoints(run, names=["checkpoint-6", "checkpoint-7"])
    unet = run / "checkpoint-8" / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text("{}")
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="only pickled weights"):
        inspect_checkpoint(run / "checkpoint-8")
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing weight shards"):
        inspect_checkpoint(run / "checkpoint-8")
    (unet / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        inspect_checkpoint(run / "checkpoint-8")
    with pytest.raises(CheckpointError, match="expected a name like checkpoint-500"):
        inspect_checkpoint(tmp_path / "empty")
    found = inspect_checkpoint(run / "checkpoint-6")
    before = content_hash(found)
    (run / "checkpoint-6" / LORA_WEIGHT_NAME).write_bytes(b"changed")
    assert content_hash(found) != before


def test_selector_bad_input(nearid, run, tmp_path):
    out = _copy_run(run[0], tmp_path / "out")
    with pytest.raises(ValueError, match="monitor 'identity_gain' is not available.*identity_mean"):
        _selector(nearid[1], run[1], monitor="identity_gain", plot=False,
                  render=RenderConfig(num_inference_steps=2, render_base=False, render_class=False)).run(out)
    with pytest.raises(ValueError, match="placeholders"):
        CheckpointSelector(build_tiny_sd_pipeline(), IdentityValidator(nearid[1], run[1]), PromptSet(["{} photo"]))
    with pytest.raises(ValueError, match="SelectionConfig.winner"):
        SelectionConfig(winner="move")
    (out / "checkpoint-600").mkdir()
    with pytest.raises(CheckpointError, match="checkpoint-600 holds no weights"):
        _selector(nearid[1], run[1], plot=False).run(out)


def _cli_args(root: Path, nearid_path: Path, refs_dir: Path, out: Path) -> list[str]:
    (root / "prompts.txt").write_text("a photo of {token} {class}\n", encoding="utf-8")
    return ["--output_dir", str(out), "--pretrained_model_name_or_path", str(root / "sd"),
            "--nearid_model", str(nearid_path), "--nearid_reference_dir", str(refs_dir), "--class_noun", "dog",
            "--prompts", str(root / "prompts.txt"), "--num_inference_steps", "2", "--guidance_scale", "1.0",
            "--no_class_prompts", "--no_plot", "--device", "cpu"]


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory, nearid, run):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_sd_pipeline(root / "sd")
    write_random_images(root / "refs", 3, 64, seed=2)
    return root


def test_cli_main(cli_setup, nearid, run, tmp_path, capsys):
    from nearid_reward.cli.select import main

    out = _copy_run(run[0], tmp_path / "out")
    args = _cli_args(cli_setup, nearid[0], cli_setup / "refs", out)
    assert main([*args, "--copy_winner"]) == 0
    printed = capsys.readouterr().out
    assert "winner: checkpoint-" in printed and "rank" in printed and "checkpoint-300" in printed
    data = json.loads((out / "identity_selection.json").read_text())
    assert len(data["checkpoints"]) == 5 and (out / "best_identity" / LORA_WEIGHT_NAME).is_file()
    assert data["settings"]["prompts"]["instance"] == ["a photo of sks dog"]
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["winner"]["name"] == data["winner"]
    with pytest.raises(SystemExit, match="nearid-select: .*contains no checkpoint"):
        main(_cli_args(cli_setup, nearid[0], cli_setup / "refs", cli_setup / "refs"))
    with pytest.raises(SystemExit, match="exclusive"):
        main([*args, "--copy_winner", "--link_winner"])


def test_pickled_pipeline_weights_are_refused_and_never_read(cli_setup, nearid, tmp_path, monkeypatch):
    from nearid_reward.cli.select import main
    from nearid_reward.pipelines import from_pretrained_safetensors, load_pipeline

    pickled = tmp_path / "sd-bin"
    build_tiny_sd_pipeline(seed=0).save_pretrained(str(pickled), safe_serialization=False)
    assert list((pickled / "unet").glob("*.bin")) and not list((pickled / "unet").glob("*.safetensors"))

    def unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", unpickling)
    with pytest.raises(CheckpointError, match=r"only pickled .*unet/: diffusion_pytorch_model\.bin.*never unpickles"):
        load_pipeline(pickled)
    args = _cli_args(cli_setup, nearid[0], cli_setup / "refs", tmp_path / "out")
    args[args.index("--pretrained_model_name_or_path") + 1] = str(pickled)
    with pytest.raises(SystemExit, match=r"nearid-select: .*sd-bin: only pickled weights.*safetensors only"):
        main(args)

    class HubModel:  # what diffusers raises for a hub id without safetensors weights
        @staticmethod
        def from_pretrained(path, **kwargs):
            assert kwargs["use_safetensors"] is True
            raise OSError(f"Error no file named diffusion_pytorch_model.safetensors found in directory {path}.")

    with pytest.raises(CheckpointError, match=r"org/model: no safetensors weights found .*never unpickles"):
        from_pretrained_safetensors(HubModel, "org/model", subfolder="unet")
    with pytest.raises(ValueError, match="use_safetensors must be True"):
        from_pretrained_safetensors(HubModel, "org/model", use_safetensors=False)


def test_one_load_pipeline_ready_to_render(tmp_path):
    from nearid_reward import pipelines, selection

    assert selection.load_pipeline is pipelines.load_pipeline  # one implementation, importable from both
    folder = save_tiny_sd_pipeline(tmp_path / "sd", seed=0)
    pipe = selection.load_pipeline(folder, torch_dtype=torch.bfloat16, device="cpu")
    assert pipe.unet.dtype == torch.bfloat16 and pipe.unet.device.type == "cpu"
    assert getattr(pipe, "safety_checker", None) is None and pipe._progress_bar_config == {"disable": True}


def test_two_processes_split_and_gather(cli_setup, nearid, run, tmp_path):
    """torchrun with two CPU processes: each scores its share, the main process writes the same ranking."""
    from nearid_reward.cli.select import main

    single = _copy_run(run[0], tmp_path / "single")
    assert main(_cli_args(cli_setup, nearid[0], cli_setup / "refs", single)) == 0
    double = _copy_run(run[0], tmp_path / "double")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    import socket

    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "nearid_reward.cli.select", *_cli_args(cli_setup, nearid[0], cli_setup / "refs", double),
           "--verbose"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 0/2 scores ['base', 'checkpoint-100', 'checkpoint-200']" in proc.stderr
    assert "process 1/2 scores ['checkpoint-300', 'checkpoint-400', 'checkpoint-500']" in proc.stderr
    assert proc.stdout.count("winner: checkpoint-") == 1  # only the main process prints and writes
    a = json.loads((single / "identity_selection.json").read_text())
    b = json.loads((double / "identity_selection.json").read_text())
    assert [r["name"] for r in a["checkpoints"]] == [r["name"] for r in b["checkpoints"]]
    for ra, rb in zip(a["checkpoints"], b["checkpoints"]):
        assert ra["identity_mean"] == pytest.approx(rb["identity_mean"], abs=1e-5)
    assert a["base"]["identity_mean"] == pytest.approx(b["base"]["identity_mean"], abs=1e-5)


def test_pipeline_dtype_is_part_of_the_settings(nearid, run):
    selector = _selector(nearid[1], run[1])
    before = selector.fingerprint()
    selector.pipeline.unet.to(torch.float64)
    assert selector.fingerprint() != before
