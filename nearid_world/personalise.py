"""One personalisation run in the generation world, measured against the truth (used by the benchmark and the demo).

:func:`personalise_subject` does, for one held-out subject: DreamBooth-LoRA through ``nearid-dreambooth`` hosting
``examples/dreambooth_lora_minimal.py`` (checkpoints scored by the launcher with NearID, as in a user's run); the
fixed evaluation set rendered for the base model and every checkpoint and measured with
:func:`nearid_world.evaluate.evaluate_images`; the checkpoint each score would select; and identity-reward fine-tuning
(``examples/train_lora_identity_reward.py``, DRaFT-K) from the NearID-selected checkpoint, with the look-alike as
negatives and the KL prior on class images (and, optionally, once without the prior). The training scripts run as
subprocesses, exactly as a user would start them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

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

__all__ = ["PersonaliseConfig", "personalise_subject", "class_images", "reward_dir_name", "spearman", "nanmean"]

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class PersonaliseConfig:
    """Settings of one subject's run (the benchmark's flags of the same names).

    Attributes:
        out: work folder; each subject gets ``subjectNN/`` (finished runs there are reused).
        steps, checkpointing_steps, learning_rate, rank: DreamBooth-LoRA.
        per_context, inference_steps, guidance_scale: the fixed evaluation set and how it is rendered.
        reward_steps, reward_learning_rate, reward_backprop_steps: DRaFT-K (``reward_steps=0`` skips it).
        reward_negative_weight: lambda of the look-alike penalty in the reward (``--negative_weight``).
        no_prior_run: skip the reward run without the prior term.
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
    seed: int = 0

    def render_config(self) -> RenderConfig:
        return RenderConfig(num_inference_steps=self.inference_steps, guidance_scale=self.guidance_scale,
                            batch_size=16, scheduler="DDIMScheduler", render_base=False, render_class=False)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan when either side is constant."""
    def ranks(x: list[float]) -> np.ndarray:
        arr = np.asarray(x, dtype=np.float64)
        order = arr.argsort(kind="stable")
        r = np.empty(len(arr))
        r[order] = np.arange(len(arr), dtype=np.float64)
        for value in np.unique(arr):  # average ranks over ties
            tie = arr == value
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


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
        Image.fromarray(array).save(folder / f"class{i}.png")
    return folder


def run(command: list[str], log: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with log.open("w") as handle:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(command[:4])} ... failed with exit code {done.returncode}; log {log}:\n{tail}")


def dreambooth(args: PersonaliseConfig, assets: WorldAssets, subject: Any, folder: Path) -> Path:
    out = folder / "dreambooth"
    if (out / LORA_WEIGHT_NAME).is_file():
        return out
    run([
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
    return out


def reward_dir_name(args: PersonaliseConfig, *, prior: bool) -> str:
    """Folder (and render grid) name of a reward run: with or without the prior, and the penalty weight."""
    return f"reward_{'prior' if prior else 'noprior'}_neg{args.reward_negative_weight:g}"


def reward_finetune(args: PersonaliseConfig, assets: WorldAssets, subject: Any, init: Path, folder: Path,
                    classes: Path, *, prior: bool) -> Path:
    out = folder / reward_dir_name(args, prior=prior)
    if (out / LORA_WEIGHT_NAME).is_file():
        return out
    command = [
        sys.executable, str(ROOT / "examples" / "train_lora_identity_reward.py"),
        "--pretrained_model_name_or_path", str(assets.world_model), "--nearid_model", str(assets.nearid),
        "--reference_dir", str(subject.instance_dir), "--negative_dir", str(subject.negative_dir),
        "--negative_weight", str(args.reward_negative_weight),
        "--instance_token", scenes.INSTANCE_TOKEN, "--class_noun", scenes.CLASS_NOUN, "--prompts", str(PROMPTS),
        "--init_lora", str(init), "--mode", "draft", "--backprop_num_steps", str(args.reward_backprop_steps),
        "--num_inference_steps", str(args.inference_steps), "--guidance_scale", str(args.guidance_scale),
        "--resolution", "32", "--train_batch_size", "4", "--max_train_steps", str(args.reward_steps),
        "--learning_rate", str(args.reward_learning_rate), "--checkpointing_steps", str(args.reward_steps),
        "--validation_steps", str(args.reward_steps), "--validation_inference_steps", str(args.inference_steps),
        "--output_dir", str(out), "--seed", str(args.seed), "--report_to", "none",
    ]  # fmt: skip
    if prior:
        command += ["--class_data_dir", str(classes), "--prior_type", "kl", "--prior_loss_weight", "1.0"]
    run(command, folder / f"{out.name}.log")
    return out


def evaluate_lora(pipe: Any, lora: Path | None, eval_set: EvalSet, subject: Any, oracle: AttributeOracle,
                  scorers: Scorers, config: RenderConfig) -> tuple[dict[str, float], torch.Tensor]:
    if lora is not None:
        pipe.load_lora_weights(str(lora), weight_name=LORA_WEIGHT_NAME, adapter_name="bench")
    try:
        images = render_eval_set(pipe, eval_set, config)
    finally:
        if lora is not None:
            pipe.delete_adapters("bench")
    return evaluate_images(images, eval_set, subject, oracle, scorers), images


def save_grid(images: torch.Tensor, rows: int, path: Path, scale: int = 3) -> Path:
    """Save float ``[N, 3, H, W]`` images in [0, 1] as one PNG grid of ``rows`` rows (nearest-neighbour upscaled)."""
    grid = image_grid(images, cols=math.ceil(len(images) / rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
    return path


def nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def personalise_subject(args: PersonaliseConfig, assets: WorldAssets, pipe: Any, oracle: AttributeOracle,
                        index: int, classes: Path, config: RenderConfig) -> dict[str, Any]:
    """Run and measure one held-out subject (see the module docstring); returns its figures as a dict."""
    folder = Path(args.out) / f"subject{index:02d}"
    subject = make_subject(index, folder, seed=args.seed)
    scorers = Scorers(assets, subject.instance_dir)
    for name, views in (("subject", subject.instance_dir), ("lookalike", subject.negative_dir)):
        pixels = [torch.from_numpy(np.array(to_rgb(load_image(f)))).permute(2, 0, 1).float() / 255
                  for f in list_image_files(views)]
        save_grid(torch.stack(pixels), 1, folder / "renders" / f"{name}.png")
    eval_set = EvalSet(per_context=args.per_context)
    started = time.perf_counter()
    run_dir = dreambooth(args, assets, subject, folder)
    db_seconds = time.perf_counter() - started
    rows = []
    renders = folder / "renders"
    rows_of_grid = len(eval_set.contexts)
    base, base_images = evaluate_lora(pipe, None, eval_set, subject, oracle, scorers, config)
    save_grid(base_images, rows_of_grid, renders / "base.png")
    for checkpoint in find_checkpoints(run_dir):
        metrics, images = evaluate_lora(pipe, checkpoint.path, eval_set, subject, oracle, scorers, config)
        save_grid(images, rows_of_grid, renders / f"{checkpoint.name}.png")
        rows.append({"step": checkpoint.step, **metrics})
    truth = [r["truth"] for r in rows]
    best_truth = max(truth)
    picks = {kind: int(np.argmax([r[kind] for r in rows])) for kind in ("nearid", "frozen", "meanpool")}
    picks["last"] = len(rows) - 1
    result: dict[str, Any] = {
        "folder": str(folder), "subject": subject.to_dict(), "base": base, "checkpoints": rows,
        "dreambooth_seconds": round(db_seconds, 1),
        "spearman": {kind: spearman([r[kind] for r in rows], truth) for kind in ("nearid", "frozen", "meanpool")},
        "picked_step": {k: rows[i]["step"] for k, i in picks.items()},
        "regret": {k: best_truth - rows[i]["truth"] for k, i in picks.items()},
        "base_truth": base["truth"], "best_truth": best_truth,
    }  # fmt: skip
    history = run_dir / "identity_history.jsonl"
    if history.is_file():  # what the launcher itself measured during training (NearID on its own prompt set)
        lines = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
        result["launcher_history"] = lines
    if args.reward_steps > 0:
        init = rows[picks["nearid"]]
        init_path = run_dir / f"checkpoint-{init['step']}"
        reward: dict[str, Any] = {"init_step": init["step"], "before": init}
        for prior in (True,) if args.no_prior_run else (True, False):
            t = time.perf_counter()
            out = reward_finetune(args, assets, subject, init_path, folder, classes, prior=prior)
            metrics, images = evaluate_lora(pipe, out, eval_set, subject, oracle, scorers, config)
            save_grid(images, rows_of_grid, renders / f"{out.name}.png")
            reward["after_prior" if prior else "after_noprior"] = metrics
            reward["seconds_prior" if prior else "seconds_noprior"] = round(time.perf_counter() - t, 1)
        result["reward_finetune"] = reward
    return result
