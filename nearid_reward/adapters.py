"""The trained part of a diffusers pipeline: find its denoiser, enable/disable its adapters, save them the way the
diffusers training scripts do, and load LoRA checkpoints into one adapter slot in turn (delete + load, or hotswap).

diffusers and peft are imported only inside the functions that need them: these helpers call methods of the
pipeline they are given.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "denoiser_of",
    "pipeline_modules",
    "has_active_adapter",
    "adapters_disabled",
    "adapter_state_dict",
    "save_pipeline_adapter",
    "lora_rank",
    "LoraSlot",
]


def denoiser_of(pipeline: Any) -> tuple[torch.nn.Module, str]:
    """The pipeline's denoiser and its attribute name (``"unet"`` or ``"transformer"``)."""
    for attr in ("unet", "transformer"):
        module = getattr(pipeline, attr, None)
        if isinstance(module, torch.nn.Module):
            return module, attr
    raise TypeError(f"{type(pipeline).__name__} has neither a `unet` nor a `transformer` module")


def pipeline_modules(pipeline: Any) -> list[torch.nn.Module]:
    """The pipeline's ``torch.nn.Module`` components (denoiser, VAE, text encoders, ...)."""
    comps = getattr(pipeline, "components", None)
    if isinstance(comps, dict):
        return [m for m in comps.values() if isinstance(m, torch.nn.Module)]
    return [m for m in vars(pipeline).values() if isinstance(m, torch.nn.Module)]


def _tuner_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    # peft's BaseTunerLayer exposes `disable_adapters` and `active_adapters`; checked by duck typing so peft is
    # only needed when an adapter really exists.
    return [m for m in module.modules() if hasattr(m, "active_adapters") and hasattr(m, "_disable_adapters")]


# ---------------------------------------------------------------------------------------------- enable / disable
def has_active_adapter(pipeline: Any) -> bool:
    """True when the pipeline's denoiser (or a text encoder) carries an enabled PEFT/LoRA adapter."""
    for module in pipeline_modules(pipeline):
        layers = _tuner_layers(module)
        if layers and not all(bool(layer._disable_adapters) for layer in layers):
            return True
    return False


@contextlib.contextmanager
def adapters_disabled(pipeline: Any) -> Iterator[None]:
    """Disable the pipeline's adapters inside the block (base model), re-enable and restore ``requires_grad`` after.

    Uses the pipeline's ``disable_lora``/``enable_lora`` when it has them (denoiser and text encoders), else the
    denoiser's ``disable_adapters``/``enable_adapters``. peft toggles ``requires_grad`` of adapter tensors when
    enabling; the previous flags are restored so a training run's trainable set is unchanged.
    """
    flags = [(p, p.requires_grad) for m in pipeline_modules(pipeline) for p in m.parameters()]
    if hasattr(pipeline, "disable_lora") and hasattr(pipeline, "enable_lora"):
        disable, enable = pipeline.disable_lora, pipeline.enable_lora
    else:
        denoiser, _ = denoiser_of(pipeline)
        disable, enable = denoiser.disable_adapters, denoiser.enable_adapters
    disable()
    try:
        yield
    finally:
        enable()
        for param, flag in flags:
            if param.requires_grad != flag:
                param.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------- save
def _adapter_name(module: torch.nn.Module) -> str:
    """The name of the module's active PEFT adapter (``"default"`` for one added by ``add_adapter``)."""
    active = getattr(module, "active_adapters", None)
    names = active() if callable(active) else active
    if isinstance(names, str):
        return names
    if names:
        return str(list(names)[0])
    return "default"


def adapter_state_dict(
    module: torch.nn.Module, *, layout: Literal["unet", "transformer"]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A module's active LoRA adapter as the diffusers DreamBooth scripts save it, and its LoRA config.

    Args:
        module: a UNet, transformer or text encoder carrying a PEFT adapter.
        layout: ``"unet"`` for the UNet scripts (SD 1.x/2.x, SDXL), which convert peft's names to diffusers' legacy
            ``lora.down``/``lora.up`` ones with ``convert_state_dict_to_diffusers``; ``"transformer"`` for the
            transformer scripts (SD3, Flux, Sana, Qwen-Image, HiDream, Lumina2, ...), which save peft's names
            (``lora_A``/``lora_B``) as they are. Converting a transformer adapter would rename only the projections
            diffusers knows (``to_q/k/v/out.0``) and leave the others (``add_*_proj``) in peft's names, a mix that
            ``load_lora_weights`` reads partly.

    Returns:
        ``(state_dict, lora_config)``: the tensors by key, and the adapter's ``LoraConfig`` as a dict (what the
        scripts pass as ``*_lora_adapter_metadata`` so that ``lora_alpha`` survives the round trip).

    Example:
        >>> state, config = adapter_state_dict(pipe.transformer, layout="transformer")  # doctest: +SKIP
        >>> type(pipe).save_lora_weights(out, transformer_lora_layers=state,
        ...                              transformer_lora_adapter_metadata=config)  # doctest: +SKIP
    """
    from peft.utils import get_peft_model_state_dict

    if layout not in ("unet", "transformer"):
        raise ValueError(f"`layout` must be 'unet' or 'transformer', got {layout!r}")
    name = _adapter_name(module)
    state = get_peft_model_state_dict(module, adapter_name=name)
    if layout == "unet":
        from diffusers.utils import convert_state_dict_to_diffusers

        state = convert_state_dict_to_diffusers(state)
    config = module.peft_config[name].to_dict() if name in getattr(module, "peft_config", {}) else {}
    return state, config


def save_pipeline_adapter(pipeline: Any, folder: str | os.PathLike[str]) -> list[Path]:
    """Save the pipeline's trained weights in the key format its diffusers training script writes; returns the files.

    With a PEFT adapter on the UNet/transformer (and optionally the text encoders) this writes
    ``pytorch_lora_weights.safetensors`` with the pipeline class's ``save_lora_weights``, keys as
    :func:`adapter_state_dict` makes them for the pipeline's layout (converted for a UNet, peft's own for a
    transformer) and the adapters' LoRA configs as metadata where the class takes them; a fresh pipeline's
    ``load_lora_weights`` then loads every tensor, as it does the script's own file. A denoiser without adapter is
    saved whole with ``save_pretrained`` into ``folder/unet`` or ``folder/transformer``.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    denoiser, attr = denoiser_of(pipeline)
    denoiser = getattr(denoiser, "module", denoiser)  # DDP-wrapped
    if not getattr(denoiser, "_hf_peft_config_loaded", False):
        denoiser.save_pretrained(str(out / attr))
        return sorted(p for p in (out / attr).rglob("*") if p.is_file())
    params = inspect.signature(type(pipeline).save_lora_weights).parameters
    modules: dict[str, torch.nn.Module] = {attr: denoiser}
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipeline, name, None)
        if encoder is not None and getattr(encoder, "peft_config", None) and f"{name}_lora_layers" in params:
            modules[name] = getattr(encoder, "module", encoder)
    layers: dict[str, Any] = {}
    for name, module in modules.items():
        state, config = adapter_state_dict(module, layout="unet" if attr == "unet" else "transformer")
        layers[f"{name}_lora_layers"] = state
        if config and f"{name}_lora_adapter_metadata" in params:
            layers[f"{name}_lora_adapter_metadata"] = config
    type(pipeline).save_lora_weights(str(out), **layers)
    return sorted(p for p in out.iterdir() if p.is_file())


# ---------------------------------------------------------------------------------------------- LoRA load / hotswap
def lora_rank(file: str | os.PathLike[str]) -> int:
    """The largest LoRA rank in a safetensors file (the first dim of its ``lora_A``/``lora.down`` tensors)."""
    from safetensors import safe_open

    rank = 0
    with safe_open(str(file), framework="pt", device="cpu") as handle:
        for key in handle.keys():
            if "lora.down" in key or "lora_A" in key or "lora_down" in key:
                rank = max(rank, int(handle.get_slice(key).get_shape()[0]))
    return rank


class LoraSlot:
    """One named LoRA adapter of a pipeline, filled from checkpoint folders in turn.

    Without ``hotswap`` each :meth:`load` follows an :meth:`unload` (delete + load). With ``hotswap`` the weights
    are replaced in place (``load_lora_weights(..., hotswap=True)``, no recompilation of a compiled denoiser) after
    :meth:`prepare_hotswap`; a checkpoint that cannot be hotswapped (other target modules, text-encoder LoRA) falls
    back to delete + load with a warning.

    Args:
        pipeline: a diffusers pipeline with ``load_lora_weights`` / ``delete_adapters`` / ``set_adapters``.
        adapter_name: the adapter's name while a checkpoint is loaded.
        hotswap: replace weights in place instead of deleting and loading the adapter.
    """

    def __init__(self, pipeline: Any, *, adapter_name: str = "nearid_lora", hotswap: bool = False) -> None:
        self.pipeline = pipeline
        self.adapter_name = adapter_name
        self.hotswap = hotswap
        self.loaded = False
        self._hotswap_ready = False

    def prepare_hotswap(self, weight_files: Iterable[str | os.PathLike[str]]) -> None:
        """Before the first load: size the slot for the largest rank among ``weight_files`` (hotswap only)."""
        if not self.hotswap or self._hotswap_ready:
            return
        ranks = [lora_rank(f) for f in weight_files]
        if ranks and hasattr(self.pipeline, "enable_lora_hotswap"):
            self.pipeline.enable_lora_hotswap(target_rank=max(ranks))
        self._hotswap_ready = True

    def load(self, folder: str | os.PathLike[str], weight_name: str) -> None:
        """Load ``folder/weight_name`` into the slot and make it the active adapter."""
        kwargs = {"weight_name": weight_name, "adapter_name": self.adapter_name}
        if self.hotswap and self.loaded:
            try:
                self.pipeline.load_lora_weights(str(folder), hotswap=True, **kwargs)
                return
            except Exception as exc:  # e.g. different target modules, or text-encoder LoRA
                logger.warning("hotswap of %s failed (%s); deleting and loading the adapter instead", folder, exc)
                self.unload()
        self.pipeline.load_lora_weights(str(folder), **kwargs)
        self.pipeline.set_adapters([self.adapter_name])
        self.loaded = True

    def unload(self) -> None:
        """Delete the adapter (the pipeline is the base model again); a no-op when nothing is loaded."""
        if self.loaded:
            self.pipeline.delete_adapters(self.adapter_name)
            self.loaded = False
