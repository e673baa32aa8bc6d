"""``nearid-make-world``: pretrain the tiny text-to-image model of the generation world.

The model is an ordinary diffusers ``StableDiffusionPipeline``: a CLIP BPE tokenizer whose vocabulary holds every word
of the world (:data:`nearid_world.scenes.VOCABULARY`), a small ``CLIPTextModel``, an ``AutoencoderKL`` that halves the
resolution (32 px images, 16x16x4 latents) and a ``UNet2DConditionModel`` with cross-attention at 8x8, trained from
scratch in two stages:

1. the autoencoder on rendered views (L1 reconstruction plus a small KL term); its ``scaling_factor`` is then set to
   one over the standard deviation of the latents, as Stable Diffusion's is;
2. the UNet and the text encoder together on the epsilon objective (DDPM noise schedule of SD 1.5), with captions
   that leave attributes out at random (and 10 % empty captions, for classifier-free guidance), with an EMA of both.

Held-out identities (:func:`nearid_world.scenes.held_out_identities`) are never rendered for training: the benchmark's
subjects are new to the model. The output folder loads with ``StableDiffusionPipeline.from_pretrained`` and can be
passed as ``--pretrained_model_name_or_path`` to DreamBooth scripts.

Reproducible by construction: every component that draws random numbers (the renderer, each model's initialisation,
each stage's data order, posterior and diffusion noise, timesteps, caption dropout) draws from its own stream derived
from ``--seed`` (:mod:`nearid_world.seeding`), and nothing draws from the global generators, so a change in one
component leaves the others' numbers alone, and a rerun of the same command on the same software, device and thread
count writes the same bytes. ``world_model_config.json`` records the command, the seed, the versions, the thread
count, the initial weights' hashes and the sha256 of every file written (itself excluded).

Resumable: with ``--checkpoint_every N`` (default 250) the run saves its whole state (weights, EMA, optimizer state,
every generator's state) to ``OUTPUT_DIR/checkpoints/<stage>-<step>`` every N steps of each stage and once at the
boundary between the autoencoder and denoiser stages; ``--resume`` continues from the newest complete checkpoint and
ends with the same bytes as an uninterrupted run. ``--eval_every N`` measures prompt following
(:func:`nearid_world.evaluate.prompt_following`, read by the shipped oracle) every N denoiser steps and appends it to
``OUTPUT_DIR/prompt_following.jsonl``; once, it also measures the autoencoder's ceiling
(:func:`nearid_world.evaluate.autoencoder_ceiling`), recorded in the config's metrics.

Command that made the shipped ``nearid_world/weights/world_model`` (a rerun gives the same bytes; docs/world.md)::

    nearid-make-world --output_dir nearid_world/weights/world_model --seed 0 --threads 1 --eval_every 1000
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shlex
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nearid_reward.cli.arguments import parse_arguments, parse_device
from nearid_reward.cli.entry_points import entry_point
from nearid_reward.files import (
    append_jsonl,
    read_jsonl,
    remove_stale_temporaries,
    temporary_path,
    write_json_atomic,
    write_text_atomic,
)
from train_head.synthetic_backbone import warmup_cosine

from . import scenes
from .seeding import COMPONENTS, child_seed_sequence, numpy_generator, seeded_init, torch_generator
from .training_state import (
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    load_training_state,
    module_sha256,
    output_sha256,
    read_scalars,
    save_training_state,
)

logger = logging.getLogger(__name__)

__all__ = [
    "WorldModelConfig", "RunOptions", "MakeWorldArguments", "build_world_pipeline", "render_training_set", "caption",
    "pretrain_world_model", "denoising_loss", "parse_args", "main",
]

CONFIG_NAME = "world_model_config.json"
CHECKPOINTS_DIR = "checkpoints"
SNAPSHOT_DIR = "snapshot"
CURVE_NAME = "prompt_following.jsonl"
STAGES: tuple[str, ...] = ("autoencoder", "denoiser")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SEEDING = "per-component: numpy SeedSequence(seed).spawn, one child per nearid_world.seeding.COMPONENTS entry"


@dataclass
class WorldModelConfig:
    """Sizes and schedule of the world model's pretraining (every field is also a ``nearid-make-world`` flag).

    Attributes:
        image_size: pixels (the latents are half of it).
        num_images: rendered training views (random non-held-out identity, random context).
        held_out: number of held-out identities never rendered (the benchmark draws its subjects from them).
        vae_steps, vae_batch_size, vae_learning_rate: autoencoder stage.
        unet_steps, batch_size, learning_rate, warmup_steps: denoiser stage (AdamW, cosine decay to 10 %).
        stop_after: end the denoiser stage after this many steps of the ``unet_steps`` schedule (0: run it all);
            the result equals the ``--snapshot_every`` snapshot taken at that step.
        ema_decay: EMA of the UNet and text encoder weights (what is saved).
        keep_attribute, keep_context, empty_caption: caption dropout probabilities.
        unet_channels, text_width: model sizes.
        attention_at_full_resolution: cross-attention in the UNet's first block too (the latents' full resolution,
            16x16 at 32 px), not only at the half resolution below it.
        prediction_type: what the UNet predicts, ``"epsilon"`` (the noise) or ``"v_prediction"`` (the velocity
            ``sqrt(a) * noise - sqrt(1 - a) * x0``); saved in the scheduler config, so sampling follows it.
        snr_gamma: min-SNR loss weighting (Hang et al., 2023) with this gamma, 0 for the plain mean squared error.
        seed: every component's random stream derives from it (:mod:`nearid_world.seeding`).
    """

    image_size: int = field(default=32, metadata={"help": "pixels (the latents are half of it)"})
    num_images: int = field(
        default=24000, metadata={"help": "rendered training views (random non-held-out identity, random context)"}
    )
    held_out: int = field(
        default=48, metadata={"help": "held-out identities never rendered (the benchmark's subjects)"}
    )
    vae_steps: int = field(default=1500, metadata={"help": "autoencoder steps"})
    vae_batch_size: int = field(default=32, metadata={"help": "autoencoder batch size"})
    vae_learning_rate: float = field(default=2e-3, metadata={"help": "autoencoder learning rate"})
    unet_steps: int = field(default=6000, metadata={"help": "denoiser steps (AdamW, cosine decay to 10 %%)"})
    stop_after: int = field(
        default=0, metadata={"help": "end the denoiser stage after this many steps of its schedule (0: run it all)"}
    )
    batch_size: int = field(default=48, metadata={"help": "denoiser batch size"})
    learning_rate: float = field(default=1e-3, metadata={"help": "denoiser learning rate"})
    warmup_steps: int = field(default=100, metadata={"help": "denoiser warm-up steps"})
    ema_decay: float = field(
        default=0.995, metadata={"help": "EMA of the UNet and text encoder weights (what is saved)"}
    )
    keep_attribute: float = field(
        default=0.75, metadata={"help": "probability that a caption keeps an identity attribute"}
    )
    keep_context: float = field(default=0.85, metadata={"help": "probability that a caption keeps the context"})
    empty_caption: float = field(
        default=0.1, metadata={"help": "probability of an empty caption (classifier-free guidance)"}
    )
    unet_channels: list[int] = field(
        default_factory=lambda: [48, 96], metadata={"help": "the UNet's two block widths"}
    )
    text_width: int = field(default=64, metadata={"help": "width of the CLIP text encoder"})
    attention_at_full_resolution: bool = field(
        default=False, metadata={"help": "cross-attention also in the UNet's first block (the latents' full size)"}
    )
    prediction_type: str = field(
        default="v_prediction", metadata={"help": "what the UNet predicts: epsilon or v_prediction"}
    )
    snr_gamma: float = field(default=5.0, metadata={"help": "min-SNR loss weighting gamma (0: off)"})
    seed: int = field(default=0, metadata={"help": "everything derives from it"})

    def __post_init__(self) -> None:
        self.unet_channels = [int(c) for c in self.unet_channels]
        if len(self.unet_channels) != 2:
            raise ValueError(f"WorldModelConfig.unet_channels must be two block widths, got {self.unet_channels}")
        if self.image_size % 8:
            raise ValueError(f"WorldModelConfig.image_size must be a multiple of 8, got {self.image_size}")
        for name in ("num_images", "vae_steps", "unet_steps", "batch_size", "vae_batch_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"WorldModelConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"WorldModelConfig.prediction_type must be one of {PREDICTION_TYPES}, "
                             f"got {self.prediction_type!r}")
        if self.snr_gamma < 0:
            raise ValueError(f"WorldModelConfig.snr_gamma must be >= 0 (0: off), got {self.snr_gamma}")
        for name in ("keep_attribute", "keep_context", "empty_caption", "ema_decay"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"WorldModelConfig.{name} must be in [0, 1], got {getattr(self, name)}")


def build_world_pipeline(config: WorldModelConfig | None = None) -> Any:
    """The world's ``StableDiffusionPipeline`` with seeded random weights (:func:`pretrain_world_model` trains it).

    Each model is initialised from its own component seed (``text_encoder_init``, ``unet_init``, ``vae_init``), so
    the sizes of one never change the initial weights of another; the global torch generator is left as it was.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from nearid_reward.testing.pipelines import build_clip_tokenizer

    config = config or WorldModelConfig()
    tokenizer = build_clip_tokenizer(scenes.VOCABULARY, model_max_length=20)
    with seeded_init(config.seed, "text_encoder_init"):
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=config.text_width, intermediate_size=2 * config.text_width,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, projection_dim=config.text_width,
        ))  # fmt: skip
    c0, c1 = config.unet_channels
    full = config.attention_at_full_resolution
    first_down, last_up = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") if full else ("DownBlock2D", "UpBlock2D")
    with seeded_init(config.seed, "unet_init"):
        unet = UNet2DConditionModel(
            sample_size=config.image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(c0, c1), down_block_types=(first_down, "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", last_up), cross_attention_dim=config.text_width,
            attention_head_dim=4, norm_num_groups=16,
        )  # fmt: skip
    with seeded_init(config.seed, "vae_init"):
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            layers_per_block=1, norm_num_groups=8, sample_size=config.image_size, mid_block_add_attention=False,
        )  # fmt: skip
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              prediction_type=config.prediction_type, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class TrainingSet:
    """Rendered views: uint8 ``images`` ``[N, S, S, 3]`` with each view's identity and context name."""

    images: np.ndarray
    identities: list[scenes.Identity]
    contexts: list[str]

    def sha256(self) -> str:
        """sha256 of the pixels, identities and contexts (a resumed run checks it re-rendered the same set)."""
        digest = hashlib.sha256(np.ascontiguousarray(self.images).tobytes())
        for ident, context in zip(self.identities, self.contexts):
            digest.update(f"{ident.describe()}|{context};".encode())
        return digest.hexdigest()


def render_training_set(num_images: int, *, image_size: int = 32, held_out: int = 48, seed: int = 0,
                        progress: bool = False) -> TrainingSet:
    """Views of random non-held-out identities in random contexts, deterministic for a seed.

    View ``i`` draws its identity, context and view from child ``i`` of the ``render`` component's stream
    (:func:`nearid_world.seeding.child_seed_sequence`), so it does not depend on ``num_images``.
    """
    from tqdm.auto import tqdm

    banned = scenes.held_out_identities(held_out) if held_out else []
    images = np.empty((num_images, image_size, image_size, 3), dtype=np.uint8)
    identities, contexts = [], []
    names = list(scenes.CONTEXTS)
    for i in tqdm(range(num_images), desc="world views", disable=not progress, leave=False):
        rng = np.random.default_rng(child_seed_sequence(seed, "render", i))
        ident = scenes.sample_identity(rng, banned)
        context = names[int(rng.integers(len(names)))]
        images[i] = scenes.render_view(ident, context, rng, image_size)
        identities.append(ident)
        contexts.append(context)
    return TrainingSet(images, identities, contexts)


def caption(ident: scenes.Identity, context: str, rng: np.random.Generator, config: WorldModelConfig) -> str:
    """A training caption with attributes left out at random (``""`` with probability ``empty_caption``)."""
    if rng.random() < config.empty_caption:
        return ""
    keep = {name: bool(rng.random() < config.keep_attribute) for name in scenes.IDENTITY_ATTRIBUTES}
    text = scenes.prompt_for(ident, context if rng.random() < config.keep_context else None, keep=keep)
    if rng.random() < 0.25:  # DreamBooth users write "a photo of ..."
        text = "a photo of " + text
    return text


def _to_pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # [B, 3, S, S] in [-1, 1]


def _set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    # a pure function of the step: nothing to checkpoint (a LambdaLR would give the same values)
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class RunOptions:
    """How a pretraining run is carried out; none of it changes the weights (see :class:`WorldModelConfig`).

    Attributes:
        checkpoint_every: save the whole training state every this many steps of each stage, and at the stage
            boundary (0: never; then ``resume`` has nothing to resume from).
        resume: continue from the newest complete checkpoint in ``OUTPUT_DIR/checkpoints`` (start afresh when there
            is none).
        keep_checkpoints: keep ``OUTPUT_DIR/checkpoints`` after the run (default: removed once the model is saved,
            unless ``stop_after`` ended the denoiser stage early).
        snapshot_every: save the EMA weights so far to ``OUTPUT_DIR/snapshot`` every this many denoiser steps.
        eval_every: measure prompt following every this many denoiser steps and at the end (0: never), and once
            the autoencoder's ceiling (the oracle's reading of its reconstructions, ``5 * eval_count`` views;
            ``metrics.autoencoder_ceiling`` of the config).
        eval_count: prompts of each prompt-following measurement (96 is the documented measure).
        eval_oracle: the oracle folder that reads the samples (None: the shipped one).
        device: torch device of the training (``cpu``, ``cuda``, ``cuda:1``); random numbers are always drawn on
            the CPU, but the bytes made on a GPU are reproducible only on that GPU model and software.
    """

    checkpoint_every: int = 250
    resume: bool = False
    keep_checkpoints: bool = False
    snapshot_every: int = 0
    eval_every: int = 0
    eval_count: int = 96
    eval_oracle: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("snapshot_every", "checkpoint_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_count < 1:
            raise ValueError(f"--eval_count must be >= 1, got {self.eval_count}")
        parse_device(self.device, name="--device")


class _Run:
    """What the two stages share: the output folder, checkpoints, timers and the prompt-following curve."""

    def __init__(self, out: Path, config: WorldModelConfig, options: RunOptions, progress: bool) -> None:
        self.out, self.config, self.options, self.progress = out, config, options, progress
        self.device = torch.device(options.device)
        self.checkpoints = out / CHECKPOINTS_DIR
        self.seconds: dict[str, float] = {}  # wall-clock
        self.cpu_seconds: dict[str, float] = {}  # this process's CPU time (all threads): robust to a busy machine
        self.steps_run: dict[str, int] = {}
        self.data_sha256 = ""
        self.resume_from: Path | None = None
        self.resumed: dict[str, Any] = {}
        self.vae_metrics: dict[str, float] = {}
        self._oracle: Any = None

    # ---------------------------------------------------------------------------------------------- checkpoints
    def find_resume_point(self) -> None:
        remove_stale_temporaries(self.checkpoints)
        latest = latest_checkpoint(self.checkpoints, STAGES)
        if latest is not None and not self.options.resume:
            raise ValueError(f"{self.checkpoints} holds checkpoints of an earlier run (newest: {latest.name}): pass "
                             "--resume to continue it, or remove that folder to start afresh")
        if latest is None:
            if self.options.resume:
                logger.info("--resume: no complete checkpoint in %s, starting afresh", self.checkpoints)
            return
        scalars = read_scalars(latest)
        here = dataclasses.asdict(self.config)
        there = scalars.get("config", {})
        differ = sorted(k for k in set(here) | set(there) if k != "stop_after" and here.get(k) != there.get(k))
        if differ:
            details = ", ".join(f"{k} {there.get(k)!r} there, {here.get(k)!r} here" for k in differ)
            raise ValueError(f"--resume: checkpoint {latest} was made with other settings ({details}); rerun with "
                             f"the same flags, or remove {self.checkpoints} to start afresh")
        for key, now in (("device", str(self.device)), ("threads", torch.get_num_threads()),
                         ("torch", torch.__version__)):
            if scalars.get(key) != now:
                logger.warning("--resume: checkpoint %s was made with %s %s, this run has %s: the final bytes may "
                               "differ from an uninterrupted run", latest.name, key, scalars.get(key), now)
        self.resume_from = latest
        self.resumed = scalars
        self.seconds = {k: float(v) for k, v in scalars["seconds"].items()}
        self.cpu_seconds = {k: float(v) for k, v in scalars["cpu_seconds"].items()}
        self.steps_run = {k: int(v) for k, v in scalars["steps_run"].items()}
        logger.info("resuming from %s", latest)

    @property
    def resume_stage(self) -> str | None:
        return self.resumed.get("stage")

    @property
    def resume_step(self) -> int:
        return int(self.resumed.get("step", 0))

    def checkpoint_due(self, done: int, end: int) -> bool:
        every = self.options.checkpoint_every
        return bool(every) and (done % every == 0 or done == end)

    def save_checkpoint(self, stage: str, step: int, scalars: dict[str, Any], **state: Any) -> None:
        if not self.options.checkpoint_every:
            return
        with self.timed("checkpoints"):
            self._save_checkpoint(stage, step, scalars, **state)

    def _save_checkpoint(self, stage: str, step: int, scalars: dict[str, Any], **state: Any) -> None:
        common = {"stage": stage, "step": step, "config": dataclasses.asdict(self.config),
                  "data_sha256": self.data_sha256, "seconds": self.seconds, "cpu_seconds": self.cpu_seconds,
                  "steps_run": self.steps_run,
                  "device": str(self.device), "threads": torch.get_num_threads(), "torch": torch.__version__}
        folder = save_training_state(self.checkpoints / checkpoint_name(stage, step), scalars=common | scalars,
                                     **state)
        for older in list_checkpoints(self.checkpoints, STAGES):
            if older != folder:
                shutil.rmtree(older, ignore_errors=True)

    def remove_checkpoints(self) -> None:
        if self.checkpoints.exists() and not self.options.keep_checkpoints:
            # renamed first: a kill while deleting leaves a stale temporary, never a half-deleted checkpoint
            aside = temporary_path(self.checkpoints)
            os.replace(self.checkpoints, aside)
            shutil.rmtree(aside, ignore_errors=True)

    # ---------------------------------------------------------------------------------------------- timing
    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu_started

    def step_done(self, stage: str) -> None:
        self.steps_run[stage] = self.steps_run.get(stage, 0) + 1

    # ---------------------------------------------------------------------------------------------- curve
    @property
    def curve(self) -> Path:
        return self.out / CURVE_NAME

    def reset_curve(self, keep_until: int) -> None:
        """Keep the rows of steps <= ``keep_until`` (those the resumed checkpoint had measured)."""
        if not self.curve.exists():
            return
        rows = [r for r in read_jsonl(self.curve) if int(r.get("step", -1)) <= keep_until]
        if rows:  # the same bytes as append_jsonl wrote
            write_text_atomic(self.curve, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        else:
            self.curve.unlink()

    def eval_due(self, done: int, end: int) -> bool:
        every = self.options.eval_every
        return bool(every) and (done % every == 0 or done == end)

    def measure(self, pipe: Any, ema_unet: torch.nn.Module, ema_text: torch.nn.Module, step: int) -> None:
        """Append the prompt following of the weights as they would be saved now (EMA, float16-rounded)."""
        from .evaluate import prompt_following

        with self.timed("eval"), _forked_rng(self.device):
            self._load_oracle()
            shipped = copy.copy(pipe)
            shipped.register_modules(unet=_float16_rounded(ema_unet), vae=_float16_rounded(pipe.vae),
                                     text_encoder=ema_text)
            rates = prompt_following(shipped, self._oracle, count=self.options.eval_count)
            append_jsonl(self.curve, {"step": step, "count": self.options.eval_count,
                                      **{k: round(v, 6) for k, v in rates.items()}})
        logger.info("world denoiser step %d: prompt following %s", step, rates)

    def measure_autoencoder(self, vae: Any) -> dict[str, float]:
        """What the oracle reads in the saved (float16-rounded) autoencoder's reconstructions: the curve's ceiling."""
        from .evaluate import autoencoder_ceiling

        with self.timed("eval"), _forked_rng(self.device):
            self._load_oracle()
            rates = autoencoder_ceiling(_float16_rounded(vae), self._oracle, count=5 * self.options.eval_count,
                                        image_size=self.config.image_size)
        logger.info("world autoencoder: the oracle reads in its reconstructions %s", rates)
        return {k: round(v, 6) for k, v in rates.items()}

    def _load_oracle(self) -> None:
        from .evaluate import WorldAssets
        from .oracle import AttributeOracle

        if self._oracle is None:  # building the oracle draws from the global generator: callers fork it
            self._oracle = AttributeOracle.from_pretrained(self.options.eval_oracle or WorldAssets().oracle).eval()


def _float16_rounded(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).to(torch.float16).to(torch.float32).eval()


@contextmanager
def _forked_rng(device: torch.device) -> Iterator[None]:
    """Whatever the block draws from the global generators is undone afterwards."""
    devices = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


@contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """On a GPU, deterministic kernels for the block (an op that has none warns): otherwise two runs on the same GPU
    could differ in the last bits (atomic adds, autotuned convolution algorithms). The CPU needs nothing."""
    if device.type != "cuda":
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any CUDA matmul
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2], before[3]


def _train_vae(vae: Any, data: TrainingSet, config: WorldModelConfig, run: _Run) -> dict[str, float]:
    from tqdm.auto import tqdm

    device, total = run.device, config.vae_steps
    generators = {"vae_data": torch_generator(config.seed, "vae_data"),
                  "vae_noise": torch_generator(config.seed, "vae_noise")}
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0.0)
    start, loss_ema = 0, None
    if run.resume_stage == "autoencoder":
        scalars = load_training_state(run.resume_from, modules={"vae": vae}, optimizers={"vae": optimizer},
                                      torch_generators=generators)
        start, loss_ema = int(scalars["step"]), scalars["loss_ema"]
    vae.train()
    for step in tqdm(range(start, total), desc="world autoencoder", disable=not run.progress, leave=False,
                     initial=start, total=total):
        with run.timed("autoencoder"):
            _set_learning_rate(optimizer, config.vae_learning_rate * warmup_cosine(step, total, 50, floor=0.1))
            idx = torch.randint(len(data.images), (config.vae_batch_size,), generator=generators["vae_data"])
            x = _to_pixels(data.images[idx.numpy()]).to(device)
            posterior = vae.encode(x).latent_dist
            eps = torch.randn(posterior.mean.shape, generator=generators["vae_noise"]).to(device)
            recon = vae.decode(posterior.mean + posterior.std * eps).sample
            rec = (recon - x).abs().mean()
            loss = rec + 1e-6 * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            rec_value = float(rec.detach())
            loss_ema = rec_value if loss_ema is None else 0.95 * loss_ema + 0.05 * rec_value
            run.step_done("autoencoder")
        if step % 100 == 0:
            logger.info("world autoencoder step %d/%d: L1 %.4f", step, total, loss_ema)
        done = step + 1
        if done < total and run.checkpoint_due(done, total):  # the last step's state is the stage boundary's
            run.save_checkpoint("autoencoder", done, {"loss_ema": loss_ema}, modules={"vae": vae},
                                optimizers={"vae": optimizer}, torch_generators=generators)
    vae.eval()
    with torch.no_grad():
        x = _to_pixels(data.images[:256]).to(device)
        latents = vae.encode(x).latent_dist.mean
        recon = vae.decode(latents).sample
        std = float(latents.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return {"vae_l1_train_ema": round(loss_ema or 0.0, 5),
            "vae_l1_first256": round(float((recon - x).abs().mean()), 5), "latent_std": round(std, 5)}


@torch.no_grad()
def _encode_all(vae: Any, images: np.ndarray, device: torch.device,
                batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(_to_pixels(images[i:i + batch]).to(device)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)  # [N, 4, S/2, S/2] each


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


def _save(pipe: Any, out: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> None:
    """Save ``pipe`` with the given denoiser weights; the UNet and autoencoder in float16 (they load as float32)."""
    saved = copy.copy(pipe)
    cpu = torch.device("cpu")
    saved.register_modules(unet=copy.deepcopy(unet).to(cpu, torch.float16),
                           vae=copy.deepcopy(pipe.vae).to(cpu, torch.float16),
                           text_encoder=copy.deepcopy(text_encoder).to(cpu))
    out.mkdir(parents=True, exist_ok=True)
    saved.save_pretrained(str(out), safe_serialization=True)


def denoising_loss(prediction: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor,
                   config: WorldModelConfig) -> torch.Tensor:
    """The denoiser's loss for one batch, a scalar.

    Args:
        prediction: the UNet's output, ``[B, C, H, W]``.
        latents: the clean latents ``x0``, ``[B, C, H, W]``.
        noise: the noise added to them, ``[B, C, H, W]``.
        alpha_bar: the cumulative alpha of each sample's timestep, ``[B, 1, 1, 1]`` in (0, 1).
        config: ``prediction_type`` picks the target (the noise, or the velocity
            ``sqrt(a) * noise - sqrt(1 - a) * x0``); ``snr_gamma`` > 0 weights each sample's squared error by
            ``min(SNR, gamma) / SNR`` (epsilon) or ``min(SNR, gamma) / (SNR + 1)`` (velocity), ``SNR = a / (1 - a)``,
            the min-SNR weighting expressed for each target.
    """
    if config.prediction_type == "v_prediction":
        target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    else:
        target = noise
    if not config.snr_gamma:
        return F.mse_loss(prediction, target)
    snr = (alpha_bar / (1 - alpha_bar)).flatten()  # [B]
    clipped = snr.clamp(max=config.snr_gamma)
    weight = clipped / (snr + 1) if config.prediction_type == "v_prediction" else clipped / snr
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))  # [B]
    return (weight * per_sample).mean()


def _train_denoiser(pipe: Any, data: TrainingSet, config: WorldModelConfig, run: _Run) -> dict[str, float]:
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    device = run.device
    unet, text_encoder, tokenizer, vae = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas = noise_scheduler.alphas_cumprod  # [T] on the CPU
    with run.timed("encode_latents"):
        means, stds = _encode_all(vae, data.images, device)
    scale = float(vae.config.scaling_factor)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    for m in (ema_unet, ema_text):
        m.requires_grad_(False)
    generators = {name: torch_generator(config.seed, name)
                  for name in ("denoiser_data", "denoiser_noise", "denoiser_timesteps")}
    captions_rng = numpy_generator(config.seed, "caption")
    modules = {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text_encoder": ema_text}
    state = {"modules": modules, "optimizers": {"denoiser": optimizer}, "torch_generators": generators,
             "numpy_generators": {"caption": captions_rng}}
    start, loss_ema = 0, None
    if run.resume_stage == "denoiser" and run.resume_step > 0:
        scalars = load_training_state(run.resume_from, **state)
        start, loss_ema = int(scalars["step"]), scalars["loss_ema"]
    total = config.unet_steps
    end = min(total, config.stop_after) if config.stop_after else total
    unet.train()
    text_encoder.train()
    for step in tqdm(range(start, end), desc="world denoiser", disable=not run.progress, leave=False,
                     initial=start, total=end):
        with run.timed("denoiser"):
            factor = warmup_cosine(step, total, config.warmup_steps, floor=0.1)
            _set_learning_rate(optimizer, config.learning_rate * factor)
            idx = torch.randint(len(data.images), (config.batch_size,), generator=generators["denoiser_data"])
            posterior_eps = torch.randn((config.batch_size, *means.shape[1:]), generator=generators["denoiser_noise"])
            latents = (means[idx] + stds[idx] * posterior_eps.to(device)) * scale  # [B, 4, S/2, S/2]
            captions = [caption(data.identities[i], data.contexts[i], captions_rng, config) for i in idx.tolist()]
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            noise = torch.randn(latents.shape, generator=generators["denoiser_noise"]).to(device)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (config.batch_size,),
                              generator=generators["denoiser_timesteps"])
            a = alphas[t].view(-1, 1, 1, 1).to(device)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            hidden = text_encoder(ids)[0]  # [B, L, D]
            loss = denoising_loss(unet(noisy, t.to(device), hidden).sample, latents, noise, a, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            _ema_update(ema_unet, unet, decay)
            _ema_update(ema_text, text_encoder, decay)
            loss_value = float(loss.detach())
            loss_ema = loss_value if loss_ema is None else 0.98 * loss_ema + 0.02 * loss_value
            run.step_done("denoiser")
        if step % 200 == 0:
            logger.info("world denoiser step %d/%d: loss %.4f", step, total, loss_ema)
        done = step + 1
        every = run.options.snapshot_every
        if every and done % every == 0:
            _save(pipe, run.out / SNAPSHOT_DIR, ema_unet, ema_text)
            write_json_atomic(run.out / SNAPSHOT_DIR / "snapshot.json", {"step": done, "loss_ema": loss_ema})
        if run.eval_due(done, end):  # measured before the checkpoint: a resumed run never misses a row
            run.measure(pipe, ema_unet, ema_text, done)
        if run.checkpoint_due(done, end):
            run.save_checkpoint("denoiser", done, {"loss_ema": loss_ema, **_vae_scalars(vae, run)},
                                modules={"vae": vae, **modules}, **{k: v for k, v in state.items() if k != "modules"})
    pipe.unet, pipe.text_encoder = ema_unet, ema_text
    return {"denoiser_loss_ema": round(loss_ema or 0.0, 5)}


def _vae_scalars(vae: Any, run: _Run) -> dict[str, Any]:
    return {"scaling_factor": float(vae.config.scaling_factor), "vae_metrics": run.vae_metrics}


def pretrain_world_model(output_dir: str | Path, config: WorldModelConfig | None = None, *,
                         options: RunOptions | None = None, progress: bool = False,
                         command: str | None = None) -> Path:
    """Render the training views, train the autoencoder then the denoiser, and save the pipeline (safetensors).

    Args:
        output_dir: destination; receives the pipeline folders, ``world_model_config.json`` (the settings, the
            command, versions, thread count, final losses, seconds per stage and per step, initial-weight hashes,
            the sha256 of every other file written) and, with ``options.eval_every``, ``prompt_following.jsonl``.
        config: what is trained (default :class:`WorldModelConfig`).
        options: how the run is carried out: checkpoints, resume, measurements, device (default
            :class:`RunOptions`).
        progress: tqdm progress bars.
        command: the command line recorded in the config (None: not recorded).

    Returns:
        ``output_dir``, loadable with ``StableDiffusionPipeline.from_pretrained``.

    Raises:
        ValueError: checkpoints of an earlier run are present without ``options.resume``, or ``options.resume``
            finds a checkpoint made with other settings or from other rendered views.
    """
    config = config or WorldModelConfig()
    options = options or RunOptions()
    with _deterministic(torch.device(options.device)):
        return _pretrain(Path(output_dir), config, options, progress, command)


def _pretrain(out: Path, config: WorldModelConfig, options: RunOptions, progress: bool, command: str | None) -> Path:
    run = _Run(out, config, options, progress)
    run.find_resume_point()
    remove_stale_temporaries(out)
    run.reset_curve(run.resume_step if run.resume_stage == "denoiser" else 0)
    started = time.perf_counter()
    run.seconds.pop("render", None)  # a resumed run renders again: its own time counts
    run.cpu_seconds.pop("render", None)
    with run.timed("render"):
        data = render_training_set(config.num_images, image_size=config.image_size, held_out=config.held_out,
                                   seed=config.seed, progress=progress)
    run.data_sha256 = data.sha256()
    if run.resume_from is not None and run.resumed.get("data_sha256") != run.data_sha256:
        raise ValueError(f"--resume: the rendered training views differ from those checkpoint {run.resume_from} "
                         f"was trained on (sha256 {run.data_sha256[:12]} here, "
                         f"{str(run.resumed.get('data_sha256'))[:12]} there): the renderer changed; start afresh")
    pipe = build_world_pipeline(config)
    init_sha256 = {name: module_sha256(getattr(pipe, name)) for name in ("vae", "text_encoder", "unet")}
    for name in ("vae", "text_encoder", "unet"):
        getattr(pipe, name).to(run.device)
    if run.resume_stage == "denoiser":
        load_training_state(run.resume_from, modules={"vae": pipe.vae})
        pipe.vae.register_to_config(scaling_factor=float(run.resumed["scaling_factor"]))
        pipe.vae.eval()
        run.vae_metrics = dict(run.resumed["vae_metrics"])
    else:
        run.vae_metrics = _train_vae(pipe.vae, data, config, run)
        run.save_checkpoint("denoiser", 0, {"loss_ema": None, **_vae_scalars(pipe.vae, run)},
                            modules={"vae": pipe.vae})
    pipe.vae.requires_grad_(False)
    ceiling = {"autoencoder_ceiling": run.measure_autoencoder(pipe.vae)} if options.eval_every else {}
    metrics = run.vae_metrics | ceiling | _train_denoiser(pipe, data, config, run)
    _save(pipe, out, pipe.unet, pipe.text_encoder)
    hashes = output_sha256(out, exclude=(CONFIG_NAME, CHECKPOINTS_DIR, SNAPSHOT_DIR))
    per_step = {stage: round(run.seconds.get(stage, 0.0) / run.steps_run[stage], 4)
                for stage in STAGES if run.steps_run.get(stage)}
    cpu_per_step = {stage: round(run.cpu_seconds.get(stage, 0.0) / run.steps_run[stage], 4)
                    for stage in STAGES if run.steps_run.get(stage)}
    info = {
        "config": dataclasses.asdict(config), "seed": config.seed, "command": command, "seeding": SEEDING,
        "seeding_components": list(COMPONENTS), "device": str(run.device), "threads": torch.get_num_threads(),
        "versions": _versions(run.device), "torch": torch.__version__, "metrics": metrics,
        "seconds": {k: round(v, 1) for k, v in sorted(run.seconds.items())}, "seconds_per_step": per_step,
        "cpu_seconds": {k: round(v, 1) for k, v in sorted(run.cpu_seconds.items())},
        "cpu_seconds_per_step": cpu_per_step,
        "init_sha256": init_sha256, "sha256": hashes,
        "resumed_from": run.resume_from.name if run.resume_from is not None else None,
    }
    write_json_atomic(out / CONFIG_NAME, info)
    if not config.stop_after or config.stop_after >= config.unet_steps:
        run.remove_checkpoints()  # a run ended early by --stop_after keeps them, to be continued with --resume
    logger.info("world model written to %s in %.0f s: %s", out, time.perf_counter() - started, metrics)
    return out


def _versions(device: torch.device) -> dict[str, str]:
    import diffusers
    import transformers

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
                "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    if device.type == "cuda":  # GPU bytes are reproducible on this device and software only
        versions |= {"gpu": torch.cuda.get_device_name(device), "cuda": str(torch.version.cuda),
                     "cudnn": str(torch.backends.cudnn.version())}
    return versions


@dataclass
class MakeWorldArguments:
    """The options of ``nearid-make-world`` besides the :class:`WorldModelConfig` fields (see :class:`RunOptions`)."""

    output_dir: str = field(metadata={"help": "where the StableDiffusionPipeline folder is written"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (None: torch's choice)"})
    snapshot_every: int = field(
        default=0, metadata={"help": "save the EMA weights so far to OUTPUT_DIR/snapshot every N denoiser steps"}
    )
    checkpoint_every: int = field(
        default=250, metadata={"help": "save the whole training state to OUTPUT_DIR/checkpoints every N steps of "
                                       "each stage and at the stage boundary (0: never)"}
    )
    resume: bool = field(
        default=False, metadata={"help": "continue from the newest complete checkpoint in OUTPUT_DIR/checkpoints"}
    )
    keep_checkpoints: bool = field(
        default=False, metadata={"help": "keep OUTPUT_DIR/checkpoints once the model is saved"}
    )
    eval_every: int = field(
        default=0, metadata={"help": "measure prompt following every N denoiser steps and at the end, appended to "
                                     "OUTPUT_DIR/prompt_following.jsonl, and once what the oracle reads in the "
                                     "autoencoder's reconstructions (0: never)"}
    )
    eval_count: int = field(default=96, metadata={"help": "prompts per prompt-following measurement"})
    eval_oracle: str | None = field(
        default=None, metadata={"help": "oracle folder that reads the samples (None: the shipped one)"}
    )
    device: str = field(
        default="cpu", metadata={"help": "torch device of the training; bytes made on a GPU are reproducible "
                                         "only on that GPU"}
    )

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        self.run_options()  # checks the values

    def run_options(self) -> RunOptions:
        return RunOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RunOptions)})


def parse_args(argv: Sequence[str] | None = None) -> tuple[MakeWorldArguments, WorldModelConfig]:
    """The command's own options and the :class:`WorldModelConfig` that ``argv`` gives ``nearid-make-world``."""
    args, config = parse_arguments([MakeWorldArguments, WorldModelConfig], argv, prog="nearid-make-world",
                                   description=__doc__.split("\n\n")[0])
    return args, config


@entry_point("nearid-make-world")
def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    args, config = parse_args(words)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = pretrain_world_model(args.output_dir, config, options=args.run_options(), progress=True,
                               command=shlex.join(["nearid-make-world", *words]))
    print(json.dumps(json.loads((out / CONFIG_NAME).read_text()), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
