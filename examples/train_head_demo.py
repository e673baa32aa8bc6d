"""Train a NearID head on the synthetic world and compare it with the frozen baseline on held-out identities.

Stages (each timed; data and the pretrained tiny backbone are kept in ``demo_out/train_head`` and reused):

1. ``nearid-make-synthetic``-style data: identities with colour-level near-identity distractors (the same object with
   another primary hue, on the same background at the same place), 64 px;
2. a tiny SigLIP backbone with a short generic pretraining on the synthetic world (cached after the first run);
3. ``nearid-train-head`` on the training identities (feature cache on: the backbone encodes each image once);
4. ``nearid-eval`` of the frozen backbone (its own head) and of the trained head on the held-out test identities.

Run with ``make demo`` (or ``python examples/train_head_demo.py``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train_head import eval as nearid_eval  # noqa: E402
from train_head import train as nearid_train  # noqa: E402
from train_head.synthetic import SyntheticConfig, generate_synthetic  # noqa: E402
from train_head.synthetic_backbone import BackbonePretrainConfig, pretrain_synthetic_backbone  # noqa: E402

OUT = Path("demo_out/train_head")
# Only the colour level: at this budget the short pretraining teaches the backbone's own pooling head the object's
# pattern first (a pattern read-out is one of its targets), so the frozen baseline already separates most pattern
# distractors and a 600-step head cannot show a clear gain there; benchmarks/bench_synthetic.py covers every level.
LEVELS = ("colour",)
DATA = SyntheticConfig(num_identities=2000, image_size=64, levels=LEVELS, seed=0, val_fraction=0.1,
                       test_fraction=0.1, supersample=2)
BACKBONE = BackbonePretrainConfig(image_size=64, hidden_size=128, intermediate_size=512, num_hidden_layers=1,
                                  steps=600, num_images=3000)
HEAD_STEPS = 600
TEMPERATURE = 0.1


def same_data(folder: Path) -> bool:
    """Whether ``folder`` already holds the data of :data:`DATA` (then it is reused)."""
    stamp = folder / "synthetic_config.json"
    if not stamp.is_file():
        return False
    stored = json.loads(stamp.read_text())
    stored.pop("seconds", None)
    return stored == {**dataclasses.asdict(DATA), "levels": list(DATA.levels)}


def stage(name: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:6.1f} s] {name}")


def main() -> None:
    torch.set_num_threads(1)  # tiny models: one thread is as fast and never fights other processes
    data_dir = OUT / "data"
    t = time.perf_counter()
    if not same_data(data_dir):
        generate_synthetic(data_dir, DATA, progress=True)
    stage(f"synthetic data: {DATA.num_identities} identities, {' and '.join(LEVELS)} distractors ({data_dir})", t)
    t = time.perf_counter()
    backbone = pretrain_synthetic_backbone(OUT / "backbone", BACKBONE, progress=True)
    stage(f"tiny SigLIP backbone pretrained on the synthetic world ({backbone})", t)

    t = time.perf_counter()
    run = OUT / "run"
    distractors = [str(data_dir / "distractors" / lv) for lv in LEVELS]
    nearid_train.main([
        "--backbone", str(backbone), "--output_dir", str(run), "--train_data", str(data_dir / "positives"),
        "--distractors", *distractors, "--train_indices", str(data_dir / "splits" / "train.json"),
        "--val_data", str(data_dir / "positives"), "--val_distractors", *distractors,
        "--val_indices", str(data_dir / "splits" / "val.json"),
        "--train_batch_size", "128", "--max_train_steps", str(HEAD_STEPS), "--learning_rate", "3e-3",
        "--lr_warmup_steps", "50", "--alpha", "0", "--temperature", str(TEMPERATURE),
        "--validation_steps", "100", "--checkpointing_steps", "300",
        "--logging_steps", "50", "--report_to", "none", "--seed", "0",
    ])
    stage(f"head trained: {HEAD_STEPS} steps, best validation head in {run / 'best'}", t)

    t = time.perf_counter()
    results = {}
    for name, model in (("frozen backbone (own head)", backbone), ("trained NearID head", run / "best")):
        report = OUT / "eval" / ("frozen" if "frozen" in name else "trained")
        nearid_eval.main(["--model", str(model), "--data", str(data_dir / "positives"), "--distractors", *distractors,
                          "--indices", str(data_dir / "splits" / "test.json"), "--output_dir", str(report)])
        results[name] = json.loads((report / "metrics.json").read_text())["settings"]
    stage("evaluated on held-out identities", t)
    print()
    print(f"held-out test identities: {int(results['trained NearID head']['colour']['n_samples'])}")
    print("| model | " + " | ".join(f"{s} SSR | {s} PA" for s in (*LEVELS, "pooled")) + " |")
    print("|---|" + "---|---|" * (len(LEVELS) + 1))
    for name, settings in results.items():
        cells = " | ".join(f"{settings[s]['ssr']:.1f} | {settings[s]['pa']:.1f}" for s in (*LEVELS, "pooled"))
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
