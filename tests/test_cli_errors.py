"""Every command ends an expected user error with one clear line and a non-zero status; tracebacks only with
``--debug`` and for real bugs; ``--device`` is checked before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from integrations import dreambooth
from nearid_reward import NearIDModel
from nearid_reward.cli import score, select
from nearid_reward.files import CheckpointError
from nearid_reward.testing import write_random_images
from train_head import eval as eval_cli
from train_head import synthetic
from train_head import train as train_cli


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli-errors")
    write_random_images(root / "refs", 2, 32, seed=1)
    return root / "refs"


def _commands(images: Path, missing: Path) -> dict[str, tuple[Callable[..., int], list[str], str]]:
    """command -> (main, argv that fails on a missing input, the start of its message)."""
    return {
        "nearid-score": (score.main, ["--model", str(missing), "--references", str(images), "--images", str(images)],
                         "nearid-score: checkpoint folder not found"),
        "nearid-select": (select.main, ["--output_dir", str(missing), "--pipeline", str(missing), "--model",
                                        str(missing), "--references", str(images), "--device", "cpu"],
                          "nearid-select: checkpoint folder not found"),
        "nearid-train-head": (train_cli.main, ["--backbone", str(missing), "--output_dir", str(missing.parent / "o"),
                                               "--train_data", str(missing), "--report_to", "none"],
                              "nearid-train-head: dataset not found"),
        "nearid-eval": (eval_cli.main, ["--model", str(missing), "--data", str(images), "--output_dir",
                                        str(missing.parent / "e")], "nearid-eval: checkpoint folder not found"),
        "nearid-dreambooth": (dreambooth.main, ["--script", str(missing / "train.py"), "--nearid_model", "m",
                                                "--nearid_reference_dir", "r"],
                              "nearid-dreambooth: training script not found"),
        "nearid-make-synthetic": (synthetic.main, ["--output_dir", str(missing), "--num_identities", "0"],
                                  "nearid-make-synthetic: SyntheticConfig.num_identities"),
    }


@pytest.mark.parametrize("command", ["nearid-score", "nearid-select", "nearid-train-head", "nearid-eval",
                                     "nearid-dreambooth", "nearid-make-synthetic"])
def test_expected_errors_exit_with_the_message_and_debug_keeps_the_traceback(
    images: Path, tmp_path: Path, command: str
) -> None:
    main, argv, message = _commands(images, tmp_path / "missing")[command]
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert str(raised.value.code).startswith(message), raised.value.code
    assert "--debug" in str(raised.value.code)
    ours = argv[: argv.index("--")] if "--" in argv else argv
    with pytest.raises((ValueError, OSError)):  # the original exception, with its traceback
        main([*ours, "--debug"])


def test_from_a_shell_the_message_comes_without_a_traceback(images: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    argv = [sys.executable, "-m", "nearid_reward.cli.score", "--model", str(tmp_path / "nope"), "--references",
            str(images), "--images", str(images)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("nearid-score: checkpoint folder not found")
    assert str(tmp_path / "nope") in done.stderr
    debug = subprocess.run([*argv, "--debug"], env=env, capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "CheckpointError" in debug.stderr


def test_real_bugs_keep_their_traceback(images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(*args: object, **kwargs: object) -> None:
        raise KeyError("an internal bug")

    monkeypatch.setattr(score.NearIDModel, "from_pretrained", bug)
    with pytest.raises(KeyError, match="an internal bug"):
        score.main(["--model", "m", "--references", str(images), "--images", str(images)])


@pytest.mark.parametrize("main,extra,prog", [
    (score.main, ["--references", "r", "--images", "i", "--model", "m"], "nearid-score"),
    (select.main, ["--output_dir", "o", "--pipeline", "p", "--model", "m", "--references", "r"], "nearid-select"),
])
def test_bad_device_is_refused_by_the_options_before_anything_runs(
    main: Callable[..., int], extra: list[str], prog: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded although the options were bad")

    monkeypatch.setattr(NearIDModel, "from_pretrained", never)
    with pytest.raises(SystemExit) as raised:
        main([*extra, "--device", "gpu0"])
    assert raised.value.code.startswith(
        f"{prog}: --device: expected a torch device such as cpu, cuda, cuda:1 or mps; got 'gpu0'"
    )
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as raised:
            main([*extra, "--device", "cuda:1"])
        assert raised.value.code.startswith(f"{prog}: --device: 'cuda:1': no CUDA device is available here")


@pytest.mark.parametrize("main,extra", [
    (eval_cli.main, ["--model", "m", "--output_dir", "o"]),
])
def test_bad_device_is_refused_before_anything_runs(
    main: Callable[..., int], extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        main([*extra, "--device", "gpu0"])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device: expected a torch device such as cpu, cuda, cuda:1 or mps; got 'gpu0'" in err
    assert "Traceback" not in err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            main([*extra, "--device", "cuda:1"])
        assert "argument --device: 'cuda:1': no CUDA device is available here" in capsys.readouterr().err


def test_checkpoint_errors_are_expected_errors() -> None:
    from nearid_reward.cli.entry_points import EXPECTED_ERRORS

    assert issubclass(CheckpointError, EXPECTED_ERRORS) and issubclass(FileNotFoundError, EXPECTED_ERRORS)
    assert not issubclass(KeyError, EXPECTED_ERRORS) and not issubclass(TypeError, EXPECTED_ERRORS)


def test_ctrl_c_ends_a_command_with_one_line_and_status_130(capsys):
    from nearid_reward.cli.entry_points import INTERRUPTED_STATUS, entry_point

    @entry_point("nearid-demo")
    def main(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as raised:
        main([])
    assert raised.value.code == INTERRUPTED_STATUS == 130
    assert capsys.readouterr().err.strip() == "nearid-demo: interrupted"
    with pytest.raises(KeyboardInterrupt):  # --debug keeps the traceback
        main(["--debug"])


def _mistype(file: Path, *path: str, value: object = "thirty-two") -> None:
    data = json.loads(file.read_text())
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    file.write_text(json.dumps(data))


# (format, kind, with_text, file relative to the folder written, field path): a mistyped field in every config a
# loader reads; the folder passed to from_pretrained is what save_tiny_nearid returns
MISTYPED_CONFIGS = {
    "siglip": ("siglip", "siglip", False, "config.json", ("hidden_size",)),
    "siglip2": ("siglip", "siglip2", False, "config.json", ("hidden_size",)),
    "siglip-with-text": ("siglip", "siglip", True, "config.json", ("vision_config", "hidden_size")),
    "release": ("release", "siglip", False, "config.json", ("vision_config", "hidden_size")),
    "head": ("head", "siglip", False, "head/nearid_config.json", ("head", "hidden_size")),
    "head-backbone": ("head", "siglip", False, "backbone/config.json", ("hidden_size",)),
    "head-preprocess": ("head", "siglip", False, "head/nearid_config.json", ("preprocess", "height")),
    "preprocessor": ("siglip", "siglip", False, "preprocessor_config.json", ("resample",)),
    "preprocessor-mean": ("siglip", "siglip", False, "preprocessor_config.json", ("image_mean",)),
}


@pytest.mark.parametrize("case", sorted(MISTYPED_CONFIGS))
def test_a_mistyped_config_field_is_a_one_line_checkpoint_error(
    case: str, tmp_path: Path, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nearid_reward.testing import save_tiny_nearid, save_tiny_siglip

    fmt, kind, with_text, relative, field = MISTYPED_CONFIGS[case]
    root = tmp_path / "model"
    folder = (save_tiny_siglip(root, with_text=True) if with_text
              else save_tiny_nearid(root, format=fmt, kind=kind))  # type: ignore[arg-type]
    bad_file = root / relative
    _mistype(bad_file, *field)
    with pytest.raises(CheckpointError) as raised:
        NearIDModel.from_pretrained(folder)
    message = str(raised.value)
    assert "\n" not in message and "Traceback" not in message
    assert bad_file.name in message and field[-1] in message and "thirty-two" in message, message
    assert Path(message.split(": ", 1)[0]).resolve() == bad_file.resolve()  # the message starts with the file
    with pytest.raises(SystemExit) as exited:
        score.main(["--model", str(folder), "--references", str(images), "--images", str(images)])
    assert str(exited.value.code).startswith(f"nearid-score: {message}")
    assert "Traceback" not in capsys.readouterr().err
