"""The main job (``make demo``): NearID from head training to a personalised LoRA, offline, on built-in tiny models.

Stages, each timed and cached under ``demo_out/``: a rerun reuses a finished stage when its inputs (the stage's
settings, the sha256 of the shipped world weights it reads, the stages it builds on) are those it was built from,
and rebuilds it otherwise:

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

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
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

from nearid_reward.cli.arguments import parse_arguments  # noqa: E402

# The personalisation stage runs in the ground-truth world (nearid_world): its shipped world model, NearID encoder
# and oracle; one held-out subject, settings as the benchmark's but shorter.
WORLD_SUBJECT = 0
WORLD_RUN: dict[str, Any] = {"steps": 240, "checkpointing_steps": 40, "per_context": 4, "inference_steps": 20,
                             "guidance_scale": 4.0, "reward_steps": 30, "no_prior_run": True,
                             "reward_kinds": ("nearid",)}


STAGE_LABELS = {
    "head": "NearID head on the synthetic benchmark",
    "projection": "embedding projection",
    "world": "DreamBooth-LoRA and identity reward in the ground-truth world",
    "select": "nearid-select",
}


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def stage_key(inputs: dict[str, Any]) -> str:
    """sha256 of a stage's inputs (settings, weights' hashes, upstream keys) as canonical JSON: the cache key."""
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _head_inputs() -> dict[str, Any]:
    import train_head_demo as thd

    return {"data": dataclasses.asdict(thd.DATA), "backbone": dataclasses.asdict(thd.BACKBONE),
            "head_steps": thd.HEAD_STEPS, "temperature": thd.TEMPERATURE}


def _world_inputs() -> dict[str, Any]:
    """What the world stage reads: its settings and the sha256 of every shipped world file (model, NearID, oracle)."""
    from nearid_world.evaluate import WorldAssets
    from nearid_world.training_state import output_sha256

    root = WorldAssets().root
    weights = output_sha256(root) if root.is_dir() else {}
    return {"subject": WORLD_SUBJECT, "run": WORLD_RUN, "weights": weights}


def _done(folder: Path, key: str) -> dict[str, Any] | None:
    """The finished stage's record if it was built from the same inputs (``key``); else ``None``.

    A stage built from other inputs (an updated world model, changed settings) or by a version that recorded no key
    is removed, with a line saying so, and built again."""
    marker = folder / "stage_done.json"
    if not marker.is_file():
        return None
    info = json.loads(marker.read_text())
    if info.get("key") == key:
        return info
    print(f"{folder}: built from other inputs than today's (settings or shipped weights changed); rebuilding it",
          flush=True)
    shutil.rmtree(folder)
    return None


def _mark_done(folder: Path, info: dict[str, Any], started: float, key: str) -> dict[str, Any]:
    """Record a finished stage (with its inputs' key and how long it took) so that a rerun reuses it."""
    from nearid_reward.files import write_json_atomic

    info = {**info, "key": key, "seconds": time.perf_counter() - started}
    write_json_atomic(folder / "stage_done.json", info)
    return info


# --------------------------------------------------------------------------------------------- stage 1
def stage_head(out: Path) -> dict[str, Any]:
    """Synthetic NearID data, a pretrained tiny backbone, the trained head, and SSR/PA before and after."""
    import train_head_demo as thd

    folder = out / "train_head"
    key = stage_key(_head_inputs())
    if (info := _done(folder, key)) is not None:
        return info
    started = time.perf_counter()
    thd.OUT = folder
    thd.main()
    backbone = thd.pretrain_synthetic_backbone(folder / "backbone", thd.BACKBONE)  # cached: returns the folder
    metrics = {name: json.loads((folder / "eval" / name / "metrics.json").read_text())["settings"]
               for name in ("frozen", "trained")}
    info = {"data": str(folder / "data"), "backbone": str(backbone), "head": str(folder / "run" / "best"),
            "levels": list(thd.LEVELS), "metrics": metrics}
    return _mark_done(folder, info, started, key)


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
    key = stage_key({"head": head["key"]})
    if (info := _done(folder, key)) is not None:
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
    return _mark_done(folder, {"embeddings": str(folder / "embeddings.npz"), "cosines": gaps}, started, key)


# --------------------------------------------------------------------------------------------- stage 3
def stage_world(out: Path) -> dict[str, Any]:
    """DreamBooth-LoRA on a held-out subject of the ground-truth world, every checkpoint measured, then DRaFT-K."""
    from nearid_world.evaluate import WorldAssets, load_world_pipeline
    from nearid_world.oracle import AttributeOracle
    from nearid_world.personalise import PersonaliseConfig, class_images, personalise_subject

    folder = out / "world"
    key = stage_key(_world_inputs())
    if (info := _done(folder, key)) is not None:
        return info
    started = time.perf_counter()
    if folder.exists():
        shutil.rmtree(folder)  # an interrupted run: start this stage again
    assets = WorldAssets()
    assets.check()
    config = PersonaliseConfig(out=str(folder), **WORLD_RUN)
    pipe = load_world_pipeline(assets)
    oracle = AttributeOracle.from_pretrained(assets.oracle)
    render = config.render_config()
    classes = class_images(pipe, folder / "class_images", render)
    result = personalise_subject(config, assets, pipe, oracle, WORLD_SUBJECT, classes, render)
    result["assets"] = {"world_model": str(assets.world_model), "nearid": str(assets.nearid)}
    return _mark_done(folder, result, started, key)


# --------------------------------------------------------------------------------------------- stage 4
def stage_select(out: Path, world: dict[str, Any]) -> dict[str, Any]:
    """``nearid-select`` over the DreamBooth checkpoints (one pipeline, LoRA swapped per checkpoint)."""
    from nearid_reward.cli import select
    from nearid_world.evaluate import PROMPTS

    folder = out / "selection"
    key = stage_key({"world": world["key"]})
    if (info := _done(folder, key)) is not None:
        return info
    started = time.perf_counter()
    run = Path(world["folder"]) / "dreambooth"
    _reset_accelerate()
    select.main(["--output_dir", str(run), "--pipeline", world["assets"]["world_model"],
                 "--model", world["assets"]["nearid"], "--references", str(Path(world["folder"]) / "instance"),
                 "--prompts", str(PROMPTS), "--instance_token", "sks", "--class_noun", "object",
                 "--num_inference_steps", str(WORLD_RUN["inference_steps"]),
                 "--guidance_scale", str(WORLD_RUN["guidance_scale"]),
                 "--images_per_prompt", str(WORLD_RUN["per_context"]), "--scheduler", "DDIMScheduler",
                 "--copy_winner", "--winner_dir", str(folder / "winner")])
    result = json.loads((run / "identity_selection.json").read_text())
    return _mark_done(folder, {"selection": result, "winner_dir": str(folder / "winner")}, started, key)


# --------------------------------------------------------------------------------------------- stage 6
def stage_report(out: Path, results: dict[str, Any], timings: dict[str, float]) -> tuple[Path, Path]:
    from demo_plots import plot_metrics, plot_projection, plot_samples, plot_truth
    from demo_report import Report

    from nearid_world.personalise import PersonaliseConfig, reward_dir_name

    head, proj, world, sel = (results[k] for k in ("head", "projection", "world", "select"))
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    report = Report("nearid-reward demo: identity from head training to a personalised LoRA")
    report.paragraph("Everything here ran offline on built-in tiny models: a tiny SigLIP backbone pretrained on a "
                     "synthetic world, and a tiny text-to-image model of that world with an oracle that knows the "
                     "truth. The numbers show that the plugin's choices follow the truth, not the quality of the "
                     "real NearID release.")
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
    report.heading("3. Personalisation with ground truth: does NearID pick the checkpoint that draws the subject?")
    subj = world["subject"]
    ident = subj["identity"]
    report.paragraph(
        "A tiny text-to-image model of the synthetic world (shipped in `nearid_world/weights`, trained by "
        "`nearid-make-world`) is personalised with DreamBooth-LoRA on three views of a subject it never saw "
        f"(**{ident['primary']} and {ident['secondary']} {ident['pattern']} {ident['shape']} with {ident['part']}**, "
        f"in the {', '.join(subj['contexts'])} contexts) through `nearid-dreambooth` hosting "
        "`examples/dreambooth_lora_minimal.py`. An oracle that reads every attribute from an image (independent of "
        "NearID) gives the *true identity* of each sample: the fraction of the subject's five attributes it shows. "
        f"The look-alike differs in the {subj['changed']}.")
    sel_rows = sel["selection"].get("checkpoints", [])
    winner = next((r for r in sel_rows if r["name"] == sel["selection"].get("winner")), None)
    selected_step = winner["step"] if winner else world["picked_step"]["nearid"]
    rows = world["checkpoints"]
    best = max(rows, key=lambda r: r["truth"])
    report.image(plot_truth(world, selected_step, figures / "truth_vs_step.png"),
                 "True identity (left axis) and the three scores (right axis) against DreamBooth step")
    report.table(["step", "NearID", "frozen head", "mean pool", "true identity", "prompt fidelity", "copy rate",
                  "look-alike rate"],
                 [["base", world["base"]["nearid"], world["base"]["frozen"], world["base"]["meanpool"],
                   world["base"]["truth"], world["base"]["prompt_fidelity"], world["base"]["copy_rate"],
                   world["base"]["lookalike_rate"]]]
                 + [[r["step"], r["nearid"], r["frozen"], r["meanpool"], r["truth"], r["prompt_fidelity"],
                     r["copy_rate"], r["lookalike_rate"]] for r in rows])
    picks = world["picked_step"]
    report.table(["method", "picked step", "true identity", "regret (oracle-best minus pick)"],
                 [[f"{name}", picks[key], next(r["truth"] for r in rows if r["step"] == picks[key]),
                   world["regret"][key]]
                  for key, name in (("nearid", "NearID (nearid-select)"), ("frozen", "frozen head"),
                                    ("meanpool", "mean pool (CLIP-I/DINO-style)"), ("last", "last checkpoint"))])
    report.paragraph(
        f"Oracle-best checkpoint: step {best['step']} (true identity {best['truth']:.2f}; base model "
        f"{world['base']['truth']:.2f}). `nearid-select` re-rendered every checkpoint with the same prompts and seeds "
        f"and picked **{sel['selection'].get('winner')}** (weights in `{sel['winner_dir']}`). Spearman rank "
        f"correlation of each score with the truth over checkpoints: NearID {world['spearman']['nearid']:.2f}, "
        f"frozen head {world['spearman']['frozen']:.2f}, mean pool {world['spearman']['meanpool']:.2f}.")
    renders = Path(world["folder"]) / "renders"
    panels = [("subject (training views)", renders / "subject.png"), ("look-alike", renders / "lookalike.png"),
              ("base model", renders / "base.png"), (f"NearID pick (step {selected_step})",
                                                      renders / f"checkpoint-{selected_step}.png")]
    tuned = renders / f"{reward_dir_name(PersonaliseConfig(**WORLD_RUN), prior=True)}.png"
    if tuned.is_file():
        panels.append(("after identity reward", tuned))
    report.image(plot_samples(panels, figures / "samples.png"),
                 "Rows: beach, grass, snow, night prompts ('a sks object on the ...'); same seeds in every panel")
    report.heading("4. Identity-reward fine-tuning (DRaFT-K) from the selected checkpoint")
    rf = world.get("reward_finetune")
    if rf:
        before, after = rf["before"], rf["after_prior"]
        report.table(["", "NearID", "true identity", "prompt fidelity", "copy rate", "look-alike rate"],
                     [[label, m["nearid"], m["truth"], m["prompt_fidelity"], m["copy_rate"], m["lookalike_rate"]]
                      for label, m in ((f"DreamBooth checkpoint {rf['init_step']}", before),
                                       ("after DRaFT-K (look-alike penalty, KL prior)", after))])
        report.paragraph("`examples/train_lora_identity_reward.py --init_lora` continued the selected LoRA with the "
                         "NearID reward (look-alike views as `--negative_dir`) and the KL prior on class images; "
                         "the study (`benchmarks/bench_personalisation.py`) repeats this over 24 subjects with three "
                         "rewards (NearID, frozen head, mean pool), with and without the prior.")
    report.heading("Run time")
    first = {label: results[key]["seconds"] for key, label in STAGE_LABELS.items()}
    report.table(["stage", "built in (s)", "this run (s)"],
                 [[label, f"{first[label]:.1f}", f"{timings[label]:.1f}"] for label in first]
                 + [["total", f"{sum(first.values()):.1f}", f"{sum(timings.values()):.1f}"]])
    report.paragraph("\"built in\" is the time each stage took when it was computed; a rerun reuses finished stages "
                     "(\"this run\"). Measured on this machine with 2 CPU cores and no GPU.")
    return report.write(out)


# --------------------------------------------------------------------------------------------- driver
@dataclass
class DemoArguments:
    """The demo's options."""

    out: str = field(default="demo_out", metadata={"help": "output folder"})
    fresh: bool = field(default=False, metadata={"help": "delete the output folder first"})


def main(argv: list[str] | None = None) -> int:
    (args,) = parse_arguments(DemoArguments, argv, prog="demo.py",
                              description="nearid-reward demo (offline, tiny models)")
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
        "world": lambda: stage_world(out),
        "select": lambda: stage_select(out, results["world"]),
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
