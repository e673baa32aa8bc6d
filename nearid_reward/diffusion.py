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
    "ddim_timesteps",
    "denoising_loss",
    "reward_weights",
    "refl_images",
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
    stop_index: int | None = None,
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
        stop_index: stop before denoising step ``stop_index`` (0-based) and return the latents x_t of that step
            (see :func:`ddim_timesteps` for its timestep); None runs every step.

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
        if stop_index is not None and i >= stop_index:
            break
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


def ddim_timesteps(scheduler: Any, num_inference_steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The timesteps ``[N]`` a DDIM run with ``num_inference_steps`` visits (the scheduler itself is not changed)."""
    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(num_inference_steps, device=device)
    return sched.timesteps


def denoising_loss(
    unet: torch.nn.Module,
    noise_scheduler: Any,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    unet_kwargs: dict[str, Any] | None = None,
    target_unet: torch.nn.Module | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample diffusion training loss ``[B]`` on clean latents (the DreamBooth objective).

    Noise ``latents`` at ``timesteps`` (uniform random when None), predict with ``unet`` and regress the target of
    the scheduler's ``prediction_type`` (epsilon or v). With ``target_unet`` the target is instead that module's
    prediction without gradients (a KL-to-reference term: for Gaussian denoisers the KL between the two reverse
    steps is proportional to this squared difference).

    Args:
        unet: the trained denoiser.
        noise_scheduler: a DDPM-family training scheduler (``add_noise``, ``get_velocity``, ``prediction_type``).
        latents: ``[B, C, h, w]`` clean latents (already scaled by the VAE's scaling factor).
        prompt_embeds: ``[B, L, D]`` text conditioning.
        timesteps, noise: optional fixed draws (``[B]`` and ``[B, C, h, w]``).
        unet_kwargs: extra UNet arguments (SDXL ``added_cond_kwargs``).
        target_unet: optional reference denoiser (e.g. the same UNet with its adapter disabled, as a callable).
        generator: for the random draws.

    Returns:
        ``[B]`` mean squared errors (float32).
    """
    b = latents.shape[0]
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    if timesteps is None:
        high = int(noise_scheduler.config.num_train_timesteps)
        timesteps = torch.randint(0, high, (b,), generator=generator).to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    kwargs = dict(unet_kwargs or {})
    pred = _unet_call(unet, noisy, timesteps, prompt_embeds, kwargs)
    if target_unet is not None:
        with torch.no_grad():
            target = _unet_call(target_unet, noisy, timesteps, prompt_embeds, kwargs)
    elif noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {noise_scheduler.config.prediction_type!r}")
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def reward_weights(rewards: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Reward-weighted-regression weights ``[B]``: ``B * softmax(standardised rewards / temperature)`` (mean 1).

    Rewards are standardised within the batch (zero mean, unit std; all equal gives uniform weights), so the scale
    of the reward does not matter and a lower ``temperature`` concentrates the weight on the best samples.
    """
    if rewards.ndim != 1 or rewards.numel() == 0:
        raise ValueError(f"`rewards` must be a non-empty [B] tensor, got shape {tuple(rewards.shape)}")
    if not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}")
    r = rewards.detach().float()
    std = r.std(unbiased=False)
    z = (r - r.mean()) / std if float(std) > 1e-8 else torch.zeros_like(r)
    return torch.softmax(z / temperature, dim=0) * r.numel()


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
    scheduler: Any = None,
) -> torch.Tensor:
    """Gaussian starting latents ``[B, C, H/f, W/f]`` in the UNet's dtype, scaled by ``init_noise_sigma``.

    ``scheduler`` is the one that will sample (its ``init_noise_sigma`` is used; default: the pipeline's own; an
    Euler scheduler's sigma is far from DDIM's 1.0).

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
    return noise.to(device) * float((scheduler or pipeline.scheduler).init_noise_sigma)


def prepare_conditioning(
    pipeline: Any,
    prompts: Sequence[str],
    *,
    guided: bool,
    negative_prompt: str | None = None,
    height: int | None = None,
    width: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """Text conditioning of an SD or SDXL pipeline for :func:`ddim_sample` (no gradients).

    Returns:
        ``prompt_embeds [B, L, D]``, ``negative_prompt_embeds`` (when ``guided``) and the extra UNet arguments for the
        (guided) batch: SDXL's ``added_cond_kwargs`` (pooled text embeddings and size/crop time ids), else ``{}``.
    """
    if not hasattr(pipeline, "text_encoder_2"):
        embeds, neg = encode_prompts(pipeline, prompts, negative_prompt=negative_prompt, guidance=guided)
        return embeds, neg, {}
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"`prompts` must be a non-empty list of strings, got {prompts!r}")
    device = getattr(pipeline, "_execution_device", pipeline.device)
    # No negative prompt: the pipeline decides (SDXL's force_zeros_for_empty_prompt uses zero embeddings).
    negative = [negative_prompt] * len(prompts) if guided and negative_prompt else None
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipeline.encode_prompt(
            list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
            negative_prompt=negative,
        )  # fmt: skip
    factor = int(getattr(pipeline, "vae_scale_factor", 8))
    size = int(pipeline.unet.config.sample_size) * factor
    h, w = height or size, width or size
    projection = int(pipeline.text_encoder_2.config.projection_dim)
    time_ids = pipeline._get_add_time_ids((h, w), (0, 0), (h, w), dtype=embeds.dtype,
                                          text_encoder_projection_dim=projection).to(device)  # [1, 6]
    text = torch.cat([neg_pooled, pooled]) if guided else pooled
    ids = time_ids.repeat(text.shape[0], 1)
    return embeds, (neg if guided else None), {"added_cond_kwargs": {"text_embeds": text, "time_ids": ids}}


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
    """Sample images from an SD or SDXL pipeline with gradients through the last ``grad_steps`` DDIM steps.

    The pipeline's own scheduler is left untouched (a DDIM scheduler is built from its config). Gradients reach
    every trainable parameter of the UNet used in the grad-carrying steps (e.g. LoRA tensors) and the VAE decode.

    Returns:
        float32 ``[B, 3, H, W]`` in [0, 1].
    """
    from diffusers import DDIMScheduler

    cfg = config or SamplerConfig()
    prompts = list(prompts)
    guided = cfg.guidance_scale > 1.0
    embeds, neg, kwargs = prepare_conditioning(pipeline, prompts, guided=guided, negative_prompt=negative_prompt,
                                               height=height, width=width)
    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    latents = initial_latents(pipeline, len(prompts), height=height, width=width, generator=generator,
                              scheduler=scheduler)
    final = ddim_sample(pipeline.unet, scheduler, latents, embeds, config=cfg, negative_prompt_embeds=neg,
                        unet_kwargs=kwargs)
    return decode_latents(pipeline.vae, final)


def refl_images(
    pipeline: Any,
    prompts: Sequence[str],
    *,
    stop_index: int,
    num_inference_steps: int = 20,
    guidance_scale: float = 1.0,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    negative_prompt: str | None = None,
) -> torch.Tensor:
    """ReFL: denoise without gradients up to DDIM step ``stop_index``, then one differentiable step to x0, decoded.

    Only the last UNet call carries gradients, so one reward step costs one UNet backward (the ImageReward ReFL
    recipe draws ``stop_index`` late in the schedule, where the one-step x0 is already sharp).

    Returns:
        float32 ``[B, 3, H, W]`` in [0, 1], differentiable w.r.t. the UNet's trainable parameters.
    """
    from diffusers import DDIMScheduler

    if not 0 <= int(stop_index) < int(num_inference_steps):
        raise ValueError(f"stop_index must be in [0, {num_inference_steps}), got {stop_index}")
    guided = guidance_scale > 1.0
    embeds, neg, kwargs = prepare_conditioning(pipeline, list(prompts), guided=guided,
                                               negative_prompt=negative_prompt, height=height, width=width)
    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    latents = initial_latents(pipeline, len(prompts), height=height, width=width, generator=generator,
                              scheduler=scheduler)
    cfg = SamplerConfig(num_inference_steps=num_inference_steps, grad_steps=0, guidance_scale=guidance_scale)
    with torch.no_grad():
        x = ddim_sample(pipeline.unet, scheduler, latents, embeds, config=cfg, negative_prompt_embeds=neg,
                        unet_kwargs=kwargs, stop_index=stop_index)
    t = ddim_timesteps(scheduler, num_inference_steps, device=x.device)[stop_index]
    model_in = torch.cat([x, x]) if guided else x
    cond = torch.cat([neg, embeds]) if guided else embeds
    out = _unet_call(pipeline.unet, scheduler.scale_model_input(model_in, t), t, cond, kwargs)
    if guided:
        uncond, text = out.chunk(2)
        out = uncond + guidance_scale * (text - uncond)
    x0 = predict_x0(out, x, t.reshape(1).expand(x.shape[0]), scheduler)
    return decode_latents(pipeline.vae, x0)
