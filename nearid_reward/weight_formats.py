"""Reading and writing the three checkpoint formats, with the project's own code (no ``trust_remote_code``).

Formats (see docs/formats.md):

* ``"release"``: the official NearID release layout (``Aleksandar/nearid-siglip2``): ``config.json`` with
  ``model_type: "nearid"`` and a ``vision_config``; ``model.safetensors`` with fp16 tensors under
  ``backbone.vision_model.`` whose ``head.*`` is the trained NearID head.
* ``"head"``: this project's head-only format: ``nearid_config.json`` (backbone reference, head shape,
  preprocessing, library version) and ``head.safetensors`` (the head only).
* ``"siglip"``: a plain SigLIP / SigLIP2 checkpoint folder, vision-only or vision+text: the frozen baseline,
  pooled by the checkpoint's own MAP head.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedConfig, Siglip2VisionConfig, SiglipVisionConfig

from .config import HEAD_CONFIG_NAME, HEAD_WEIGHTS_NAME, HeadConfig, NearIDConfig, PreprocessConfig
from .files import CheckpointError, load_safetensors

try:  # the strict config dataclasses of transformers 5 raise these on a mistyped field
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # pragma: no cover - older huggingface_hub: configs raise TypeError/ValueError if anything

    class StrictDataclassError(Exception):  # type: ignore[no-redef]
        """Placeholder: never raised."""

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointFormat",
    "BackboneType",
    "LoadedCheckpoint",
    "detect_format",
    "resolve_checkpoint_dir",
    "read_checkpoint",
    "RELEASE_PREFIX",
    "RELEASE_VISION_FIELDS",
]

CheckpointFormat = Literal["release", "head", "siglip"]
BackboneType = Literal["siglip", "siglip2"]

RELEASE_PREFIX = "backbone.vision_model."
# The exact fields of the release config's ``vision_config``.
RELEASE_VISION_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "num_channels",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
)
_SIGLIP_TYPES = {"siglip": "siglip", "siglip_vision_model": "siglip", "siglip2": "siglip2",
                 "siglip2_vision_model": "siglip2"}
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.safetensors.index.json"]


@dataclass
class LoadedCheckpoint:
    """Everything needed to assemble a :class:`~nearid_reward.NearIDModel` from a folder.

    Attributes:
        format: which of the three formats the folder holds.
        folder: the resolved local folder.
        backbone_type: ``"siglip"`` (fixed resolution) or ``"siglip2"`` (NaFlex).
        vision_config: the transformers vision config (``vision_use_head`` as in the checkpoint).
        backbone_state: backbone tensors keyed as transformers' ``Siglip(2)VisionModel`` without its head.
        head_state: head tensors keyed like :class:`~nearid_reward.head.MAPHead`.
        head_config: the head's shape.
        preprocess: the image preprocessing.
        backbone_ref: what a head-only checkpoint should reference as its backbone (local folder or hub id).
        extra: metadata carried by a head-only checkpoint.
    """

    format: CheckpointFormat
    folder: Path
    backbone_type: BackboneType
    vision_config: PreTrainedConfig
    backbone_state: dict[str, torch.Tensor]
    head_state: dict[str, torch.Tensor]
    head_config: HeadConfig
    preprocess: PreprocessConfig
    backbone_ref: str
    extra: dict[str, Any]


def resolve_checkpoint_dir(path: str | os.PathLike[str]) -> Path:
    """A local folder as is; otherwise a hub id fetched (or found in the local HF cache) with huggingface_hub."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise CheckpointError(f"checkpoint path {local} is a file; pass the folder that contains it")
    text = str(path)
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~")) and " " not in text
    if not looks_like_repo:
        raise CheckpointError(f"checkpoint folder not found: {local}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=text, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, auth: all mean "cannot use this id here"
        raise CheckpointError(
            f"{text!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({exc.__class__.__name__}: {exc}). On an offline machine, download it elsewhere and pass the folder."
        ) from exc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"missing file: {path}") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def detect_format(folder: Path) -> CheckpointFormat:
    """Which checkpoint format ``folder`` holds; raises :class:`CheckpointError` naming what was found."""
    if (folder / HEAD_CONFIG_NAME).is_file():
        return "head"
    config_file = folder / "config.json"
    if not config_file.is_file():
        present = sorted(p.name for p in folder.iterdir())[:10]
        raise CheckpointError(
            f"{folder} is not a NearID or SigLIP checkpoint: expected {HEAD_CONFIG_NAME} (head-only format) or "
            f"config.json (release / SigLIP format); found {present}"
        )
    config = _read_json(config_file)
    model_type = config.get("model_type")
    if model_type == "nearid":
        if "vision_config" in config:
            return "release"
        raise CheckpointError(
            f"{config_file} has model_type 'nearid' but no 'vision_config': this looks like an official NearID "
            "*training* checkpoint (keys encoder_wrapper.* / head.map_pooler.*), not the release layout. Convert it "
            "with the official convert_checkpoint.py first, or save the head with this library."
        )
    if model_type in _SIGLIP_TYPES:
        return "siglip"
    raise CheckpointError(
        f"{config_file} has unknown model_type {model_type!r}; supported: 'nearid' (release layout) and "
        f"{sorted(_SIGLIP_TYPES)} (plain SigLIP / SigLIP2 checkpoints)"
    )


def _weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (folder / name).is_file():
            return folder / name
    pickled = [n for n in ("pytorch_model.bin", "pytorch_model.bin.index.json") if (folder / n).is_file()]
    if pickled:
        raise CheckpointError(
            f"{folder} only has pickled weights ({pickled[0]}); this library loads safetensors only. Convert them "
            "with `transformers` (save_pretrained(..., safe_serialization=True))."
        )
    raise CheckpointError(f"no weights in {folder}: expected model.safetensors (or model.safetensors.index.json)")


def _field_error(file: Path, exc: Exception) -> CheckpointError:
    """One line naming ``file`` and the field, from a config class's validation error (huggingface_hub's strict
    dataclasses raise a multi-line ``StrictDataclassFieldValidationError``; ours a ``TypeError``/``ValueError``)."""
    message = " ".join(str(exc).split())
    match = re.match(r"Validation error for field '(?P<field>[^']+)': (?:\w+Error: )?(?P<why>.*)$", message)
    if match is not None:
        why = match["why"].removeprefix(f"Field '{match['field']}' ")
        return CheckpointError(f"{file}: field {match['field']!r} is invalid: {why}")
    return CheckpointError(f"{file}: {message}")


def _vision_config(folder: Path) -> tuple[BackboneType, PreTrainedConfig]:
    file = folder / "config.json"
    data = _read_json(file)
    model_type = data.get("model_type")
    if model_type == "nearid" or model_type in ("siglip", "siglip2"):  # the vision tower is one part of the config
        if not isinstance(data.get("vision_config"), dict):
            raise CheckpointError(
                f"{file} (model_type {model_type!r}) needs a 'vision_config' object, got {data.get('vision_config')!r}"
            )
        vision = dict(data["vision_config"])
    else:
        vision = {k: v for k, v in data.items() if k not in ("model_type", "architectures", "transformers_version")}
    if model_type == "nearid":
        vision.setdefault("vision_use_head", True)
        kind: BackboneType = "siglip"
    else:
        kind = _SIGLIP_TYPES[str(model_type)]
    config_cls = SiglipVisionConfig if kind == "siglip" else Siglip2VisionConfig
    try:
        return kind, config_cls(**vision)
    except (StrictDataclassError, TypeError, ValueError) as exc:
        raise _field_error(file, exc) from exc


def _preprocess(folder: Path, kind: BackboneType, vision: PreTrainedConfig) -> PreprocessConfig:
    file = folder / "preprocessor_config.json"
    if file.is_file():
        data = _read_json(file)
        try:
            return PreprocessConfig.from_processor_dict(data, image_size=getattr(vision, "image_size", None))
        except (TypeError, ValueError) as exc:
            raise _field_error(file, exc) from exc
    logger.warning("%s has no preprocessor_config.json; using SigLIP defaults for a %s backbone", folder, kind)
    if kind == "siglip2":
        return PreprocessConfig(mode="naflex", patch_size=int(vision.patch_size),
                                max_num_patches=int(vision.num_patches), resample=2)
    return PreprocessConfig(mode="fixed", height=int(vision.image_size), width=int(vision.image_size), resample=3)


def _split_vision_state(
    state: dict[str, torch.Tensor], source: Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Strip the layout's prefix and split backbone tensors from head tensors."""
    for prefix in (RELEASE_PREFIX, "vision_model.", ""):
        if f"{prefix}embeddings.patch_embedding.weight" in state:
            break
    else:
        sample = sorted(state)[:5]
        raise CheckpointError(
            f"{source}: no vision tower found (looked for 'embeddings.patch_embedding.weight' under the prefixes "
            f"{RELEASE_PREFIX!r}, 'vision_model.' or none); first keys are {sample}"
        )
    backbone: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name.startswith("head."):
            head[name[len("head."):]] = value
        else:
            backbone[name] = value
    return backbone, head


def _read_vision_folder(folder: Path, fmt: CheckpointFormat) -> LoadedCheckpoint:
    kind, vision = _vision_config(folder)
    weights = _weights_file(folder)
    prefixes = (RELEASE_PREFIX, "vision_model.", "embeddings.", "encoder.", "post_layernorm.", "head.")
    state = load_safetensors(weights, key_filter=lambda k: k.startswith(prefixes))
    backbone_state, head_state = _split_vision_state(state, weights)
    if fmt == "siglip" and not head_state:
        raise CheckpointError(
            f"{folder} has no MAP pooling head (vision_use_head is false or head.* weights are absent); NearID "
            "needs a backbone with SigLIP's attention-pooling head to initialise from"
        )
    return LoadedCheckpoint(
        format=fmt,
        folder=folder,
        backbone_type=kind,
        vision_config=vision,
        backbone_state=backbone_state,
        head_state=head_state,
        head_config=HeadConfig.from_vision_config(vision),
        preprocess=_preprocess(folder, kind, vision),
        backbone_ref=str(folder.resolve()),
        extra={},
    )


def _is_local(ref: str) -> bool:
    return Path(ref).expanduser().exists() or ref.startswith((".", "/", "~")) or ref.count("/") != 1


def _resolve_backbone_ref(
    config: NearIDConfig, folder: Path, override: str | os.PathLike[str] | None
) -> tuple[Path, str]:
    """The backbone folder of a head-only checkpoint, and the reference to record when it is saved again."""
    if override is not None:
        found = resolve_checkpoint_dir(override)
        return found, str(Path(override).resolve()) if _is_local(str(override)) else str(override)
    relative = folder / config.backbone
    if not Path(config.backbone).is_absolute() and relative.is_dir():
        return relative, str(relative.resolve())
    if config.backbone_absolute and Path(config.backbone_absolute).is_dir():
        return Path(config.backbone_absolute), config.backbone_absolute
    try:
        found = resolve_checkpoint_dir(config.backbone)
    except CheckpointError as exc:
        raise CheckpointError(
            f"{folder / HEAD_CONFIG_NAME} references the backbone {config.backbone!r} (absolute: "
            f"{config.backbone_absolute!r}), which was not found: {exc}. Pass backbone=... to from_pretrained."
        ) from exc
    return found, str(found.resolve()) if _is_local(config.backbone) else config.backbone


def read_checkpoint(
    path: str | os.PathLike[str], *, backbone: str | os.PathLike[str] | None = None
) -> LoadedCheckpoint:
    """Detect the format of ``path`` and read its configs and tensors (CPU, stored dtype).

    Args:
        path: a local checkpoint folder or a hub id.
        backbone: for head-only checkpoints, a backbone folder or hub id that overrides the one in the config.
    """
    folder = resolve_checkpoint_dir(path)
    fmt = detect_format(folder)
    if fmt in ("release", "siglip"):
        loaded = _read_vision_folder(folder, fmt)
        if not _is_local(str(path)):
            loaded.backbone_ref = str(path)  # keep the hub id rather than a cache folder
        return loaded
    try:
        config = NearIDConfig.from_json_file(folder / HEAD_CONFIG_NAME)
    except (TypeError, ValueError) as exc:
        message = " ".join(str(exc).split())
        file = folder / HEAD_CONFIG_NAME
        raise CheckpointError(message if str(folder) in message else f"{file}: {message}") from exc
    base_folder, base_ref = _resolve_backbone_ref(config, folder, backbone)
    base_format = detect_format(base_folder)
    if base_format == "head":
        raise CheckpointError(f"the backbone of {folder} is itself a head-only checkpoint: {base_folder}")
    base = _read_vision_folder(base_folder, base_format)
    if base.backbone_type != config.backbone_type:
        raise CheckpointError(
            f"{folder / HEAD_CONFIG_NAME} says backbone_type {config.backbone_type!r} but {base_folder} holds a "
            f"{base.backbone_type!r} backbone"
        )
    if base.head_config.hidden_size != config.head.hidden_size:
        raise CheckpointError(
            f"head width {config.head.hidden_size} in {folder / HEAD_CONFIG_NAME} does not match the backbone width "
            f"{base.head_config.hidden_size} of {base_folder}"
        )
    head_state = load_safetensors(folder / HEAD_WEIGHTS_NAME)
    return LoadedCheckpoint(
        format="head",
        folder=folder,
        backbone_type=config.backbone_type,
        vision_config=base.vision_config,
        backbone_state=base.backbone_state,
        head_state=head_state,
        head_config=config.head,
        preprocess=config.preprocess,
        backbone_ref=base_ref,
        extra=dict(config.extra),
    )


def expected_head_shapes(config: HeadConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every head tensor for ``config`` (used to report mis-shaped checkpoints)."""
    d, m = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "probe": (1, 1, d),
        "attention.in_proj_weight": (3 * d, d),
        "attention.in_proj_bias": (3 * d,),
        "attention.out_proj.weight": (d, d),
        "attention.out_proj.bias": (d,),
        "layernorm.weight": (d,),
        "layernorm.bias": (d,),
        "mlp.fc1.weight": (m, d),
        "mlp.fc1.bias": (m,),
        "mlp.fc2.weight": (d, m),
        "mlp.fc2.bias": (d,),
    }
    if config.out_dim is not None:
        shapes["proj.weight"] = (config.out_dim, d)
        shapes["proj.bias"] = (config.out_dim,)
    return shapes


def check_state(
    state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str, *, strict_unexpected: bool = False
) -> None:
    """Raise :class:`CheckpointError` for missing or mis-shaped tensors; warn (or raise) about unexpected ones."""
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{what}: missing {len(missing)} tensor(s), e.g. {missing[:5]}")
    wrong = [
        f"{k}: expected {tuple(expected[k])}, got {tuple(state[k].shape)}"
        for k in sorted(expected)
        if tuple(state[k].shape) != tuple(expected[k])
    ]
    if wrong:
        raise CheckpointError(f"{what}: {len(wrong)} tensor(s) have the wrong shape: " + "; ".join(wrong[:5]))
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        message = f"{what}: {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:5]}"
        if strict_unexpected:
            raise CheckpointError(message)
        logger.warning("%s (ignored)", message)
