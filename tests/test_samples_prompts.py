"""``nearid-prompts``: each file parses back in the trainer's own format (the sd-scripts prompt-line grammar, YAML
through PyYAML, JSON) with the shipped identity and class prompts, filled, and seed ``seed + i`` for image ``i``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from nearid_reward.cli import prompts as prompts_cli
from nearid_reward.rendering import PromptSet

SEED = 1000
SHIPPED = PromptSet.default().fill("sks", "dog")
EXPECTED = SHIPPED.instance + SHIPPED.class_prompts  # identity prompts first


def _write(tmp_path: Path, fmt: str, *extra: str, capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    out = tmp_path / f"prompts.{fmt}"
    assert prompts_cli.main(["--format", fmt, "--output", str(out), "--instance_token", "sks", "--class_noun", "dog",
                             "--seed", str(SEED), *extra]) == 0
    return out.read_text(encoding="utf-8"), capsys.readouterr().out


def _sd_scripts_line(line: str) -> dict[str, str]:
    """sd-scripts' prompt-line grammar: the prompt, then options ` --<letter> <value>`."""
    prompt, *options = line.split(" --")
    parsed = {"prompt": prompt.strip()}
    for option in options:
        key, _, value = option.strip().partition(" ")
        parsed[key] = value.strip()
    return parsed


def test_kohya_prompt_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, printed = _write(tmp_path, "kohya", "--width", "768", "--height", "512", "--steps", "20",
                           "--guidance_scale", "3.5", "--negative_prompt", "blurry, low quality", capsys=capsys)
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    parsed = [_sd_scripts_line(line) for line in lines]
    assert [p["prompt"] for p in parsed] == EXPECTED and len(EXPECTED) == 12
    assert [int(p["d"]) for p in parsed] == [SEED + i for i in range(12)]
    assert {(p["w"], p["h"], p["s"], p["l"], p["n"]) for p in parsed} == {("768", "512", "20", "3.5",
                                                                           "blurry, low quality")}
    assert "a photo of sks dog" in EXPECTED and "a photo of a dog" in EXPECTED
    assert "--class_prompt_start 8" in printed  # 8 identity prompts in the shipped set


def test_ai_toolkit_sample_block(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, _ = _write(tmp_path, "ai-toolkit", "--guidance_scale", "4", capsys=capsys)
    sample = yaml.safe_load(text)["sample"]
    assert sample["prompts"] == EXPECTED
    assert sample["seed"] == SEED and sample["walk_seed"] is True  # prompt i renders with seed + i
    assert (sample["width"], sample["height"], sample["sample_steps"], sample["guidance_scale"]) == (1024, 1024, 25, 4)
    assert "neg" not in sample


def test_simpletuner_user_prompt_library(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, printed = _write(tmp_path, "simpletuner", capsys=capsys)
    library = json.loads(text)
    assert list(library) == [f"identity_{i:02d}" for i in range(8)] + [f"class_{i:02d}" for i in range(4)]
    assert list(library.values()) == EXPECTED
    assert f"--validation_seed {SEED}" in printed


def test_onetrainer_sample_definitions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, _ = _write(tmp_path, "onetrainer", "--images_per_prompt", "2", "--no_class_prompts", capsys=capsys)
    samples = json.loads(text)
    assert [s["prompt"] for s in samples] == [p for p in SHIPPED.instance for _ in range(2)]
    assert [s["seed"] for s in samples] == [SEED + i for i in range(16)]
    assert all(s["enabled"] is True and s["random_seed"] is False for s in samples)
    assert {(s["width"], s["height"], s["diffusion_steps"]) for s in samples} == {(1024, 1024, 25)}
    assert "cfg_scale" not in samples[0]  # None: OneTrainer keeps its own default


def test_placeholders_need_a_token(tmp_path: Path) -> None:
    custom = tmp_path / "mine.txt"
    custom.write_text("a photo of {token} {class}\n")
    out = tmp_path / "p.txt"
    assert prompts_cli.main(["--format", "kohya", "--output", str(out), "--prompts", str(custom),
                             "--instance_token", "zwx", "--class_noun", "cat"]) == 0
    assert _sd_scripts_line(out.read_text().splitlines()[1])["prompt"] == "a photo of zwx cat"
    with pytest.raises(SystemExit) as raised:
        prompts_cli.main(["--format", "kohya", "--output", str(out), "--steps", "0"])
    assert str(raised.value.code).startswith("nearid-prompts: width/height must be >= 8 and steps >= 1")
