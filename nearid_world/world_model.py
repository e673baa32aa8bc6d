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
subjects are new to the model. Everything derives from the seed, so a rerun of the same command reproduces the same
weights on the same software (CPU float32). The output folder loads with ``StableDiffusionPipeline.from_pretrained``
and can be passed as ``--pretrained_model_name_or_path`` to DreamBooth scripts.

Command that made the shipped model (``nearid_world/weights/world_model``)::

    python -m nearid_world.world_model --output_dir nearid_world/weights/world_model --seed 0
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nearid_reward.cli.arguments import parse_arguments
from nearid_reward.cli.entry_points import entry_point
from nearid_reward.files import write_json_atomic

from . import scenes

logger = logging.getLogger(__name__)

__all__ = [
    "WorldModelConfig", "MakeWorldArguments", "build_world_pipeline", "render_training_set", "caption",
    "pretrain_world_model", "parse_args", "main",
]

CONFIG_NAME = "world_model_config.json"


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
        seed: everything derives from it.
    """

    image_size: int = field(default=32, metadata={"help": "pixels (the latents are half of it)"})
    num_images: int = field(
        default=24000, metadata={"help": "rendered training views (random non-held-out identity, random context)"}
    )
    held_out: int = field(
        default=48, metadata={"help": "held-out identities never rendered (the benchmark's subjects)"}
    )
    vae_steps: int = field(default=500, metadata={"help": "autoencoder steps"})
    vae_batch_size: int = field(default=32, metadata={"help": "autoencoder batch size"})
    vae_learning_rate: float = field(default=2e-3, metadata={"help": "autoencoder learning rate"})
    unet_steps: int = field(default=2500, metadata={"help": "denoiser steps (AdamW, cosine decay to 10 %%)"})
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
        for name in ("keep_attribute", "keep_context", "empty_caption", "ema_decay"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"WorldModelConfig.{name} must be in [0, 1], got {getattr(self, name)}")


def build_world_pipeline(config: WorldModelConfig | None = None) -> Any:
    """The world's ``StableDiffusionPipeline`` with seeded random weights (:func:`pretrain_world_model` trains it)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from nearid_reward.testing.pipelines import build_clip_tokenizer

    config = config or WorldModelConfig()
    tokenizer = build_clip_tokenizer(scenes.VOCABULARY, model_max_length=20)
    torch.manual_seed(config.seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_width, intermediate_size=2 * config.text_width,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        projection_dim=config.text_width,
    ))  # fmt: skip
    c0, c1 = config.unet_channels
    unet = UNet2DConditionModel(
        sample_size=config.image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(c0, c1), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=config.text_width,
        attention_head_dim=4, norm_num_groups=16,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
        norm_num_groups=8, sample_size=config.image_size, mid_block_add_attention=False,
    )  # fmt: skip
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              prediction_type="epsilon", steps_offset=1, set_alpha_to_one=False)
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


def render_training_set(num_images: int, *, image_size: int = 32, held_out: int = 48, seed: int = 0,
                        progress: bool = False) -> TrainingSet:
    """Views of random non-held-out identities in random contexts (deterministic for a seed)."""
    from tqdm.auto import tqdm

    banned = scenes.held_out_identities(held_out) if held_out else []
    images = np.empty((num_images, image_size, image_size, 3), dtype=np.uint8)
    identities, contexts = [], []
    names = list(scenes.CONTEXTS)
    for i in tqdm(range(num_images), desc="world views", disable=not progress, leave=False):
        rng = np.random.default_rng([seed, 7001, i])
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


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _train_vae(vae: Any, data: TrainingSet, config: WorldModelConfig, progress: bool) -> dict[str, float]:
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(config.seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, config.vae_steps, 50))
    vae.train()
    loss_ema = None
    for step in tqdm(range(config.vae_steps), desc="world autoencoder", disable=not progress, leave=False):
        idx = torch.randint(len(data.images), (config.vae_batch_size,), generator=generator).numpy()
        x = _to_pixels(data.images[idx])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        rec = (recon - x).abs().mean()
        loss = rec + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_ema = float(rec) if loss_ema is None else 0.95 * loss_ema + 0.05 * float(rec)
        if step % 100 == 0:
            logger.info("world autoencoder step %d/%d: L1 %.4f", step, config.vae_steps, loss_ema)
    vae.eval()
    with torch.no_grad():
        x = _to_pixels(data.images[:256])
        latents = vae.encode(x).latent_dist.mean
        recon = vae.decode(latents).sample
        std = float(latents.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return {"vae_l1_train_ema": round(loss_ema or 0.0, 5),
            "vae_l1_first256": round(float((recon - x).abs().mean()), 5), "latent_std": round(std, 5)}


@torch.no_grad()
def _encode_all(vae: Any, images: np.ndarray, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(_to_pixels(images[i:i + batch])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


def _save(pipe: Any, out: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> None:
    """Save ``pipe`` with the given denoiser weights; the UNet and autoencoder in float16 (they load as float32)."""
    saved = copy.copy(pipe)
    saved.register_modules(unet=copy.deepcopy(unet).to(torch.float16), vae=copy.deepcopy(pipe.vae).to(torch.float16),
                           text_encoder=text_encoder)
    out.mkdir(parents=True, exist_ok=True)
    saved.save_pretrained(str(out), safe_serialization=True)


def _train_denoiser(pipe: Any, data: TrainingSet, config: WorldModelConfig, progress: bool,
                    snapshot_dir: Path | None = None, snapshot_every: int = 0) -> dict[str, float]:
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    unet, text_encoder, tokenizer, vae = pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.vae
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas = noise_scheduler.alphas_cumprod
    means, stds = _encode_all(vae, data.images)
    scale = float(vae.config.scaling_factor)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _cosine(s, config.unet_steps, config.warmup_steps))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    for m in (ema_unet, ema_text):
        m.requires_grad_(False)
    generator = torch.Generator().manual_seed(config.seed + 2)
    rng = np.random.default_rng([config.seed, 7002])
    unet.train()
    text_encoder.train()
    loss_ema = None
    for step in tqdm(range(config.unet_steps), desc="world denoiser", disable=not progress, leave=False):
        idx = torch.randint(len(data.images), (config.batch_size,), generator=generator)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=generator)) * scale
        captions = [caption(data.identities[i], data.contexts[i], rng, config) for i in idx.tolist()]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        hidden = text_encoder(ids)[0]  # [B, L, D]
        loss = F.mse_loss(unet(noisy, t, hidden).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        _ema_update(ema_unet, unet, decay)
        _ema_update(ema_text, text_encoder, decay)
        loss_ema = float(loss) if loss_ema is None else 0.98 * loss_ema + 0.02 * float(loss)
        if step % 200 == 0:
            logger.info("world denoiser step %d/%d: loss %.4f", step, config.unet_steps, loss_ema)
        if snapshot_dir is not None and snapshot_every and (step + 1) % snapshot_every == 0:
            _save(pipe, snapshot_dir, ema_unet, ema_text)
            write_json_atomic(snapshot_dir / "snapshot.json", {"step": step + 1, "loss_ema": loss_ema})
        if config.stop_after and step + 1 >= config.stop_after:
            break
    pipe.unet, pipe.text_encoder = ema_unet, ema_text
    return {"denoiser_loss_ema": round(loss_ema or 0.0, 5)}


def pretrain_world_model(output_dir: str | Path, config: WorldModelConfig | None = None, *,
                         progress: bool = False, snapshot_every: int = 0) -> Path:
    """Render the training views, train the autoencoder then the denoiser, and save the pipeline (safetensors).

    Args:
        output_dir: destination; receives the pipeline folders and ``world_model_config.json`` (the settings, the
            final losses and the seconds each stage took).
        config: settings (default :class:`WorldModelConfig`).
        progress: tqdm progress bars.
        snapshot_every: also save the EMA weights so far to ``output_dir/snapshot`` every this many denoiser steps
            (0: never), to look at samples while it trains.

    Returns:
        ``output_dir``, loadable with ``StableDiffusionPipeline.from_pretrained``.
    """
    config = config or WorldModelConfig()
    out = Path(output_dir)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    data = render_training_set(config.num_images, image_size=config.image_size, held_out=config.held_out,
                               seed=config.seed, progress=progress)
    seconds = {"render": time.perf_counter() - started}
    pipe = build_world_pipeline(config)
    t = time.perf_counter()
    stage = out / "autoencoder_stage"
    stamp = {"config": {k: v for k, v in dataclasses.asdict(config).items() if k.startswith(("vae_", "num_images",
                                                                                              "image_size", "held"))},
             "seed": config.seed}
    if (stage / "stage.json").is_file() and json.loads((stage / "stage.json").read_text())["stamp"] == stamp:
        from diffusers import AutoencoderKL

        pipe.register_modules(vae=AutoencoderKL.from_pretrained(str(stage), use_safetensors=True).eval())
        metrics = json.loads((stage / "stage.json").read_text())["metrics"]
        logger.info("reusing the trained autoencoder in %s", stage)
    else:
        metrics = _train_vae(pipe.vae, data, config, progress)
        pipe.vae.save_pretrained(str(stage), safe_serialization=True)
        write_json_atomic(stage / "stage.json", {"stamp": stamp, "metrics": metrics})
    seconds["autoencoder"] = time.perf_counter() - t
    t = time.perf_counter()
    metrics |= _train_denoiser(pipe, data, config, progress, out / "snapshot", snapshot_every)
    seconds["denoiser"] = time.perf_counter() - t
    _save(pipe, out, pipe.unet, pipe.text_encoder)
    info = {"config": dataclasses.asdict(config), "metrics": metrics,
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    write_json_atomic(out / CONFIG_NAME, info)
    logger.info("world model written to %s in %.0f s: %s", out, time.perf_counter() - started, metrics)
    return out


@dataclass
class MakeWorldArguments:
    """The options of ``nearid-make-world`` besides the :class:`WorldModelConfig` fields."""

    output_dir: str = field(metadata={"help": "where the StableDiffusionPipeline folder is written"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (None: torch's choice)"})
    snapshot_every: int = field(
        default=0, metadata={"help": "save the EMA weights so far to OUTPUT_DIR/snapshot every N denoiser steps"}
    )

    def __post_init__(self) -> None:
        if self.snapshot_every < 0:
            raise ValueError(f"--snapshot_every must be >= 0, got {self.snapshot_every}")


def parse_args(argv: Sequence[str] | None = None) -> tuple[MakeWorldArguments, WorldModelConfig]:
    """The command's own options and the :class:`WorldModelConfig` that ``argv`` gives ``nearid-make-world``."""
    args, config = parse_arguments([MakeWorldArguments, WorldModelConfig], argv, prog="nearid-make-world",
                                   description=__doc__.split("\n\n")[0])
    return args, config


@entry_point("nearid-make-world")
def main(argv: Sequence[str] | None = None) -> int:
    args, config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = pretrain_world_model(args.output_dir, config, progress=True, snapshot_every=args.snapshot_every)
    print(json.dumps(json.loads((out / CONFIG_NAME).read_text()), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
