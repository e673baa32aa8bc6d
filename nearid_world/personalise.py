"""One personalisation run in the generation world, measured against the truth (used by the benchmark and the demo).

:func:`personalise_subject` does, for one held-out subject: DreamBooth-LoRA through ``nearid-dreambooth`` hosting
``examples/dreambooth_lora_minimal.py`` (checkpoints scored by the launcher with NearID, as in a user's run); for the
base model and every checkpoint, the fixed *evaluation* set (where the truth is measured) and a *selection* set (the
same prompts with other seeds, where the selectors score) rendered and measured with
:func:`nearid_world.evaluate.evaluate_images`; the checkpoint each score would select from the selection renders;
and identity-reward fine-tuning (``examples/train_lora_identity_reward.py``, DRaFT-K) from the NearID-selected
checkpoint with each reward of :data:`REWARD_KINDS` (NearID, the frozen head, mean pooling), the look-alike as
negatives and the KL prior on class images; with ``curve=True`` the reward runs go on to ``curve_steps`` (with and
without the prior) and every ``curve_every`` steps are measured (the over-optimisation curves). The training scripts
run as subprocesses, exactly as a user would start them. Per-sample values are kept so that the benchmark can
bootstrap samples within checkpoints (:mod:`nearid_world.stats`).
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from nearid_reward.files import atomic_write, read_jsonl
from nearid_reward.images import list_image_files, load_image, to_rgb
from nearid_reward.rendering import RenderConfig
from nearid_reward.run_checkpoints import LORA_WEIGHT_NAME, find_checkpoints
from nearid_reward.validation import image_grid

from . import scenes
from .evaluate import (
    INSTANCE_PROMPT,
    PROMPTS,
    EvalSet,
    Scorers,
    WorldAssets,
    evaluate_images,
    make_subject,
    render_eval_set,
)
from .oracle import AttributeOracle

__all__ = ["PersonaliseConfig", "personalise_subject", "class_images", "reward_dir_name", "spearman",
           "REWARD_KINDS", "SCORE_KINDS", "SELECTION_SEED_OFFSET"]

ROOT = Path(__file__).resolve().parents[1]
# The rewards fine-tuned with: NearID, the backbone's own (frozen) head, mean-pooled backbone tokens.
REWARD_KINDS: tuple[str, ...] = ("nearid", "frozen", "meanpool")
# The scores every sample gets (the leave-out head only where it is shipped).
SCORE_KINDS: tuple[str, ...] = ("nearid", "frozen", "meanpool", "leaveout")
# Seeds of the selection renders: the evaluation set's prompts, other seeds (the truth is never measured on them).
SELECTION_SEED_OFFSET = 2 * 10**8


@dataclass
class PersonaliseConfig:
    """Settings of one subject's run (the benchmark's flags of the same names).

    Attributes:
        out: work folder; each subject gets ``subjectNN/`` (finished runs there are reused).
        steps, checkpointing_steps, learning_rate, rank: DreamBooth-LoRA.
        per_context, inference_steps, guidance_scale: the fixed evaluation set and how it is rendered.
        reward_steps, reward_learning_rate, reward_backprop_steps: DRaFT-K (``reward_steps=0`` skips it).
        reward_negative_weight: lambda of the look-alike penalty in the reward (``--negative_weight``).
        no_prior_run: skip the reward runs without the prior term (they only run with ``curve``, as curves).
        reward_kinds: the rewards to fine-tune with (subset of :data:`REWARD_KINDS`).
        curve_steps, curve_every: with ``curve`` (see :func:`personalise_subject`), reward runs go on to
            ``curve_steps`` steps, measured every ``curve_every`` steps (which must divide ``reward_steps``).
        seed: training seed.
    """

    out: str = "bench_out/personalisation"
    steps: int = 400
    checkpointing_steps: int = 40
    learning_rate: float = 2e-3
    rank: int = 8
    per_context: int = 4
    inference_steps: int = 20
    guidance_scale: float = 4.0
    reward_steps: int = 40
    reward_learning_rate: float = 1e-3
    reward_backprop_steps: int = 2
    reward_negative_weight: float = 0.5
    no_prior_run: bool = False
    reward_kinds: tuple[str, ...] = REWARD_KINDS
    curve_steps: int = 200
    curve_every: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [k for k in self.reward_kinds if k not in REWARD_KINDS]
        if unknown or not self.reward_kinds:
            raise ValueError(f"reward_kinds must be a non-empty subset of {REWARD_KINDS}, got {self.reward_kinds}")
        self.reward_kinds = tuple(self.reward_kinds)

    def render_config(self) -> RenderConfig:
        return RenderConfig(num_inference_steps=self.inference_steps, guidance_scale=self.guidance_scale,
                            batch_size=16, scheduler="DDIMScheduler", render_base=False, render_class=False)


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation of two short ``[C]`` vectors (average ranks for ties; nan when either is constant)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ra = (x[:, None] > x[None, :]).sum(1) + 0.5 * ((x[:, None] == x[None, :]).sum(1) - 1)  # [C] average ranks
    rb = (y[:, None] > y[None, :]).sum(1) + 0.5 * ((y[:, None] == y[None, :]).sum(1) - 1)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / denom if denom > 0 else math.nan


def class_images(pipe: Any, folder: Path, config: RenderConfig, count: int = 8) -> Path:
    """Class images for the prior term: the base world model's "a object on the <context>" (rendered once)."""
    if folder.is_dir() and len(list(folder.glob("*.png"))) >= count:
        return folder
    from nearid_reward.rendering import render_images

    folder.mkdir(parents=True, exist_ok=True)
    contexts = list(scenes.CONTEXTS)
    prompts = [f"a {scenes.CLASS_NOUN} on the {contexts[i % len(contexts)]}" for i in range(count)]
    images = render_images(pipe, prompts, seeds=[5 * 10**7 + i for i in range(count)], config=config)
    for i, image in enumerate(images):
        array = (image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        with atomic_write(folder / f"class{i}.png", "wb") as handle:  # processes side by side share the folder
            Image.fromarray(array).save(handle, format="PNG")
    return folder


def run(command: list[str], log: Path) -> float:
    """Run a training script as a subprocess (output to ``log``); returns the CPU seconds it used (user + system),
    a cost figure that does not depend on how busy the machine was."""
    # one torch thread per training process unless the caller says otherwise: the study runs processes side by side
    env = {"OMP_NUM_THREADS": "1", **os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("w") as handle:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(command[:4])} ... failed with exit code {done.returncode}; log {log}:\n{tail}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def dreambooth(args: PersonaliseConfig, assets: WorldAssets, subject: Any, folder: Path) -> Path:
    out = folder / "dreambooth"
    if (out / LORA_WEIGHT_NAME).is_file():
        return out
    cpu = run([
        sys.executable, "-m", "integrations.dreambooth",
        "--script", str(ROOT / "examples" / "dreambooth_lora_minimal.py"),
        "--nearid_model", str(assets.nearid), "--nearid_reference_dir", str(subject.instance_dir),
        "--nearid_negative_dir", str(subject.negative_dir), "--nearid_prompts", str(PROMPTS),
        "--nearid_instance_token", scenes.INSTANCE_TOKEN, "--nearid_class_noun", scenes.CLASS_NOUN,
        "--nearid_num_inference_steps", str(args.inference_steps), "--nearid_guidance_scale", str(args.guidance_scale),
        "--nearid_no_base",
        "--",
        "--pretrained_model_name_or_path", str(assets.world_model), "--instance_data_dir", str(subject.instance_dir),
        "--instance_prompt", INSTANCE_PROMPT, "--output_dir", str(out), "--resolution", "32",
        "--train_batch_size", "3", "--max_train_steps", str(args.steps),
        "--checkpointing_steps", str(args.checkpointing_steps), "--learning_rate", str(args.learning_rate),
        "--rank", str(args.rank), "--seed", str(args.seed), "--report_to", "tensorboard",
    ], folder / "dreambooth.log")  # fmt: skip
    (out / "cpu_seconds.txt").write_text(f"{cpu:.1f}\n")
    return out


def reward_dir_name(args: PersonaliseConfig, *, prior: bool, kind: str = "nearid", steps: int | None = None) -> str:
    """Folder (and render grid) name of a reward run: the reward, with or without the prior, the penalty weight and
    the number of steps."""
    name = f"reward_{'prior' if prior else 'noprior'}_neg{args.reward_negative_weight:g}"
    name = name if kind == "nearid" else f"{name}_{kind}"
    return name if steps is None else f"{name}_steps{steps}"


def reward_model_arguments(assets: WorldAssets, kind: str) -> list[str]:
    """The reward example's flags that make ``kind``'s reward: NearID's head, the backbone's own head, mean pool."""
    if kind == "nearid":
        return ["--nearid_model", str(assets.nearid)]
    if kind == "frozen":
        return ["--nearid_model", str(assets.backbone)]
    if kind == "meanpool":
        return ["--nearid_model", str(assets.backbone), "--nearid_pooling", "mean"]
    raise ValueError(f"reward kind must be one of {REWARD_KINDS}, got {kind!r}")


def reward_finetune(args: PersonaliseConfig, assets: WorldAssets, subject: Any, init: Path, folder: Path,
                    classes: Path, *, prior: bool, kind: str = "nearid", steps: int | None = None,
                    every: int | None = None) -> Path:
    """DRaFT-K from ``init`` with ``kind``'s reward for ``steps`` (default ``reward_steps``), a checkpoint (and a
    validation) every ``every`` steps (default: only at the end)."""
    steps = args.reward_steps if steps is None else steps
    every = steps if every is None else every
    out = folder / reward_dir_name(args, prior=prior, kind=kind, steps=steps)
    if (out / LORA_WEIGHT_NAME).is_file():
        return out
    command = [
        sys.executable, str(ROOT / "examples" / "train_lora_identity_reward.py"),
        "--pretrained_model_name_or_path", str(assets.world_model), *reward_model_arguments(assets, kind),
        "--reference_dir", str(subject.instance_dir), "--negative_dir", str(subject.negative_dir),
        "--negative_weight", str(args.reward_negative_weight),
        "--instance_token", scenes.INSTANCE_TOKEN, "--class_noun", scenes.CLASS_NOUN, "--prompts", str(PROMPTS),
        "--init_lora", str(init), "--mode", "draft", "--backprop_num_steps", str(args.reward_backprop_steps),
        "--num_inference_steps", str(args.inference_steps), "--guidance_scale", str(args.guidance_scale),
        "--resolution", "32", "--train_batch_size", "4", "--max_train_steps", str(steps),
        "--learning_rate", str(args.reward_learning_rate), "--checkpointing_steps", str(every),
        "--validation_steps", str(every), "--validation_inference_steps", str(args.inference_steps),
        "--output_dir", str(out), "--seed", str(args.seed), "--report_to", "none",
    ]  # fmt: skip
    if prior:
        command += ["--class_data_dir", str(classes), "--prior_type", "kl", "--prior_loss_weight", "1.0"]
    cpu = run(command, folder / f"{out.name}.log")
    (out / "cpu_seconds.txt").write_text(f"{cpu:.1f}\n")
    return out


def evaluate_lora(pipe: Any, lora: Path | None, eval_set: EvalSet, subject: Any, oracle: AttributeOracle,
                  scorers: Scorers, config: RenderConfig,
                  selection_set: EvalSet | None = None) -> tuple[dict[str, Any], torch.Tensor]:
    """Render and measure ``eval_set`` with the adapter ``lora`` (None: the base model); with ``selection_set``
    also render that set with the same adapter and store its measures under ``"selection"``."""
    if lora is not None:
        pipe.load_lora_weights(str(lora), weight_name=LORA_WEIGHT_NAME, adapter_name="bench")
    try:
        images = render_eval_set(pipe, eval_set, config)
        picked = render_eval_set(pipe, selection_set, config) if selection_set is not None else None
    finally:
        if lora is not None:
            pipe.delete_adapters("bench")
    metrics = evaluate_images(images, eval_set, subject, oracle, scorers)
    if picked is not None and selection_set is not None:
        metrics["selection"] = evaluate_images(picked, selection_set, subject, oracle, scorers)
    return metrics, images


def save_grid(images: torch.Tensor, rows: int, path: Path, scale: int = 3) -> Path:
    """Save float ``[N, 3, H, W]`` images in [0, 1] as one PNG grid of ``rows`` rows (nearest-neighbour upscaled)."""
    grid = image_grid(images, cols=math.ceil(len(images) / rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
    return path


def _cpu_seconds(run_dir: Path) -> float:
    """The CPU seconds a training run recorded (NaN for a run made before they were recorded)."""
    path = run_dir / "cpu_seconds.txt"
    return float(path.read_text()) if path.is_file() else math.nan


def _strip(metrics: dict[str, Any]) -> dict[str, Any]:
    """A measure without its selection renders (what a reward run's rows keep)."""
    return {k: v for k, v in metrics.items() if k != "selection"}


def reward_runs(args: PersonaliseConfig, assets: WorldAssets, pipe: Any, oracle: AttributeOracle, subject: Any,
                scorers: Scorers, eval_set: EvalSet, config: RenderConfig, init: dict[str, Any], init_path: Path,
                folder: Path, classes: Path, *, curve: bool) -> dict[str, Any]:
    """Reward fine-tuning from ``init_path`` with every reward kind (see :func:`personalise_subject`)."""
    renders = folder / "renders"
    rows_of_grid = len(eval_set.contexts)
    out: dict[str, Any] = {"init_step": init["step"], "before": _strip(init), "kinds": {}}
    priors = (True, False) if curve and not args.no_prior_run else (True,)
    for kind in args.reward_kinds:
        entry: dict[str, Any] = {}
        for prior in priors:
            t = time.perf_counter()
            tag = "prior" if prior else "noprior"
            steps = args.curve_steps if curve else args.reward_steps
            every = args.curve_every if curve else args.reward_steps
            run_dir = reward_finetune(args, assets, subject, init_path, folder, classes, prior=prior, kind=kind,
                                      steps=steps, every=every)
            measured: dict[int, dict[str, Any]] = {}
            for checkpoint in find_checkpoints(run_dir):
                if not curve and checkpoint.step != args.reward_steps:
                    continue
                metrics, images = evaluate_lora(pipe, checkpoint.path, eval_set, subject, oracle, scorers, config)
                measured[checkpoint.step] = metrics
                if checkpoint.step == args.reward_steps:
                    save_grid(images, rows_of_grid, renders / f"{reward_dir_name(args, prior=prior, kind=kind)}.png")
            if args.reward_steps not in measured:
                raise RuntimeError(f"reward run {run_dir} left no checkpoint-{args.reward_steps}")
            entry[f"after_{tag}"] = measured[args.reward_steps]
            entry[f"seconds_{tag}"] = round(time.perf_counter() - t, 1)
            entry[f"cpu_seconds_{tag}"] = _cpu_seconds(run_dir)
            entry[f"steps_{tag}"] = steps
            if curve:
                history = {r["step"]: r for r in read_jsonl(run_dir / "identity_history.jsonl")}
                summary = run_dir / "training_summary.json"
                entry[f"curve_{tag}"] = {
                    "steps": [0, *sorted(measured)],
                    "truth": [init["truth"], *(measured[k]["truth"] for k in sorted(measured))],
                    "proxy": [init[kind], *(measured[k][kind] for k in sorted(measured))],
                    "validator": [math.nan, *(history.get(k, {}).get("nearid/identity_mean", math.nan)
                                              for k in sorted(measured))],
                    "validator_best_step": json.loads(summary.read_text()).get("best_step") if summary.is_file()
                    else None,
                    "samples_truth": [init["samples"]["truth"], *(measured[k]["samples"]["truth"]
                                                                  for k in sorted(measured))],
                }  # fmt: skip
        out["kinds"][kind] = entry
    return out


def personalise_subject(args: PersonaliseConfig, assets: WorldAssets, pipe: Any, oracle: AttributeOracle,
                        index: int, classes: Path, config: RenderConfig, *, curve: bool = False) -> dict[str, Any]:
    """Run and measure one held-out subject (see the module docstring); returns its figures as a dict.

    Every checkpoint row holds the evaluation set's figures (and ``samples``, per-sample values) and, under
    ``selection``, the same for the selection renders. ``spearman`` ranks the checkpoints by each score on the
    selection renders against the truth on the evaluation renders; ``regret`` is the truth lost by the checkpoint
    each score ranks first on the selection renders. ``reward`` holds, per reward kind, the figures before and after
    ``reward_steps`` DRaFT-K steps from the NearID-selected checkpoint (and with ``curve``, the over-optimisation
    curves); ``reward_finetune`` repeats the NearID reward's in the earlier layout.
    """
    if curve and (args.curve_every < 1 or args.reward_steps % args.curve_every
                  or args.curve_steps < args.reward_steps):
        raise ValueError(f"curve_every ({args.curve_every}) must divide reward_steps ({args.reward_steps}) and "
                         f"curve_steps ({args.curve_steps}) must be >= reward_steps")
    folder = Path(args.out) / f"subject{index:02d}"
    subject = make_subject(index, folder, seed=args.seed)
    scorers = Scorers(assets, subject.instance_dir)
    for name, views in (("subject", subject.instance_dir), ("lookalike", subject.negative_dir)):
        pixels = [torch.from_numpy(np.array(to_rgb(load_image(f)))).permute(2, 0, 1).float() / 255
                  for f in list_image_files(views)]
        save_grid(torch.stack(pixels), 1, folder / "renders" / f"{name}.png")
    eval_set = EvalSet(per_context=args.per_context)
    selection_set = EvalSet(per_context=args.per_context, seed_offset=SELECTION_SEED_OFFSET)
    started = time.perf_counter()
    run_dir = dreambooth(args, assets, subject, folder)
    db_seconds = time.perf_counter() - started
    eval_cpu = time.process_time()
    rows = []
    renders = folder / "renders"
    rows_of_grid = len(eval_set.contexts)
    base, base_images = evaluate_lora(pipe, None, eval_set, subject, oracle, scorers, config)
    save_grid(base_images, rows_of_grid, renders / "base.png")
    for checkpoint in find_checkpoints(run_dir):
        metrics, images = evaluate_lora(pipe, checkpoint.path, eval_set, subject, oracle, scorers, config,
                                        selection_set)
        save_grid(images, rows_of_grid, renders / f"{checkpoint.name}.png")
        rows.append({"step": checkpoint.step, **metrics})
    kinds = [k for k in SCORE_KINDS if k in rows[0]]
    truth = [r["truth"] for r in rows]
    best_truth = max(truth)
    picks = {kind: int(np.argmax([r["selection"][kind] for r in rows])) for kind in kinds}
    picks["last"] = len(rows) - 1
    result: dict[str, Any] = {
        "folder": str(folder), "subject": subject.to_dict(), "base": base, "checkpoints": rows,
        "dreambooth_seconds": round(db_seconds, 1), "dreambooth_cpu_seconds": _cpu_seconds(run_dir),
        "checkpoint_eval_cpu_seconds": round(time.process_time() - eval_cpu, 1),
        "spearman": {kind: spearman([r["selection"][kind] for r in rows], truth) for kind in kinds},
        "picked_step": {k: rows[i]["step"] for k, i in picks.items()},
        "regret": {k: best_truth - rows[i]["truth"] for k, i in picks.items()},
        "base_truth": base["truth"], "best_truth": best_truth,
    }  # fmt: skip
    history = run_dir / "identity_history.jsonl"
    if history.is_file():  # what the launcher itself measured during training (NearID on its own prompt set)
        lines = read_jsonl(history)
        result["launcher_history"] = lines
        scored = {r["step"]: r.get("nearid/identity_mean") for r in lines if r.get("source") == "checkpoint"}
        if all(scored.get(r["step"]) is not None for r in rows):  # the launcher's own pick, as a user would make it
            pick = int(np.argmax([scored[r["step"]] for r in rows]))
            result["picked_step"]["launcher"] = rows[pick]["step"]
            result["regret"]["launcher"] = best_truth - rows[pick]["truth"]
    if args.reward_steps > 0:
        init = rows[picks["nearid"]]
        init_path = run_dir / f"checkpoint-{init['step']}"
        reward = reward_runs(args, assets, pipe, oracle, subject, scorers, eval_set, config, init, init_path, folder,
                             classes, curve=curve)
        result["reward"] = reward
        if "nearid" in reward["kinds"]:
            legacy = {"init_step": reward["init_step"], "before": reward["before"]}
            legacy |= {k: v for k, v in reward["kinds"]["nearid"].items() if not k.startswith("curve_")}
            result["reward_finetune"] = legacy
    return result
