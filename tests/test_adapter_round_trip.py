"""The kept adapter loads back whole: for every diffusers DreamBooth LoRA family, a fresh pipeline's
``load_lora_weights`` loads as many LoRA tensors, with the same values, from ``save_pipeline_adapter``'s file as from
the file the host script itself writes, and warns about neither.

"The script's own file" is made here the way each diffusers script's save hook makes it (v0.40 examples): the
script's default ``target_modules``; ``get_peft_model_state_dict``, converted with ``convert_state_dict_to_diffusers``
by the UNet scripts only; the pipeline class's ``save_lora_weights`` with ``<component>_lora_layers=`` and, in the
scripts that pass them, the adapters' LoRA configs as metadata.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from nearid_reward.adapters import save_pipeline_adapter  # noqa: E402
from nearid_reward.testing.pipelines import LORA_WEIGHT_NAME, build_tiny_pipeline  # noqa: E402

CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
SD3_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k",
               "attn.to_out.0", "attn.to_q", "attn.to_v")  # fmt: skip
FLUX_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2")  # fmt: skip


@dataclass(frozen=True)
class Host:
    """How one diffusers DreamBooth LoRA script adapts and saves its model."""

    family: str
    targets: tuple[str, ...]
    text_encoder_targets: tuple[str, ...] | None = None  # --train_text_encoder
    metadata: bool = False  # passes **_collate_lora_metadata(...) to save_lora_weights
    lora_alpha: int = 4


HOSTS = [
    Host("sd", ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj"), CLIP_TARGETS),  # _lora.py
    Host("sdxl", ("to_k", "to_q", "to_v", "to_out.0")),  # train_dreambooth_lora_sdxl
    Host("sd3", SD3_TARGETS),  # train_dreambooth_lora_sd3
    Host("flux", FLUX_TARGETS, CLIP_TARGETS),  # train_dreambooth_lora_flux --train_text_encoder
    Host("sana", ("to_k", "to_q", "to_v"), metadata=True, lora_alpha=8),  # train_dreambooth_lora_sana
    Host("qwen_image", ("to_k", "to_q", "to_v", "to_out.0"), metadata=True, lora_alpha=8),  # _qwen_image
    Host("lumina2", ("to_k", "to_q", "to_v", "to_out.0")),  # train_dreambooth_lora_lumina2
    Host("hidream", ("to_k", "to_q", "to_v", "to_out")),  # train_dreambooth_lora_hidream
]


def _adapt(module: torch.nn.Module, targets: tuple[str, ...], alpha: int, seed: int) -> None:
    """Add the script's LoRA and give every tensor seeded non-zero values (as after some training)."""
    from peft import LoraConfig

    module.add_adapter(LoraConfig(r=4, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def _trained_pipeline(host: Host):
    pipe = build_tiny_pipeline(host.family, seed=0)
    denoiser = pipe.unet if host.family in ("sd", "sdxl") else pipe.transformer
    _adapt(denoiser, host.targets, host.lora_alpha, seed=1)
    if host.text_encoder_targets:
        _adapt(pipe.text_encoder, host.text_encoder_targets, host.lora_alpha, seed=2)
    return pipe


def _script_save(host: Host, pipe, folder: Path) -> None:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet = host.family in ("sd", "sdxl")
    modules = {"unet" if unet else "transformer": pipe.unet if unet else pipe.transformer}
    if host.text_encoder_targets:
        modules["text_encoder"] = pipe.text_encoder
    kwargs = {}
    for name, module in modules.items():
        state = get_peft_model_state_dict(module)
        kwargs[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(state) if unet else state
        if host.metadata:
            kwargs[f"{name}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    type(pipe).save_lora_weights(str(folder), **kwargs)


def _lora_tensors(pipe) -> dict[str, torch.Tensor]:
    """Every adapter-injected tensor of the pipeline's modules, keyed without the adapter name."""
    found = {}
    for component, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            for name, param in module.named_parameters():
                if ".lora_A." in name or ".lora_B." in name:
                    parts = name.split(".")
                    found[f"{component}." + ".".join(p for i, p in enumerate(parts)
                                                     if not (i > 0 and parts[i - 1] in ("lora_A", "lora_B")))] = param
    return found


def _load(host: Host, folder: Path, caplog: pytest.LogCaptureFixture) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Load ``folder``'s LoRA into a fresh pipeline; its LoRA tensors and every warning (logged or raised)."""
    fresh = build_tiny_pipeline(host.family, seed=0)
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        fresh.load_lora_weights(str(folder), weight_name=LORA_WEIGHT_NAME)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    # "No LoRA keys associated to CLIPTextModel..." is diffusers' note that a text encoder got no LoRA: not a loss
    return _lora_tensors(fresh), [m for m in messages if "No LoRA keys associated" not in m]


@pytest.mark.parametrize("host", HOSTS, ids=[h.family for h in HOSTS])
def test_kept_adapter_loads_back_as_whole_as_the_scripts_own_file(host: Host, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    pipe = _trained_pipeline(host)
    trained = {k: v.detach().clone() for k, v in _lora_tensors(pipe).items()}
    _script_save(host, pipe, tmp_path / "script")
    save_pipeline_adapter(pipe, tmp_path / "ours")

    theirs, their_warnings = _load(host, tmp_path / "script", caplog)
    ours, our_warnings = _load(host, tmp_path / "ours", caplog)
    print(f"{host.family}: trained {len(trained)}, script file {len(theirs)}, ours {len(ours)} LoRA tensors")
    assert len(theirs) == len(trained)  # the reference: the script's file loads whole
    assert sorted(ours) == sorted(theirs) == sorted(trained)
    for key, value in trained.items():
        assert torch.equal(ours[key], value), key
    assert our_warnings == their_warnings == []
    # the scale: metadata keeps lora_alpha (8 on rank 4 gives scale 2), as the script's file does
    denoiser = "unet" if host.family in ("sd", "sdxl") else "transformer"
    fresh = build_tiny_pipeline(host.family, seed=0)
    fresh.load_lora_weights(str(tmp_path / "ours"), weight_name=LORA_WEIGHT_NAME)
    layer = next(m for m in getattr(fresh, denoiser).modules() if hasattr(m, "scaling") and m.scaling)
    assert list(layer.scaling.values()) == [host.lora_alpha / 4]
