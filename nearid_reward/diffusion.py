"""Differentiable sampling pieces for reward fine-tuning (DRaFT-K / AlignProp-style truncated backpropagation).

* :func:`ddim_sample`: a DDIM loop over a diffusers UNet in which only the last ``grad_steps`` denoising steps
  carry gradients (earlier steps run under ``torch.no_grad``), optionally with classifier-free guidance and
  per-step gradient checkpointing;
* :func:`decode_latents`: VAE decode to images in [0, 1] (differentiable);
* :func:`encode_prompts`, :func:`initial_latents` and :func:`sample_images`: the same for a whole SD-style
  pipeline, so ``reward(sample_images(pipe, prompts)).mean().backward()`` reaches the LoRA weights.

diffusers is imported lazily (only :func:`sample_images` needs its ``DDIMScheduler``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

__all__ = [
    "SamplerConfig",
    "ddim_sample",
    "decode_latents",
    "encode_prompts",
    "initial_latents",
    "predict_x0",
    "sample_images",
]


@dataclass
class SamplerConfig:
    """Options of the differentiable sampler.

    Attributes:
        num_inference_steps: DDIM steps.
        grad_steps: how many of the *last* steps carry gradients (K of DRaFT-K; 0 = none, all = full backprop).
        guidance_scale: classifier-free guidance scale; 1.0 disables guidance (one UNet call per step).
        eta: DDIM eta (0 = deterministic).
        gradient_checkpointing: recompute each grad-carrying UNet call in the backward pass.
    """

    num_inference_steps: int = 20
    grad_steps: int = 1
    guidance_scale: float = 1.0
    eta: float = 0.0
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if int(self.num_inference_steps) < 1:
            raise ValueError(f"SamplerConfig.num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if not 0 <= int(self.grad_steps) <= int(self.num_inference_steps):
            raise ValueError(
                f"SamplerConfig.grad_steps must be in [0, num_inference_steps={self.num_inference_steps}], "
                f"got {self.grad_steps}"
            )
        if self.guidance_scale < 1.0:
            raise ValueError(
                f"SamplerConfig.guidance_scale must be >= 1.0 (1.0 disables guidance), got {self.guidance_scale}"
            )
        if self.eta < 0:
            raise ValueError(f"SamplerConfig.eta must be >= 0, got {self.eta}")


def _unet_call(unet: torch.nn.Module, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
               kwargs: dict[str, Any]) -> torch.Tensor:
    return unet(latents, t, encoder_hidden_states=embeds, return_dict=False, **kwargs)[0]


def ddim_sample(
    unet: torch.nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    config: SamplerConfig | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    unet_kwargs: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run the reverse process from ``latents``; the last ``config.grad_steps`` steps are differentiable.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (or any module with its call signature).
        scheduler: a scheduler with ``set_timesteps``/``step``/``scale_model_input`` (DDIM); it is copied with
            ``from_config`` first, so the pipeline's own scheduler state is never changed.
        latents: ``[B, C, h, w]`` initial noise (already scaled by ``init_noise_sigma``).
        prompt_embeds: ``[B, L, D]`` text conditioning.
        config: steps, K, guidance, eta, checkpointing.
        negative_prompt_embeds: ``[B, L, D]`` unconditional embeddings (needed when ``guidance_scale > 1``).
        unet_kwargs: extra UNet arguments (e.g. ``added_cond_kwargs`` for SDXL), for the whole (guided) batch.
        generator: noise generator for ``eta > 0``.

    Returns:
        ``[B, C, h, w]`` final latents; they carry gradients when ``grad_steps > 0``.
    """
    cfg = config or SamplerConfig()
    guided = cfg.guidance_scale > 1.0
    if guided and negative_prompt_embeds is None:
        raise ValueError("guidance_scale > 1 needs `negative_prompt_embeds` (embeddings of the empty/negative prompt)")
    if prompt_embeds.shape[0] != latents.shape[0]:
        raise ValueError(
            f"`prompt_embeds` has batch {prompt_embeds.shape[0]} but `latents` has batch {latents.shape[0]}"
        )
    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(cfg.num_inference_steps, device=latents.device)
    timesteps = sched.timesteps
    first_grad = len(timesteps) - int(cfg.grad_steps)
    embeds = torch.cat([negative_prompt_embeds, prompt_embeds]) if guided else prompt_embeds  # [B or 2B, L, D]
    kwargs = dict(unet_kwargs or {})
    step_kwargs: dict[str, Any] = {"eta": cfg.eta}
    if cfg.eta > 0:
        step_kwargs["generator"] = generator
    x = latents
    for i, t in enumerate(timesteps):
        with torch.set_grad_enabled(i >= first_grad and torch.is_grad_enabled()):
            model_in = torch.cat([x, x]) if guided else x
            model_in = sched.scale_model_input(model_in, t)
            if cfg.gradient_checkpointing and torch.is_grad_enabled():
                noise = checkpoint(_unet_call, unet, model_in, t, embeds, kwargs, use_reentrant=False)
            else:
                noise = _unet_call(unet, model_in, t, embeds, kwargs)
            if guided:
                uncond, cond = noise.chunk(2)
                noise = uncond + cfg.guidance_scale * (cond - uncond)
            x = sched.step(noise, t, x, return_dict=False, **step_kwargs)[0]
    return x


def predict_x0(
    model_output: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor, scheduler: Any
) -> torch.Tensor:
    """One-step estimate of the clean latents from a denoiser prediction (the ReFL / x0 trick), differentiable.

    Args:
        model_output: ``[B, C, h, w]`` the denoiser's prediction at ``noisy``.
        noisy: ``[B, C, h, w]`` the noisy latents x_t.
        timesteps: ``[B]`` training timesteps (0..num_train_timesteps-1 for DDPM-family schedulers; for flow-matching
            schedulers ``t = 1000 * sigma``).
        scheduler: the training noise scheduler. DDPM-family: ``prediction_type`` ``"epsilon"``
            (x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)), ``"v_prediction"`` (x0 = sqrt(a) x_t - sqrt(1 - a) v) or
            ``"sample"``; flow matching (``FlowMatchEulerDiscreteScheduler``): x_t = (1 - s) x0 + s noise and the model
            predicts ``noise - x0``, so x0 = x_t - s * prediction.

    Returns:
        ``[B, C, h, w]`` estimated x0 in the latents' dtype.
    """
    if model_output.shape != noisy.shape:
        raise ValueError(f"model_output {tuple(model_output.shape)} and noisy {tuple(noisy.shape)} must match")
    shape = (-1,) + (1,) * (noisy.ndim - 1)
    if type(scheduler).__name__.startswith("FlowMatch"):
        num = float(getattr(scheduler.config, "num_train_timesteps", 1000))
        sigma = (timesteps.float() / num).reshape(shape).to(noisy.device)
        return (noisy.float() - sigma * model_output.float()).to(noisy.dtype)
    alphas = scheduler.alphas_cumprod.to(noisy.device)[timesteps.long()].float().reshape(shape)  # [B, 1, 1, 1]
    kind = scheduler.config.prediction_type
    x, out = noisy.float(), model_output.float()
    if kind == "epsilon":
        x0 = (x - (1 - alphas).sqrt() * out) / alphas.sqrt()
    elif kind == "v_prediction":
        x0 = alphas.sqrt() * x - (1 - alphas).sqrt() * out
    elif kind == "sample":
        x0 = out
    else:
        raise ValueError(f"unsupported prediction_type {kind!r} (expected epsilon, v_prediction or sample)")
    return x0.to(noisy.dtype)


def decode_latents(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode (differentiable): latents ``[B, C, h, w]`` -> float32 images ``[B, 3, H, W]`` in [0, 1].

    Undoes the VAE's ``scaling_factor`` (and ``shift_factor`` when it has one); values are clamped to [0, 1] (no
    gradient flows through clamped pixels, as in the pipelines' post-processing).
    """
    config = vae.config
    scale = float(getattr(config, "scaling_factor", 1.0) or 1.0)
    shift = float(getattr(config, "shift_factor", None) or 0.0)
    dtype = next(vae.parameters()).dtype
    decoded = vae.decode((latents / scale + shift).to(dtype), return_dict=False)[0]  # [B, 3, H, W] in ~[-1, 1]
    return (decoded.float() / 2 + 0.5).clamp(0, 1)


def encode_prompts(
    pipeline: Any,
    prompts: Sequence[str],
    *,
    negative_prompt: str | None = None,
    guidance: bool = False,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text embeddings of ``prompts`` with an SD-style pipeline's ``encode_prompt`` (no gradients).

    Returns:
        ``prompt_embeds [B, L, D]`` and, when ``guidance``, ``negative_prompt_embeds [B, L, D]`` (else None).
    """
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"`prompts` must be a non-empty list of strings, got {prompts!r}")
    if not hasattr(pipeline, "encode_prompt"):
        raise TypeError(f"{type(pipeline).__name__} has no encode_prompt; pass prompt embeddings to ddim_sample")
    target = device if device is not None else getattr(pipeline, "_execution_device", pipeline.device)
    negative = [negative_prompt or ""] * len(prompts) if guidance else None
    with torch.no_grad():
        embeds, neg = pipeline.encode_prompt(list(prompts), target, 1, guidance, negative)[:2]
    return embeds, (neg if guidance else None)


def initial_latents(
    pipeline: Any,
    batch: int,
    *,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Gaussian starting latents ``[B, C, H/f, W/f]`` in the UNet's dtype, scaled by ``init_noise_sigma``.

    Per-image CPU generators give the same noise as the pipelines' own sampling with the same seeds.
    """
    unet = pipeline.unet
    factor = int(getattr(pipeline, "vae_scale_factor", 8))
    size = int(unet.config.sample_size) * factor
    h, w = height or size, width or size
    if h % factor or w % factor:
        raise ValueError(f"height and width must be multiples of the VAE factor {factor}, got {h}x{w}")
    shape = (batch, int(unet.config.in_channels), h // factor, w // factor)
    device = getattr(pipeline, "_execution_device", unet.device)
    dtype = unet.dtype
    if isinstance(generator, list):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch}")
        noise = torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=dtype) for g in generator])
    else:
        noise = torch.randn(shape, generator=generator, dtype=dtype)
    return noise.to(device) * float(pipeline.scheduler.init_noise_sigma)


def sample_images(
    pipeline: Any,
    prompts: Sequence[str],
    *,
    config: SamplerConfig | None = None,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    negative_prompt: str | None = None,
) -> torch.Tensor:
    """Sample images from an SD-style pipeline with gradients through the last ``grad_steps`` DDIM steps.

    The pipeline's own scheduler is left untouched (a DDIM scheduler is built from its config). Gradients reach
    every trainable parameter of the UNet used in the grad-carrying steps (e.g. LoRA tensors) and the VAE decode.

    Returns:
        float32 ``[B, 3, H, W]`` in [0, 1].
    """
    from diffusers import DDIMScheduler

    cfg = config or SamplerConfig()
    prompts = list(prompts)
    guided = cfg.guidance_scale > 1.0
    embeds, neg = encode_prompts(pipeline, prompts, negative_prompt=negative_prompt, guidance=guided)
    latents = initial_latents(pipeline, len(prompts), height=height, width=width, generator=generator)
    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    final = ddim_sample(pipeline.unet, scheduler, latents, embeds, config=cfg, negative_prompt_embeds=neg)
    return decode_latents(pipeline.vae, final)
