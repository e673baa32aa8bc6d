"""The main job (``make demo``): NearID from head training to a personalised LoRA, offline, on built-in tiny models.

Stages, each timed and cached under ``demo_out/`` (a rerun reuses what is already built):

1. train a NearID head on the synthetic NearID benchmark and compare it with the frozen backbone (SSR/PA on
   held-out identities);
2. embed held-out identities and their near-identity distractors before and after training (2-D projection);
3. DreamBooth-LoRA personalisation of a tiny Stable Diffusion on one held-out identity, through ``nearid-dreambooth``
   hosting an unmodified DreamBooth script, with NearID validation at every checkpoint;
4. a few steps of identity-reward LoRA fine-tuning (DRaFT-K);
5. ``nearid-select``: rank the DreamBooth checkpoints by identity and keep the winner;
6. ``demo_out/report.md`` and ``demo_out/report.html`` with tables and plots.

Run ``python examples/demo.py [--out demo_out] [--fresh]``. Any failure stops the run with a clear message and a
non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
for path in (HERE, HERE.parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import numpy as np  # noqa: E402
import torch  # noqa: E402

TOKEN, CLASS_NOUN = "sks", "toy"
PROMPTS = {"instance": ["a photo of {token} {class}", "a photo of {token} {class} on the beach"],
           "class": ["a photo of a {class}"]}


STAGE_LABELS = {
    "head": "NearID head on the synthetic benchmark",
    "projection": "embedding projection",
    "dreambooth": "DreamBooth-LoRA via nearid-dreambooth",
    "reward": "identity-reward fine-tuning",
    "select": "nearid-select",
}


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def _done(folder: Path) -> dict[str, Any] | None:
    marker = folder / "stage_done.json"
    return json.loads(marker.read_text()) if marker.is_file() else None


def _mark_done(folder: Path, info: dict[str, Any], started: float) -> dict[str, Any]:
    """Record a finished stage (with how long it took) so that a rerun reuses it."""
    from nearid_reward.io import write_json_atomic

    info = {**info, "seconds": time.perf_counter() - started}
    write_json_atomic(folder / "stage_done.json", info)
    return info


# --------------------------------------------------------------------------------------------- stage 1
def stage_head(out: Path) -> dict[str, Any]:
    """Synthetic NearID data, a pretrained tiny backbone, the trained head, and SSR/PA before and after."""
    import train_head_demo as thd

    folder = out / "train_head"
    if (info := _done(folder)) is not None:
        return info
    started = time.perf_counter()
    thd.OUT = folder
    thd.main()
    backbone = thd.pretrain_synthetic_backbone(folder / "backbone", thd.BACKBONE)  # cached: returns the folder
    metrics = {name: json.loads((folder / "eval" / name / "metrics.json").read_text())["settings"]
               for name in ("frozen", "trained")}
    info = {"data": str(folder / "data"), "backbone": str(backbone), "head": str(folder / "run" / "best"),
            "levels": list(thd.LEVELS), "metrics": metrics}
    return _mark_done(folder, info, started)


# --------------------------------------------------------------------------------------------- stage 2
def _load_test_identities(head: dict[str, Any], count: int) -> tuple[list[list[Any]], list[list[Any]]]:
    """Views and (first level's) distractors of the first ``count`` held-out identities, as PIL images."""
    from train_head.data import decode_image, load_nearid, read_index_file

    data_dir = Path(head["data"])
    level = head["levels"][0]
    data = load_nearid(data_dir / "positives", [data_dir / "distractors" / level])
    rows = read_index_file(data_dir / "splits" / "test.json")[:count]
    setting = data.settings[0]
    views, fakes = [], []
    for r in rows:
        vs = [decode_image(data.positives.read(r, c)) for j, c in enumerate(data.view_columns) if data.view_ok[r, j]]
        table, cols = data.distractors[setting], data.distractor_columns[setting]
        ds = [decode_image(table.read(r, c)) for j, c in enumerate(cols) if data.distractor_ok[setting][r, j]]
        views.append(vs)
        fakes.append(ds)
    return views, fakes


def stage_projection(out: Path, head: dict[str, Any]) -> dict[str, Any]:
    """Embeddings of held-out identities (views and distractors) under the frozen and the trained head."""
    from tqdm.auto import tqdm

    from nearid_reward import NearIDModel

    folder = out / "projection"
    if (info := _done(folder)) is not None:
        return info
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    views, fakes = _load_test_identities(head, 8)
    arrays: dict[str, np.ndarray] = {}
    for name, path in tqdm([("frozen", head["backbone"]), ("trained", head["head"])], desc="embedding"):
        model = NearIDModel.from_pretrained(path)
        with torch.no_grad():
            arrays[f"{name}_views"] = np.stack([model.embed(v).numpy() for v in views])  # [N, V, E]
            arrays[f"{name}_fakes"] = np.stack([model.embed(f).numpy() for f in fakes])  # [N, V, E]
    np.savez(folder / "embeddings.npz", **arrays)
    gaps = {}
    for name in ("frozen", "trained"):
        v, f = arrays[f"{name}_views"], arrays[f"{name}_fakes"]
        same = np.mean([v[i, a] @ v[i, b] for i in range(len(v)) for a in range(v.shape[1])
                        for b in range(v.shape[1]) if a != b])
        fake = np.mean([v[i, a] @ f[i, a] for i in range(len(v)) for a in range(v.shape[1])])
        gaps[name] = {"same_identity": float(same), "own_distractor": float(fake)}
    return _mark_done(folder, {"embeddings": str(folder / "embeddings.npz"), "cosines": gaps}, started)


# --------------------------------------------------------------------------------------------- stage 3
def stage_dreambooth(out: Path, head: dict[str, Any]) -> dict[str, Any]:
    """A tiny DreamBooth-LoRA run hosted by ``nearid-dreambooth`` on a held-out synthetic identity."""
    from integrations import dreambooth
    from nearid_reward.images import to_rgb
    from nearid_reward.testing_diffusers import save_tiny_sd_pipeline

    folder = out / "dreambooth"
    if (info := _done(folder)) is not None:
        return info
    started = time.perf_counter()
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted run: start this stage again
    views, fakes = _load_test_identities(head, 6)
    subject, lookalikes, classes = folder / "subject", folder / "lookalikes", folder / "class_images"
    for d in (subject, lookalikes, classes):
        d.mkdir(parents=True)
    for j, img in enumerate(views[0]):
        to_rgb(img).save(subject / f"view_{j}.png")
    for j, img in enumerate(fakes[0]):
        to_rgb(img).save(lookalikes / f"lookalike_{j}.png")
    for i, vs in enumerate(views[1:5]):  # other identities of the same world stand in for class images
        to_rgb(vs[0]).save(classes / f"other_{i}.png")
    sd = save_tiny_sd_pipeline(out / "models" / "tiny-sd", seed=0, scheduler="ddpm")
    prompts = folder / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    run = folder / "run"
    argv = [
        "--script", str(HERE / "dreambooth_lora_minimal.py"), "--nearid_model", head["head"],
        "--nearid_reference_dir", str(subject), "--nearid_negative_dir", str(lookalikes),
        "--nearid_prompts", str(prompts), "--nearid_num_inference_steps", "4", "--nearid_images_per_prompt", "2",
        "--", "--pretrained_model_name_or_path", str(sd), "--instance_data_dir", str(subject),
        "--instance_prompt", f"a photo of {TOKEN} {CLASS_NOUN}", "--class_data_dir", str(classes),
        "--class_prompt", f"a photo of {CLASS_NOUN}", "--with_prior_preservation",
        "--validation_prompt", f"a photo of {TOKEN} {CLASS_NOUN}", "--num_validation_images", "2",
        "--output_dir", str(run), "--max_train_steps", "24", "--train_batch_size", "1", "--learning_rate", "5e-3",
        "--checkpointing_steps", "6", "--seed", "0", "--report_to", "tensorboard", "--resolution", "64",
    ]  # fmt: skip
    _reset_accelerate()
    dreambooth.main(argv)
    records = [json.loads(line) for line in (run / dreambooth.HISTORY_NAME).read_text().splitlines()]
    return _mark_done(folder, {"sd": str(sd), "run": str(run), "subject": str(subject),
                               "lookalikes": str(lookalikes), "prompts": str(prompts), "history": records}, started)


# --------------------------------------------------------------------------------------------- stage 4
def stage_reward(out: Path, head: dict[str, Any], db: dict[str, Any]) -> dict[str, Any]:
    """Identity-reward LoRA fine-tuning (DRaFT-K, K = all of 4 sampler steps) on the same subject."""
    import train_lora_identity_reward as trainer

    folder = out / "reward_finetune"
    if (info := _done(folder)) is not None:
        return info
    started = time.perf_counter()
    if folder.exists():
        shutil.rmtree(folder)
    targets = ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
               "conv2"]
    argv = ["--pretrained_model_name_or_path", db["sd"], "--nearid_model", head["head"],
            "--reference_dir", db["subject"], "--negative_dir", db["lookalikes"], "--negative_weight", "0.5",
            "--instance_token", TOKEN, "--class_noun", CLASS_NOUN, "--prompts", db["prompts"], "--mode", "draft",
            "--num_inference_steps", "4", "--backprop_num_steps", "4", "--max_train_steps", "30",
            "--train_batch_size", "2", "--learning_rate", "1e-2", "--rank", "8", "--lora_target_modules", *targets,
            "--checkpointing_steps", "15", "--validation_steps", "15", "--validation_inference_steps", "4",
            "--output_dir", str(folder)]  # fmt: skip
    _reset_accelerate()
    result = trainer.main(argv)
    return _mark_done(folder, {"history": result["history"], "best_step": result.get("best_step")}, started)


# --------------------------------------------------------------------------------------------- stage 5
def stage_select(out: Path, head: dict[str, Any], db: dict[str, Any]) -> dict[str, Any]:
    """``nearid-select`` over the DreamBooth checkpoints (one pipeline, LoRA swapped per checkpoint)."""
    from nearid_reward.cli import select

    folder = out / "selection"
    if (info := _done(folder)) is not None:
        return info
    started = time.perf_counter()
    _reset_accelerate()
    select.main(["--output_dir", db["run"], "--pipeline", db["sd"], "--model", head["head"],
                 "--references", db["subject"], "--prompts", db["prompts"], "--instance_token", TOKEN,
                 "--class_noun", CLASS_NOUN, "--num_inference_steps", "4", "--images_per_prompt", "2",
                 "--scheduler", "auto",
                 "--copy_winner", "--winner_dir", str(folder / "winner")])
    result = json.loads((Path(db["run"]) / "identity_selection.json").read_text())
    return _mark_done(folder, {"selection": result, "winner_dir": str(folder / "winner")}, started)


# --------------------------------------------------------------------------------------------- stage 6
def stage_report(out: Path, results: dict[str, Any], timings: dict[str, float]) -> tuple[Path, Path]:
    from demo_plots import plot_metrics, plot_projection, plot_reward, plot_selection
    from demo_report import Report

    head, proj, db, rw, sel = (results[k] for k in ("head", "projection", "dreambooth", "reward", "select"))
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    report = Report("nearid-reward demo: identity from head training to a personalised LoRA")
    report.paragraph("Everything here ran offline on built-in tiny models (a tiny SigLIP backbone pretrained on a "
                     "synthetic world, a tiny Stable Diffusion with random weights), so the numbers show the "
                     "machinery, not the quality of the real NearID release.")
    report.heading("1. NearID head: frozen backbone vs trained head on held-out identities")
    levels = [*head["levels"], "pooled"]
    rows = []
    for name, label in (("frozen", "frozen backbone (its own head)"), ("trained", "trained NearID head")):
        m = head["metrics"][name]
        rows.append([label] + [f"{m[lv]['ssr']:.1f} / {m[lv]['pa']:.1f}" for lv in levels])
    report.table(["model"] + [f"{lv} SSR / PA (%)" for lv in levels], rows)
    n = int(head["metrics"]["trained"][head["levels"][0]]["n_samples"])
    report.paragraph(f"SSR: share of held-out identities for which every cross-view similarity beats the similarity "
                     f"to the view's own near-identity distractor (same background). PA: pairwise accuracy (paper "
                     f"convention). {n} held-out identities per level.")
    report.image(plot_metrics(head, figures / "ssr_pa.png"), "SSR and PA before and after training the head")
    report.heading("2. Embeddings before and after")
    c = proj["cosines"]
    report.table(["model", "mean cos(view, other view)", "mean cos(view, its distractor)", "margin"],
                 [[k, c[k]["same_identity"], c[k]["own_distractor"],
                   c[k]["same_identity"] - c[k]["own_distractor"]] for k in ("frozen", "trained")])
    report.image(plot_projection(Path(proj["embeddings"]), figures / "projection.png"),
                 "PCA of held-out identities: views (dots) and their near-identity distractors (crosses), by colour")
    report.heading("3. DreamBooth-LoRA with NearID validation (nearid-dreambooth)")
    history = db["history"]
    best = max(history, key=lambda r: r["nearid/identity_mean"])
    winner = sel["selection"].get("winner")
    report.table(["step", "source", "identity", "base model", "gain", "class leakage", "look-alike max"],
                 [[r["step"], r.get("source", ""), r["nearid/identity_mean"], r.get("nearid/base_identity_mean", ""),
                   r.get("nearid/identity_gain", ""), r.get("nearid/class_leakage_mean", ""),
                   r.get("nearid/negative_max_mean", "")] for r in history])
    report.image(plot_selection(history, sel["selection"], figures / "identity_vs_step.png"),
                 "NearID identity against training step, base-model line, and the selected checkpoint")
    report.paragraph(f"Best validation: step {best['step']} (identity {best['nearid/identity_mean']:.4f}). "
                     + (f"nearid-select rendered every checkpoint again with the same prompts and seeds and picked "
                        f"**{winner}** (its weights are in `{sel['winner_dir']}`)." if winner else ""))
    ranked = sel["selection"]["checkpoints"]
    report.table(["rank", "checkpoint", "step", "identity", "gain over base"],
                 [[r.get("rank"), r["name"], r.get("step"), r.get("identity_mean"),
                   r.get("identity_gain", "")] for r in ranked])
    report.heading("4. Identity-reward LoRA fine-tuning (DRaFT-K)")
    rewards = [h["reward"] for h in rw["history"]]
    report.image(plot_reward(rewards, figures / "reward.png"), "Mean identity reward per optimisation step")
    blocks = [[f"{i + 1}-{min(i + 10, len(rewards))}", float(np.mean(rewards[i : i + 10]))]
              for i in range(0, len(rewards), 10)]
    report.table(["steps", "mean reward"], blocks)
    report.heading("Run time")
    first = {label: results[key]["seconds"] for key, label in STAGE_LABELS.items()}
    report.table(["stage", "built in (s)", "this run (s)"],
                 [[label, f"{first[label]:.1f}", f"{timings[label]:.1f}"] for label in first]
                 + [["total", f"{sum(first.values()):.1f}", f"{sum(timings.values()):.1f}"]])
    report.paragraph("\"built in\" is the time each stage took when it was computed; a rerun reuses finished stages "
                     "(\"this run\"). Measured on this machine with 2 CPU cores and no GPU.")
    return report.write(out)


# --------------------------------------------------------------------------------------------- driver
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="nearid-reward demo (offline, tiny models)")
    parser.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    parser.add_argument("--fresh", action="store_true", help="delete the output folder first")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1 if (os.cpu_count() or 1) <= 2 else 2)  # tiny models: more threads only add overhead
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    steps: dict[str, Callable[[], Any]] = {
        "head": lambda: stage_head(out),
        "projection": lambda: stage_projection(out, results["head"]),
        "dreambooth": lambda: stage_dreambooth(out, results["head"]),
        "reward": lambda: stage_reward(out, results["head"], results["dreambooth"]),
        "select": lambda: stage_select(out, results["head"], results["dreambooth"]),
    }
    started = time.perf_counter()
    for key, fn in steps.items():
        label = STAGE_LABELS[key]
        print(f"\n=== {label} ===", flush=True)
        t = time.perf_counter()
        try:
            results[key] = fn()
        except Exception as exc:
            traceback.print_exc()
            print(f"\ndemo failed in stage '{label}': {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        timings[label] = time.perf_counter() - t
        print(f"--- {label}: {timings[label]:.1f} s", flush=True)
    t = time.perf_counter()
    try:
        md, page = stage_report(out, results, timings)
    except Exception as exc:
        traceback.print_exc()
        print(f"\ndemo failed in stage 'report': {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    timings["report"] = time.perf_counter() - t
    print(f"\nreport: {md} and {page} (total {time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
