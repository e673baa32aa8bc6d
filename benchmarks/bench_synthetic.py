"""Miniature NearID reproduction on the synthetic world: an ablation table per distractor difficulty level.

On held-out identities (the test split), for each backbone (the synthetic-pretrained tiny SigLIP and, with
``--backbones pretrained random``, the same architecture with random weights):

* frozen own head (the backbone's own MAP head: step 0 of NearID training),
* mean pooling of the frozen backbone tokens,
* a trained NearID head with alpha = 0 (Tier 1 only) and with alpha = 0.5 (the paper's objective),

with SSR and PA (percent) per level and the wall time of each variant (training time for the trained heads; the
one-off feature-cache build is reported separately). One head is trained on all levels at once (each view's
distractor drawn from a random level, as NearID draws from several generators) unless ``--train_levels`` names
fewer levels.

Reproduce::

    python benchmarks/bench_synthetic.py                         # default: 2000 identities, 64 px, 1 thread
    python benchmarks/bench_synthetic.py --backbones pretrained random --identities 1000

Data, backbones and the feature cache are kept in ``--work_dir`` and reused by later runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nearid_reward import NearIDModel  # noqa: E402
from train_head.batching import CachedBatcher  # noqa: E402
from train_head.cache import FeatureStore, build_feature_cache, model_fingerprint  # noqa: E402
from train_head.data import load_nearid, read_index_file  # noqa: E402
from train_head.eval import ValidationSet, evaluate_model  # noqa: E402
from train_head.synthetic import LEVELS, SyntheticConfig, generate_synthetic  # noqa: E402
from train_head.synthetic_backbone import BackbonePretrainConfig, pretrain_synthetic_backbone  # noqa: E402
from train_head.train import TrainConfig, train  # noqa: E402


def ensure_data(folder: Path, config: SyntheticConfig) -> Path:
    stamp = folder / "synthetic_config.json"
    if stamp.is_file():
        stored = json.loads(stamp.read_text())
        stored.pop("seconds", None)
        wanted = dataclasses.asdict(config)
        wanted["levels"] = list(config.levels)
        if stored == wanted:
            return folder
    return generate_synthetic(folder, config)


def random_backbone(folder: Path, config: BackbonePretrainConfig) -> Path:
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    if (folder / "model.safetensors").is_file():
        return folder
    torch.manual_seed(config.seed)
    model = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        image_size=config.image_size, patch_size=config.patch_size, vision_use_head=True))
    model.save_pretrained(str(folder))
    SiglipImageProcessorPil(size={"height": config.image_size, "width": config.image_size}, resample=3,
                            image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(str(folder))
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="bench_out/synthetic")
    p.add_argument("--identities", type=int, default=2000)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbones", nargs="+", default=["pretrained"], choices=["pretrained", "random"])
    p.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS)
    p.add_argument("--train_levels", nargs="+", default=None, choices=LEVELS,
                   help="levels whose distractors train the head (default: all evaluated levels)")
    p.add_argument("--alphas", nargs="+", type=float, default=[0.0, 0.5])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--validation_steps", type=int, default=100)
    p.add_argument("--pretrain_steps", type=int, default=BackbonePretrainConfig.steps)
    p.add_argument("--pretrain_images", type=int, default=BackbonePretrainConfig.num_images)
    p.add_argument("--hidden_size", type=int, default=BackbonePretrainConfig.hidden_size)
    p.add_argument("--num_hidden_layers", type=int, default=BackbonePretrainConfig.num_hidden_layers)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = CPU time equals wall time)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    train_levels = args.train_levels or args.levels

    t0 = time.perf_counter()
    data_dir = ensure_data(work / f"data-{args.identities}-{args.image_size}-{args.seed}", SyntheticConfig(
        num_identities=args.identities, image_size=args.image_size, seed=args.seed, val_fraction=0.1,
        test_fraction=0.1, supersample=2))
    data_seconds = time.perf_counter() - t0
    splits = {name: read_index_file(data_dir / "splits" / f"{name}.json") for name in ("train", "val", "test")}
    data = load_nearid(data_dir / "positives", {lv: data_dir / "distractors" / lv for lv in args.levels})
    test = ValidationSet.build(data, splits["test"])
    print(f"data: {args.identities} identities ({len(splits['train'])} train / {len(splits['val'])} val / "
          f"{len(test.rows)} test), {args.image_size} px, levels {args.levels}; {data_seconds:.1f} s")

    bb_config = BackbonePretrainConfig(image_size=args.image_size, steps=args.pretrain_steps,
                                       num_images=args.pretrain_images, hidden_size=args.hidden_size,
                                       intermediate_size=4 * args.hidden_size,
                                       num_hidden_layers=args.num_hidden_layers, seed=args.seed)
    results = {}
    for kind in args.backbones:
        t0 = time.perf_counter()
        tag = f"{kind}-w{args.hidden_size}-l{args.num_hidden_layers}-{args.image_size}"
        if kind == "pretrained":
            tag += f"-s{args.pretrain_steps}-n{args.pretrain_images}"
            backbone = pretrain_synthetic_backbone(work / f"backbone-{tag}", bb_config)
            info = json.loads((backbone / "pretrain_config.json").read_text())
            print(f"backbone {kind}: {backbone} (pretraining {info['seconds']:.0f} s, held-out read-out "
                  f"{info['held_out_readout']})")
        else:
            backbone = random_backbone(work / f"backbone-{tag}", bb_config)
            print(f"backbone {kind}: {backbone}")
        model = NearIDModel.from_pretrained(backbone)
        cache_dir = work / "feature_cache"
        store = FeatureStore.open(cache_dir, model_fingerprint(model, torch.float32), {"backbone": str(backbone)})
        t0 = time.perf_counter()
        refs = data.all_refs(splits["train"] + splits["val"] + splits["test"])
        keys = build_feature_cache(store, model, refs, data.registry(), batch_size=128, progress=False)
        cache_seconds = time.perf_counter() - t0
        batcher = CachedBatcher(store, keys)
        n_images = len(set(keys.values()))
        print(f"feature cache: {n_images} images, {store.size_bytes() / len(store) / 1024:.1f} KiB per image, "
              f"built/checked in {cache_seconds:.1f} s")
        rows = {}
        for name, pooling in (("frozen own head", "head"), ("mean pooling", "mean")):
            t0 = time.perf_counter()
            rows[name] = (evaluate_model(model, test, pooling=pooling, batcher=batcher), time.perf_counter() - t0)
        for alpha in args.alphas:
            out = work / "runs" / f"{tag}-a{alpha}-{'-'.join(train_levels)}-{args.steps}"
            shutil.rmtree(out, ignore_errors=True)  # a fresh run (the feature cache is shared and kept)
            t0 = time.perf_counter()
            summary = train(TrainConfig(
                backbone=str(backbone), output_dir=str(out), train_data=str(data_dir / "positives"),
                distractors=[str(data_dir / "distractors" / lv) for lv in train_levels],
                train_indices=str(data_dir / "splits" / "train.json"), val_data=str(data_dir / "positives"),
                val_distractors=[str(data_dir / "distractors" / lv) for lv in args.levels],
                val_indices=str(data_dir / "splits" / "val.json"), seed=args.seed,
                train_batch_size=args.batch_size, max_train_steps=args.steps, learning_rate=args.learning_rate,
                lr_warmup_steps=min(100, args.steps // 10), temperature=args.temperature, alpha=alpha,
                feature_cache=str(cache_dir), checkpointing_steps=10**9, validation_steps=args.validation_steps,
                logging_steps=50, report_to="none",
            ))
            seconds = time.perf_counter() - t0
            trained = NearIDModel.from_pretrained(out / "best")
            res = evaluate_model(trained, test, batcher=batcher)
            rows[f"trained head, alpha={alpha:g}"] = (res, seconds)
            print(f"  trained alpha={alpha:g}: best val SSR {summary['best_val_ssr']:.1f} in {seconds:.0f} s")
        results[kind] = {"rows": {k: {"metrics": r, "seconds": s} for k, (r, s) in rows.items()},
                         "cache_seconds": cache_seconds}
        print(f"\n### backbone: {kind} ({args.hidden_size} wide, {args.num_hidden_layers} layers, "
              f"{args.image_size} px, {args.steps} head steps of {args.batch_size})\n")
        for level in args.levels + ["pooled"]:
            print(f"level **{level}** (held-out identities: {int(rows['frozen own head'][0][level]['n_samples'])})\n")
            print("| variant | SSR | PA | wall s |")
            print("|---|---|---|---|")
            for name, (res, seconds) in rows.items():
                print(f"| {name} | {res[level]['ssr']:.1f} | {res[level]['pa']:.1f} | {seconds:.1f} |")
            print()
    (work / "results.json").write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
