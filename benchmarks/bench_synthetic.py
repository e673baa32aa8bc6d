"""Miniature NearID reproduction on the synthetic world: an ablation table per distractor difficulty level.

On held-out identities (the test split), for each backbone (the synthetic-pretrained tiny SigLIP and, with
``--backbones pretrained random``, the same architecture with random weights):

* frozen own head (the backbone's own MAP head: step 0 of NearID training),
* mean pooling of the frozen backbone tokens,
* a trained NearID head with alpha = 0 (Tier 1 only) and with alpha = 0.5 (the paper's objective),

with SSR and PA (percent) per level, the mean cosine similarity of a view to the other views of its identity, to the
same-background and other-background distractors and to other identities
(:func:`train_head.metrics.similarity_profile`), and the wall time of each variant (training time of the trained heads,
evaluation time of the frozen ones; data generation, backbone pretraining and the one-off feature-cache build are
reported separately). By default one head is trained per level (on that level's distractors, best checkpoint by
validation SSR) and the pooled row micro-averages the levels; ``--joint`` trains one head on all levels at once
(each view's distractor drawn from a random level, as NearID draws from several generators).

Reproduce::

    python benchmarks/bench_synthetic.py          # 10000 identities, 64 px, 1 thread, 1000 head steps of 128
    python benchmarks/bench_synthetic.py --backbones pretrained random --joint

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
from train_head.batching import CachedBatcher, embed_references, gather_eval_arrays, mean_pool  # noqa: E402
from train_head.cache import FeatureStore, build_feature_cache, model_fingerprint  # noqa: E402
from train_head.data import load_nearid, read_index_file  # noqa: E402
from train_head.eval import ValidationSet, evaluate_embeddings, head_pool  # noqa: E402
from train_head.metrics import pool_metrics, similarity_profile  # noqa: E402
from train_head.synthetic import LEVELS, SyntheticConfig, generate_synthetic  # noqa: E402
from train_head.synthetic_backbone import BackbonePretrainConfig, pretrain_synthetic_backbone  # noqa: E402
from train_head.train import TrainConfig, train  # noqa: E402

PROFILE = ("positive", "same_context_distractor", "other_context_distractor", "other_identity")


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


def score(model: NearIDModel, test: ValidationSet, batcher: CachedBatcher, pooling: str = "head") -> dict[str, dict]:
    """SSR / PA per level (+ pooled) and, per level, the mean cosine similarities of :func:`similarity_profile`."""
    pool = head_pool(model) if pooling == "head" else mean_pool
    emb, _ = embed_references(test.refs(), batcher, pool, model=model, device=model.device, batch_size=256)
    dim = next(iter(emb.values())).shape[-1]
    results = evaluate_embeddings(test, emb, dim)
    pos, pos_ok = gather_eval_arrays(emb, test.views, dim)
    for level, refs in test.distractors.items():
        neg, neg_ok = gather_eval_arrays(emb, refs, dim)
        results[level]["profile"] = similarity_profile(pos, neg, pos_ok, neg_ok)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="bench_out/synthetic")
    p.add_argument("--identities", type=int, default=10000)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbones", nargs="+", default=["pretrained"], choices=["pretrained", "random"])
    p.add_argument("--levels", nargs="+", default=list(LEVELS), choices=LEVELS)
    p.add_argument("--train_levels", nargs="+", default=None, choices=LEVELS,
                   help="levels whose distractors train heads (default: all evaluated levels)")
    p.add_argument("--joint", action="store_true",
                   help="train one head on all levels at once (default: one head per level, evaluated on it)")
    p.add_argument("--alphas", nargs="+", type=float, default=[0.0, 0.5])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--learning_rate", type=float, default=3e-3)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--validation_steps", type=int, default=100)
    p.add_argument("--pretrain_steps", type=int, default=4000)
    p.add_argument("--pretrain_images", type=int, default=16000)
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--num_hidden_layers", type=int, default=1)
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
        table: dict[str, dict[str, tuple[dict, float]]] = {lv: {} for lv in args.levels + ["pooled"]}
        for name, pooling in (("frozen own head", "head"), ("mean pooling", "mean")):
            t0 = time.perf_counter()
            res = score(model, test, batcher, pooling)
            seconds = time.perf_counter() - t0
            for lv in table:
                table[lv][name] = (res[lv], seconds)
        groups = [list(train_levels)] if args.joint else [[lv] for lv in train_levels]
        for alpha in args.alphas:
            name = f"trained head, alpha={alpha:g}"
            per_level: list[dict] = []
            for group in groups:
                out = work / "runs" / f"{tag}-a{alpha}-{'-'.join(group)}-{args.steps}"
                shutil.rmtree(out, ignore_errors=True)  # a fresh run (the feature cache is shared and kept)
                t0 = time.perf_counter()
                summary = train(TrainConfig(
                    backbone=str(backbone), output_dir=str(out), train_data=str(data_dir / "positives"),
                    distractors=[str(data_dir / "distractors" / lv) for lv in group],
                    train_indices=str(data_dir / "splits" / "train.json"), val_data=str(data_dir / "positives"),
                    val_distractors=[str(data_dir / "distractors" / lv) for lv in group],
                    val_indices=str(data_dir / "splits" / "val.json"), seed=args.seed,
                    train_batch_size=args.batch_size, max_train_steps=args.steps, learning_rate=args.learning_rate,
                    lr_warmup_steps=min(100, args.steps // 10), temperature=args.temperature, alpha=alpha,
                    feature_cache=str(cache_dir), checkpointing_steps=10**9, validation_steps=args.validation_steps,
                    logging_steps=50, report_to="none",
                ))
                seconds = time.perf_counter() - t0
                res = score(NearIDModel.from_pretrained(out / "best"), test, batcher)
                print(f"  trained alpha={alpha:g} on {group}: best val SSR {summary['best_val_ssr']:.1f} "
                      f"in {seconds:.0f} s")
                for lv in (group if not args.joint else args.levels):
                    table[lv][name] = (res[lv], seconds)
                    per_level.append(res[lv])
            total = sum(table[lv][name][1] for lv in args.levels) if not args.joint else seconds
            table["pooled"][name] = (pool_metrics(per_level), total)
        results[kind] = {lv: {k: {"metrics": r, "seconds": t} for k, (r, t) in rows.items()}
                         for lv, rows in table.items()}
        results[kind]["cache_seconds"] = cache_seconds
        mode = "one head on all levels" if args.joint else "one head per level"
        print(f"\n### backbone: {kind} ({args.hidden_size} wide, {args.num_hidden_layers} layers, "
              f"{args.image_size} px); {mode}, {args.steps} head steps of {args.batch_size}\n")
        for level, rows in table.items():
            n = int(rows["frozen own head"][0]["n_samples"])
            print(f"level **{level}** (held-out identities{' x levels' if level == 'pooled' else ''}: {n})\n")
            print("| variant | SSR | PA | cos positive | cos same-bg distractor | cos other-bg distractor | "
                  "cos other identity | wall s |")
            print("|---|---|---|---|---|---|---|---|")
            for name, (res, seconds) in rows.items():
                prof = res.get("profile")
                cos = (" | ".join(f"{prof[k]:.3f}" for k in PROFILE) if prof else " | ".join("" for _ in PROFILE))
                print(f"| {name} | {res['ssr']:.1f} | {res['pa']:.1f} | {cos} | {seconds:.1f} |")
            print()
    (work / "results.json").write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
