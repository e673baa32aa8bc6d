"""EXPERIMENTAL: a ReFL-style identity loss inside an unmodified DreamBooth script (``--nearid_loss_weight``).

How it works without forking the script:

1. ``accelerator.prepare`` is wrapped to find the denoiser (UNet / transformer) among the prepared objects and put a
   forward hook on it, which keeps the last training call's noisy input, timesteps and prediction.
2. ``accelerator.backward(loss)`` is wrapped: from the kept call it takes the instance half of the batch (the scripts
   put the class-prior half second), keeps the samples with a low-noise timestep (``t < --nearid_loss_max_timestep``),
   forms the one-step x0 prediction (epsilon, v-prediction or flow matching), decodes it with the VAE and scores it
   with :class:`~nearid_reward.IdentityReward` over the run's one NearID model and reference set (shared with
   validation); ``weight * mean(1 - identity)`` is added to the script's loss before the real backward.

Why experimental: the hook relies on the script calling its denoiser exactly once per step with
``(noisy_input, timesteps, ...)`` as the first two arguments (true of the diffusers DreamBooth scripts); packed
latents (Flux) are skipped with a warning; the VAE is reloaded from ``--pretrained_model_name_or_path``, which costs
memory; and the one-step x0 of a noisy sample is blurry, so the identity signal is weak at high noise (hence the
timestep bound).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["IdentityLossHook", "attach_identity_loss"]

_DENOISER_NAMES = ("UNet2DConditionModel", "Transformer2DModel", "FluxTransformer2DModel", "SD3Transformer2DModel")


def _is_denoiser(obj: Any) -> bool:
    module = getattr(obj, "module", obj)  # DDP
    return isinstance(module, torch.nn.Module) and (
        type(module).__name__ in _DENOISER_NAMES or type(module).__name__.endswith("Transformer2DModel")
    )


class IdentityLossHook:
    """State of the identity loss for one training run (one per process)."""

    def __init__(self, accelerator: Any, session: Any) -> None:
        self.accelerator = accelerator
        self.session = session
        self.weight = float(session.options.nearid_loss_weight)
        self.max_timestep = int(session.options.nearid_loss_max_timestep)
        self.captured: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.last_value: float | None = None
        self.applied = 0
        self._reward: Any = None
        self._vae: Any = None
        self._scheduler: Any = None
        self._warned_packed = False

    # ------------------------------------------------------------------ capture
    def register(self, denoiser: torch.nn.Module) -> None:
        module = getattr(denoiser, "module", denoiser)
        module.register_forward_hook(self._capture, with_kwargs=True)
        logger.info("NearID identity loss (experimental) on %s, weight %s", type(module).__name__, self.weight)

    def _capture(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        noisy = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        timesteps = args[1] if len(args) > 1 else kwargs.get("timestep", kwargs.get("timesteps"))
        pred = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        if isinstance(noisy, torch.Tensor) and isinstance(pred, torch.Tensor) and timesteps is not None:
            t = torch.as_tensor(timesteps, device=noisy.device).reshape(-1).expand(noisy.shape[0])
            self.captured = (noisy.detach(), t.detach(), pred)

    # ------------------------------------------------------------------ loss
    def _components(self) -> tuple[Any, Any, Any]:
        if self._reward is None:
            from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler

            from nearid_reward import IdentityReward
            from nearid_reward.pipelines import from_pretrained_safetensors

            args = self.session.args
            base = args.pretrained_model_name_or_path
            device = self.accelerator.device
            # the session's one NearID model and reference set, shared with validation
            self._reward = IdentityReward(self.session.nearid_model(), self.session.reference_set())
            self._reward.model.gradient_checkpointing_enable()
            self._vae = from_pretrained_safetensors(AutoencoderKL, base, subfolder="vae")
            self._vae.to(device).requires_grad_(False)
            config = DDPMScheduler.load_config(base, subfolder="scheduler")
            flow = config.get("_class_name") == "FlowMatchEulerDiscreteScheduler"
            self._scheduler = (FlowMatchEulerDiscreteScheduler if flow else DDPMScheduler).from_config(config)
        return self._reward, self._vae, self._scheduler

    def identity_loss(self) -> torch.Tensor | None:
        """``mean(1 - identity)`` of the decoded one-step x0 of the kept call's low-noise instance samples."""
        if self.captured is None:
            return None
        noisy, timesteps, pred = self.captured
        self.captured = None
        if noisy.ndim != 4:
            if not self._warned_packed:
                logger.warning("NearID identity loss skipped: packed latents %s are not supported", tuple(noisy.shape))
                self._warned_packed = True
            return None
        n = noisy.shape[0] // 2 if getattr(self.session.args, "with_prior_preservation", False) else noisy.shape[0]
        keep = timesteps[:n] < self.max_timestep
        if not bool(keep.any()):
            return None
        from nearid_reward.diffusion import decode_latents, predict_x0

        reward, vae, scheduler = self._components()
        x0 = predict_x0(pred[:n][keep], noisy[:n][keep], timesteps[:n][keep], scheduler)
        images = decode_latents(vae, x0)  # [k, 3, H, W] in [0, 1]
        return (1.0 - reward.score(images).identity).mean()  # similarity to the references only, no penalty

    def backward(self, original: Any, loss: torch.Tensor, **kwargs: Any) -> Any:
        extra = None
        try:
            extra = self.identity_loss()
        except Exception:
            if self.session.strict:
                raise
            logger.exception("NearID identity loss failed this step; training continues without it")
        if extra is not None:
            self.last_value = float(extra.detach())
            self.applied += 1
            loss = loss + self.weight * extra.to(loss.dtype)
        return original(loss, **kwargs)


def attach_identity_loss(accelerator: Any, session: Any) -> IdentityLossHook:
    """Wrap ``accelerator.prepare`` and ``accelerator.backward`` of this accelerator instance."""
    hook = IdentityLossHook(accelerator, session)
    original_prepare = accelerator.prepare
    original_backward = accelerator.backward

    def prepare(*objects: Any, **kwargs: Any) -> Any:
        result = original_prepare(*objects, **kwargs)
        outputs = result if isinstance(result, tuple) else (result,)
        for obj in outputs:
            if _is_denoiser(obj):
                hook.register(obj)
                break
        return result

    def backward(loss: torch.Tensor, **kwargs: Any) -> Any:
        return hook.backward(original_backward, loss, **kwargs)

    accelerator.prepare = prepare
    accelerator.backward = backward
    return hook
