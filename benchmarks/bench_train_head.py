"""Head-training epoch time with and without the feature cache, measured side by side in one run.

Both runs use the real trainer (``train_head.train.train``) on the same synthetic data, backbone, batch size and
seed; the only difference is ``--no_feature_cache``. Reported: the median epoch time of each over ``--epochs``
epochs (the first, warm-up epoch is dropped), their ratio, the one-off cache build time and the cache size per image.

Reproduce::

    python benchmarks/bench_train_head.py                      # 256 identities, 64 px, 4-layer 128-wide backbone
    python benchmarks/bench_train_head.py --layers 8 --identities 512
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nearid_reward.files import read_jsonl  # noqa: E402
from train_head.synthetic import SyntheticConfig, generate_synthetic  # noqa: E402
from train_head.train import TrainConfig, train  # noqa: E402


def _backbone(folder: Path, width: int, layers: int, size: int) -> Path:
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    if not (folder / "model.safetensors").is_file():
        torch.manual_seed(0)
        SiglipVisionModel(SiglipVisionConfig(
            hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=4,
            image_size=size, patch_size=8, vision_use_head=True)).save_pretrained(str(folder))
        SiglipImageProcessorPil(size={"height": size, "width": size}, resample=3, image_mean=[0.5] * 3,
                                image_std=[0.5] * 3).save_pretrained(str(folder))
    return folder


def _epoch_times(out: Path) -> list[float]:
    return [r["seconds"] for r in read_jsonl(out / "history.jsonl") if r["kind"] == "epoch" and r["complete"]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="bench_out/train_head")
    p.add_argument("--identities", type=int, default=256)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=4, help="epochs per run (the first is dropped as warm-up)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of both runs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    data = work / f"data-{args.identities}-{args.image_size}"
    if not (data / "synthetic_config.json").is_file():
        generate_synthetic(data, SyntheticConfig(num_identities=args.identities, image_size=args.image_size,
                                                 val_fraction=0.0, test_fraction=0.0, supersample=2))
    backbone = _backbone(work / f"backbone-w{args.width}-l{args.layers}-{args.image_size}", args.width, args.layers,
                         args.image_size)
    results = {}
    for mode in ("cached", "uncached"):
        out = work / f"run-{mode}"
        shutil.rmtree(out, ignore_errors=True)
        config = TrainConfig(
            backbone=str(backbone), output_dir=str(out), train_data=str(data / "positives"),
            distractors=[str(data / "distractors" / lv) for lv in ("colour", "pattern", "part")],
            train_batch_size=args.batch_size, num_train_epochs=args.epochs, lr_warmup_steps=0, report_to="none",
            checkpointing_steps=10**9, validation_steps=10**9, logging_steps=10**9,
            no_feature_cache=mode == "uncached", dataloader_num_workers=args.workers,
        )
        started = time.perf_counter()
        summary = train(config)
        total = time.perf_counter() - started
        epochs = _epoch_times(out)
        cache_bytes = sum(f.stat().st_size for f in (out / "feature_cache").rglob("tokens-*.npy")) \
            if mode == "cached" else 0
        results[mode] = {"epochs": epochs, "median": statistics.median(epochs[1:] or epochs), "total": total,
                         "steps": summary["global_step"], "cache_bytes": cache_bytes}
    cached, uncached = results["cached"], results["uncached"]
    cache_root = work / "run-cached" / "feature_cache"
    keys = sum(len(json.loads(f.read_text())["keys"]) for f in cache_root.rglob("tokens-*.json"))
    n_images = keys or 1
    setup = cached["total"] - sum(cached["epochs"])
    print(f"config: {args.identities} identities x (3 views + 3 levels x 3 distractors), {args.image_size} px, "
          f"backbone {args.width} wide x {args.layers} layers (patch 8), batch {args.batch_size}, "
          f"{args.threads} thread(s), {args.workers} worker(s), {cached['steps'] // args.epochs} steps/epoch")
    print()
    print("| run | median epoch s | epochs (s) |")
    print("|---|---|---|")
    for mode in ("uncached", "cached"):
        r = results[mode]
        print(f"| {mode} | {r['median']:.3f} | {', '.join(f'{e:.3f}' for e in r['epochs'])} |")
    print()
    print(f"speed-up per epoch (uncached / cached median): {uncached['median'] / cached['median']:.1f}x")
    print(f"cache: {n_images} images, {cached['cache_bytes'] / n_images / 1024:.1f} KiB per image "
          f"({cached['cache_bytes'] / 2**20:.1f} MiB), one-off setup incl. encoding {setup:.1f} s")
    (work / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
