"""``nearid-score``: table and JSON output agree with the library's own scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nearid_reward import NearIDModel
from nearid_reward.cli.score import main
from nearid_reward.similarity import reference_scores
from nearid_reward.testing import write_random_images


@pytest.fixture(scope="module")
def image_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("score")
    write_random_images(root / "refs", 3, 40, seed=1)
    write_random_images(root / "gen", 2, 52, seed=2)
    return root / "refs", root / "gen"


def test_json_output_matches_library(
    tiny_head: Path, image_dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    refs, gen = image_dirs
    assert (
        main(
            [
                "--model",
                str(tiny_head),
                "--references",
                str(refs),
                "--images",
                str(gen),
                "--json",
                "--aggregate",
                "max",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    model = NearIDModel.from_pretrained(tiny_head)
    with torch.no_grad():
        expected = reference_scores(model.embed(gen), model.embed(refs), "max")
    got = torch.tensor([r["score"] for r in data["results"]])
    assert torch.allclose(got, expected, atol=1e-5)
    assert data["aggregate"] == "max" and -1.0 <= data["reference_oracle"] <= 1.0
    assert [Path(r["image"]).name for r in data["results"]] == ["img_000.png", "img_001.png"]
    # with aggregate=max the score is the nearest reference's similarity
    assert all(abs(r["score"] - r["nearest_similarity"]) < 1e-6 for r in data["results"])


def test_table_output(tiny_head: Path, image_dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    refs, gen = image_dirs
    files = sorted(str(p) for p in gen.iterdir())
    assert main(["--model", str(tiny_head), "--references", str(refs), "--images", *files]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["image", "score"]
    assert len(out) == 1 + 2 + 1 and out[-1].startswith("reference oracle")


def test_missing_path(tiny_head: Path, image_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    refs, _ = image_dirs
    with pytest.raises(SystemExit, match="image path not found"):
        main(["--model", str(tiny_head), "--references", str(refs), "--images", str(tmp_path / "nope")])
