"""Does NearID pick and produce the truly better identity? DreamBooth and reward fine-tuning against ground truth.

In the generation world (:mod:`nearid_world`) every object's attributes are known and an oracle reads them from any
generated image, so "is it still my subject?" has a true answer. For each of N held-out subjects (identities the
world model and the world's NearID head never saw):

1. DreamBooth-LoRA on the subject's three views ("a sks object") with ``nearid-dreambooth`` hosting
   ``examples/dreambooth_lora_minimal.py`` (the launcher scores every checkpoint with NearID as in a user's run),
   long enough to overfit, with a checkpoint every few steps;
2. for the base model and every checkpoint, the fixed prompt/seed set ("a sks object on the <context>" for each of
   the four contexts) is rendered and measured (:mod:`nearid_world.evaluate`): NearID, frozen-head and mean-pool
   scores, the oracle's true identity, prompt fidelity, copy rate and look-alike rate;
3. selection: the checkpoint each score ranks first against the oracle-best one (regret = true identity lost);
4. reward fine-tuning: ``examples/train_lora_identity_reward.py`` (DRaFT-K) from the NearID-selected checkpoint,
   with the look-alike as ``--negative_dir`` and the KL prior on class images, and once without the prior.

Commands::

    python benchmarks/bench_personalisation.py --json bench_out/personalisation.json    # full run (8 subjects)
    python benchmarks/bench_personalisation.py --quick                                  # 1 subject, short

The JSON holds per-subject tables and the averaged keys ``subjects``, ``spearman_{nearid,frozen,meanpool}_vs_truth``,
``selection_regret_{nearid,frozen,meanpool,last}``, ``base_truth``, ``best_truth``, ``reward_finetune_*`` and
``seconds``. Settings were fixed before the held-out subjects were run; nothing here is tuned per subject.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nearid_world.evaluate import WorldAssets, load_world_pipeline  # noqa: E402
from nearid_world.oracle import AttributeOracle  # noqa: E402
from nearid_world.personalise import (  # noqa: E402
    PersonaliseConfig,
    class_images,
    nanmean,
    personalise_subject,
    spearman,
)

__all__ = ["main", "spearman"]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, PersonaliseConfig]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=str(WorldAssets().root), help="the world's shipped models")
    p.add_argument("--out", default="bench_out/personalisation", help="work folder (runs, renders)")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--quick", action="store_true", help="1 subject, short runs (the CI-sized path)")
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--first_subject", type=int, default=0, help="index of the first held-out subject")
    p.add_argument("--steps", type=int, default=400, help="DreamBooth steps")
    p.add_argument("--checkpointing_steps", type=int, default=40)
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--per_context", type=int, default=4, help="evaluation seeds per context prompt")
    p.add_argument("--inference_steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=4.0)
    p.add_argument("--reward_steps", type=int, default=40, help="DRaFT-K steps (0: skip reward fine-tuning)")
    p.add_argument("--reward_learning_rate", type=float, default=1e-3)
    p.add_argument("--reward_backprop_steps", type=int, default=2)
    p.add_argument("--reward_negative_weight", type=float, default=0.5, help="lambda of the look-alike penalty")
    p.add_argument("--no_prior_run", action="store_true", help="skip the reward run without the prior term")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="only combine the per-subject results of earlier runs (e.g. subjects split over processes)")
    if "--quick" in (sys.argv[1:] if argv is None else argv):  # smaller defaults; explicit flags still win
        p.set_defaults(subjects=1, steps=60, checkpointing_steps=20, per_context=2, reward_steps=4,
                       inference_steps=10, no_prior_run=True)
    args = p.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(PersonaliseConfig)}
    return args, PersonaliseConfig(**{k: v for k, v in vars(args).items() if k in fields})


def summarise(subjects: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    def mean(key: str, *path: str) -> float:
        values = []
        for s in subjects:
            value: Any = s
            for p in (key, *path):
                value = value[p]
            values.append(float(value))
        return nanmean(values)

    out: dict[str, Any] = {"subjects": len(subjects)}
    for kind in ("nearid", "frozen", "meanpool"):
        out[f"spearman_{kind}_vs_truth"] = mean("spearman", kind)
    for kind in ("nearid", "frozen", "meanpool", "last"):
        out[f"selection_regret_{kind}"] = mean("regret", kind)
    out["base_truth"] = mean("base_truth")
    out["best_truth"] = mean("best_truth")
    out["subjects_learning_0.3"] = sum(s["best_truth"] - s["base_truth"] >= 0.3 for s in subjects)
    tuned = [s for s in subjects if "reward_finetune" in s]
    if tuned:
        def rmean(where: str, key: str) -> float:
            return nanmean([s["reward_finetune"][where][key] for s in tuned if where in s["reward_finetune"]])

        out |= {
            "reward_finetune_truth_before": rmean("before", "truth"),
            "reward_finetune_truth_after": rmean("after_prior", "truth"),
            "reward_finetune_prompt_fidelity_before": rmean("before", "prompt_fidelity"),
            "reward_finetune_prompt_fidelity_after": rmean("after_prior", "prompt_fidelity"),
            "reward_finetune_nearid_before": rmean("before", "nearid"),
            "reward_finetune_nearid_after": rmean("after_prior", "nearid"),
            "penalty_lookalike_rate_before": rmean("before", "lookalike_rate"),
            "penalty_lookalike_rate_after": rmean("after_prior", "lookalike_rate"),
            "reward_finetune_copy_rate_before": rmean("before", "copy_rate"),
            "reward_finetune_copy_rate_after": rmean("after_prior", "copy_rate"),
        }  # fmt: skip
        if any("after_noprior" in s["reward_finetune"] for s in tuned):
            out |= {
                "reward_noprior_truth_after": rmean("after_noprior", "truth"),
                "reward_noprior_prompt_fidelity_after": rmean("after_noprior", "prompt_fidelity"),
                "reward_noprior_copy_rate_after": rmean("after_noprior", "copy_rate"),
                "reward_noprior_nearid_after": rmean("after_noprior", "nearid"),
            }  # fmt: skip
    out["seconds"] = round(seconds, 1)
    return out


def markdown(summary: dict[str, Any], subjects: list[dict[str, Any]] | None = None) -> str:
    """The averaged figures, then (with ``subjects``) one row per subject."""
    lines = ["| figure | value |", "|---|---|"]
    for key, value in summary.items():
        lines.append(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
    if subjects:
        lines += ["", "| subject | look-alike changes | base truth | best truth "
                  "| Spearman NearID / frozen / mean pool | regret NearID / frozen / mean pool / last "
                  "| reward: truth before -> after (no prior) "
                  "| prompt fidelity before -> after (no prior) | look-alike rate before -> after |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in subjects:
            sp, rg = s["spearman"], s["regret"]
            rf = s.get("reward_finetune", {})
            b, a, n = rf.get("before", {}), rf.get("after_prior", {}), rf.get("after_noprior", {})

            def f(m: dict[str, Any], k: str) -> str:
                return f"{m[k]:.2f}" if k in m else "-"

            lines.append(
                f"| {s['subject']['index']} | {s['subject']['changed']} | {s['base_truth']:.2f} "
                f"| {s['best_truth']:.2f} "
                f"| {sp['nearid']:.2f} / {sp['frozen']:.2f} / {sp['meanpool']:.2f} "
                f"| {rg['nearid']:.2f} / {rg['frozen']:.2f} / {rg['meanpool']:.2f} / {rg['last']:.2f} "
                f"| {f(b, 'truth')} -> {f(a, 'truth')} ({f(n, 'truth')}) "
                f"| {f(b, 'prompt_fidelity')} -> {f(a, 'prompt_fidelity')} ({f(n, 'prompt_fidelity')}) "
                f"| {f(b, 'lookalike_rate')} -> {f(a, 'lookalike_rate')} |")
    return "\n".join(lines)


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """Summarise the subjects of several runs together (``seconds`` is the slowest run's: they ran side by side)."""
    import json

    runs = [json.loads(Path(p).read_text()) for p in args.merge]
    subjects = sorted((s for run in runs for s in run["per_subject"]), key=lambda s: s["subject"]["index"])
    return report(subjects, max(run["seconds"] for run in runs), args.json,
                  {"settings": runs[0]["settings"], "merged_from": list(args.merge)})


def report(subjects: list[dict[str, Any]], seconds: float, json_path: str | None,
           extra: dict[str, Any]) -> dict[str, Any]:
    """Summarise, print the Markdown tables, and write the JSON (summary, ``extra``, per-subject results)."""
    summary = summarise(subjects, seconds)
    result = {**summary, **extra, "per_subject": subjects}
    print(markdown(summary, subjects))
    if json_path:
        from nearid_reward.files import write_json_atomic

        write_json_atomic(Path(json_path), result)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, run_config = parse_args(argv)
    if args.merge:
        return merge(args)
    torch.set_num_threads(1)
    started = time.perf_counter()
    assets = WorldAssets(Path(args.weights))
    assets.check()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_world_pipeline(assets)
    oracle = AttributeOracle.from_pretrained(assets.oracle)
    config = run_config.render_config()
    classes = class_images(pipe, out / "class_images", config)
    subjects = []
    for index in range(args.first_subject, args.first_subject + args.subjects):
        t = time.perf_counter()
        result = personalise_subject(run_config, assets, pipe, oracle, index, classes, config)
        subjects.append(result)
        print(f"subject {index}: base truth {result['base_truth']:.2f}, best {result['best_truth']:.2f}, "
              f"spearman nearid {result['spearman']['nearid']:.2f} frozen {result['spearman']['frozen']:.2f} "
              f"meanpool {result['spearman']['meanpool']:.2f}, regret nearid {result['regret']['nearid']:.2f} "
              f"frozen {result['regret']['frozen']:.2f} last {result['regret']['last']:.2f} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    return report(subjects, time.perf_counter() - started, args.json,
                  {"settings": {k: v for k, v in vars(args).items() if k != "json"}})


if __name__ == "__main__":
    main()
