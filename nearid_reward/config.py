"""Artifact configs saved beside NearID weights: the preprocessing, the head, and the head-only checkpoint.

These are plain dataclasses serialised as JSON (``indent=2, sort_keys=True``). Unknown keys are reported with a
warning and ignored, so a checkpoint written by a newer version of the library still loads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ._version import __version__

logger = logging.getLogger(__name__)

__all__ = [
    "PreprocessConfig",
    "HeadConfig",
    "NearIDConfig",
    "HEAD_CONFIG_NAME",
    "HEAD_WEIGHTS_NAME",
    "RESAMPLE_NAMES",
    "with_overrides",
    "DTYPE_NAMES",
    "parse_dtype",
]

HEAD_CONFIG_NAME = "nearid_config.json"
HEAD_WEIGHTS_NAME = "head.safetensors"
HEAD_FORMAT = "nearid-head"
HEAD_FORMAT_VERSION = 1

# PIL resampling codes as stored in HF ``preprocessor_config.json`` files.
RESAMPLE_NAMES: dict[int, str] = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _known_fields(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        logger.warning("%s: ignoring unknown config keys %s (written by a newer version?)", where, unknown)
    return {k: v for k, v in data.items() if k in names}


def _check_type(owner: str, name: str, value: Any, kinds: tuple[type, ...], expected: str) -> None:
    """Raise ``TypeError`` naming ``owner.name`` unless ``value`` is one of ``kinds`` (a bool is not a number)."""
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise TypeError(f"{owner}.{name} must be {expected}, got {value!r}")


def _processor_value(data: dict[str, Any], key: str, default: Any, cast: type) -> Any:
    """``cast(data[key])`` (``default`` if absent) of a ``preprocessor_config.json``; ``ValueError`` names the key."""
    value = data.get(key, default)
    expected = "an integer" if cast is int else "a number"
    wrong = isinstance(value, (list, dict, bool))
    wrong = wrong or (cast is int and isinstance(value, float) and not value.is_integer())
    try:
        if not wrong:
            return cast(value)
    except (TypeError, ValueError):
        pass
    raise ValueError(f"preprocessor config field {key!r} must be {expected}, got {value!r}")


def with_overrides(config: Any, config_cls: type, overrides: dict[str, Any], owner: str) -> Any:
    """``config`` (or a default ``config_cls()``) with keyword ``overrides`` applied, validated.

    Raises ``TypeError`` naming ``owner`` for a config of the wrong type or unknown option names.
    """
    base = config if config is not None else config_cls()
    if not isinstance(base, config_cls):
        raise TypeError(f"`config` must be a {config_cls.__name__}, got {type(base).__name__}")
    if not overrides:
        return base
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"{owner} got unknown options {unknown}; valid options: {sorted(known)}")
    return dataclasses.replace(base, **overrides)


@dataclass
class PreprocessConfig:
    """How images become model inputs; mirrors the checkpoint's HF image processor.

    Attributes:
        mode: ``"fixed"`` (SigLIP: resize to ``height`` x ``width``) or ``"naflex"`` (SigLIP2 NaFlex: resize keeping
            the aspect ratio to at most ``max_num_patches`` patches of ``patch_size``).
        height, width: target size in pixels for ``"fixed"``.
        patch_size, max_num_patches: patch geometry for ``"naflex"``.
        resample: PIL resampling code (2 bilinear, 3 bicubic, 0 nearest); the tensor path supports these three.
        rescale_factor: multiplies 0..255 pixel values (1/255 maps them to [0, 1]).
        image_mean, image_std: per-channel normalisation applied after rescaling.
    """

    mode: Literal["fixed", "naflex"] = "fixed"
    height: int = 384
    width: int = 384
    patch_size: int = 16
    max_num_patches: int = 256
    resample: int = 3
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1.0 / 255.0
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    do_convert_rgb: bool = True

    def __post_init__(self) -> None:
        for name in ("height", "width", "patch_size", "max_num_patches", "resample"):
            _check_type("PreprocessConfig", name, getattr(self, name), (int,), "an integer")
        for name in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            _check_type("PreprocessConfig", name, getattr(self, name), (bool,), "true or false")
        _check_type("PreprocessConfig", "rescale_factor", self.rescale_factor, (int, float), "a number")
        if self.mode not in ("fixed", "naflex"):
            raise ValueError(f"PreprocessConfig.mode must be 'fixed' or 'naflex', got {self.mode!r}")
        self.image_mean = _triple(self.image_mean, "image_mean")
        self.image_std = _triple(self.image_std, "image_std")
        if any(s <= 0 for s in self.image_std):
            raise ValueError(f"PreprocessConfig.image_std must be positive, got {self.image_std}")
        if self.resample not in RESAMPLE_NAMES:
            raise ValueError(
                f"PreprocessConfig.resample must be a PIL code in {sorted(RESAMPLE_NAMES)}, got {self.resample}"
            )
        for name in ("height", "width", "patch_size", "max_num_patches"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"PreprocessConfig.{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_processor_dict(cls, data: dict[str, Any], *, image_size: int | None = None) -> PreprocessConfig:
        """Read an HF ``preprocessor_config.json`` dict (SiglipImageProcessor or Siglip2ImageProcessor)."""
        kind = str(data.get("image_processor_type", ""))
        where = "preprocessor config field"
        common: dict[str, Any] = {
            "resample": _processor_value(data, "resample", 2 if "Siglip2" in kind else 3, int),
            "do_resize": bool(data.get("do_resize", True)),
            "do_rescale": bool(data.get("do_rescale", True)),
            "rescale_factor": _processor_value(data, "rescale_factor", 1.0 / 255.0, float),
            "do_normalize": bool(data.get("do_normalize", True)),
            "image_mean": tuple(_as_list(data.get("image_mean", (0.5, 0.5, 0.5)), f"{where} 'image_mean'")),
            "image_std": tuple(_as_list(data.get("image_std", (0.5, 0.5, 0.5)), f"{where} 'image_std'")),
            "do_convert_rgb": data.get("do_convert_rgb") is not False,
        }
        if "max_num_patches" in data or "Siglip2" in kind:
            return cls(
                mode="naflex",
                patch_size=_processor_value(data, "patch_size", 16, int),
                max_num_patches=_processor_value(data, "max_num_patches", 256, int),
                **common,
            )
        size = data.get("size") or {}
        if not isinstance(size, dict):
            raise ValueError(f"preprocessor config field 'size' must be an object like {{'height': 384, "
                             f"'width': 384}}, got {size!r}")
        if "height" in size and "width" in size:
            height, width = _processor_value(size, "height", None, int), _processor_value(size, "width", None, int)
        elif "shortest_edge" in size:
            height = width = _processor_value(size, "shortest_edge", None, int)
        elif image_size is not None:
            height = width = int(image_size)
        else:
            raise ValueError(f"preprocessor config has no usable 'size' (got {size!r}) and no image_size was given")
        return cls(mode="fixed", height=height, width=width, **common)

    def to_processor_dict(self) -> dict[str, Any]:
        """The equivalent HF ``preprocessor_config.json`` content."""
        out: dict[str, Any] = {
            "do_convert_rgb": self.do_convert_rgb,
            "do_normalize": self.do_normalize,
            "do_rescale": self.do_rescale,
            "do_resize": self.do_resize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "resample": self.resample,
            "rescale_factor": self.rescale_factor,
        }
        if self.mode == "naflex":
            out.update(image_processor_type="Siglip2ImageProcessor", patch_size=self.patch_size,
                       max_num_patches=self.max_num_patches)
        else:
            out.update(image_processor_type="SiglipImageProcessor", size={"height": self.height, "width": self.width})
        return out

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["image_mean"] = list(self.image_mean)
        data["image_std"] = list(self.image_std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        return cls(**_known_fields(cls, data, "PreprocessConfig"))


@dataclass
class HeadConfig:
    """Shape of the multi-head attention pooling (MAP) head.

    Attributes:
        hidden_size: token width D of the backbone (and of the head's probe, attention and MLP).
        num_attention_heads: attention heads of the pooling attention (D must divide evenly).
        intermediate_size: width of the head's MLP.
        layer_norm_eps: epsilon of the head's LayerNorm.
        hidden_act: activation of the MLP (transformers name, e.g. ``"gelu_pytorch_tanh"``).
        out_dim: optional output projection width; ``None`` means no projection (embedding width D).
    """

    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    out_dim: int | None = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_attention_heads", "intermediate_size"):
            _check_type("HeadConfig", name, getattr(self, name), (int,), "an integer")
        _check_type("HeadConfig", "layer_norm_eps", self.layer_norm_eps, (int, float), "a number")
        _check_type("HeadConfig", "hidden_act", self.hidden_act, (str,), "a string")
        _check_type("HeadConfig", "out_dim", self.out_dim, (int, type(None)), "an integer or null")
        for name in ("hidden_size", "num_attention_heads", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"HeadConfig.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"HeadConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.out_dim is not None and self.out_dim <= 0:
            raise ValueError(f"HeadConfig.out_dim must be positive or None, got {self.out_dim}")

    @property
    def embed_dim(self) -> int:
        return self.out_dim if self.out_dim is not None else self.hidden_size

    @classmethod
    def from_vision_config(cls, vision: Any) -> HeadConfig:
        return cls(
            hidden_size=int(vision.hidden_size),
            num_attention_heads=int(vision.num_attention_heads),
            intermediate_size=int(vision.intermediate_size),
            layer_norm_eps=float(vision.layer_norm_eps),
            hidden_act=str(vision.hidden_act),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadConfig:
        return cls(**_known_fields(cls, data, "HeadConfig"))


@dataclass
class NearIDConfig:
    """The config of the project's head-only checkpoint (``nearid_config.json`` beside ``head.safetensors``).

    The frozen backbone is referenced, not copied: ``backbone`` is a folder (stored relative to the checkpoint
    folder when possible) or a hub id; ``backbone_absolute`` is a fallback absolute path.

    Attributes:
        backbone: path (relative to this checkpoint folder) or hub id of the backbone checkpoint.
        backbone_type: ``"siglip"`` (fixed resolution) or ``"siglip2"`` (NaFlex).
        head: the MAP head's shape.
        preprocess: how images are turned into model inputs.
        backbone_absolute: absolute path of the backbone when it was saved, tried if ``backbone`` is not found.
        normalize_embeddings: embeddings are L2-normalised (always true for this library).
        library_version: version of nearid-reward that wrote the file.
        extra: free-form metadata (e.g. training step and validation SSR).
    """

    backbone: str
    backbone_type: Literal["siglip", "siglip2"]
    head: HeadConfig
    preprocess: PreprocessConfig
    backbone_absolute: str | None = None
    normalize_embeddings: bool = True
    library_version: str = __version__
    format: str = HEAD_FORMAT
    format_version: int = HEAD_FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_type("NearIDConfig", "backbone", self.backbone, (str,), "a string (a folder or a hub id)")
        _check_type("NearIDConfig", "backbone_absolute", self.backbone_absolute, (str, type(None)), "a string or null")
        _check_type("NearIDConfig", "extra", self.extra, (dict,), "an object")
        if self.backbone_type not in ("siglip", "siglip2"):
            raise ValueError(f"NearIDConfig.backbone_type must be 'siglip' or 'siglip2', got {self.backbone_type!r}")
        if self.format != HEAD_FORMAT:
            raise ValueError(f"NearIDConfig.format must be {HEAD_FORMAT!r}, got {self.format!r}")
        if int(self.format_version) > HEAD_FORMAT_VERSION:
            logger.warning(
                "head checkpoint format_version %s is newer than this library understands (%s); loading anyway",
                self.format_version, HEAD_FORMAT_VERSION,
            )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["head"] = dataclasses.asdict(self.head)
        data["preprocess"] = self.preprocess.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NearIDConfig:
        data = _known_fields(cls, data, "NearIDConfig")
        for required in ("backbone", "backbone_type", "head", "preprocess"):
            if required not in data:
                raise ValueError(f"{HEAD_CONFIG_NAME} is missing the required key {required!r}")
        for name in ("head", "preprocess"):
            _check_type("NearIDConfig", name, data[name], (dict,), "an object")
        data["head"] = HeadConfig.from_dict(data["head"])
        data["preprocess"] = PreprocessConfig.from_dict(data["preprocess"])
        return cls(**data)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> NearIDConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)


def _as_list(value: Any, what: str) -> list[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] * 3
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    ):
        raise ValueError(f"{what} must be a number or a list of 3 numbers (one per RGB channel), got {value!r}")
    return [float(v) for v in value]


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    values = _as_list(value, f"PreprocessConfig.{name}")
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise ValueError(f"PreprocessConfig.{name} must have 3 values (one per RGB channel), got {values}")
    return (values[0], values[1], values[2])


# ---------------------------------------------------------------------------------------------- dtypes
#: Accepted dtype spellings: torch's names and the accelerate/diffusers short forms (``no`` is accelerate's "no
#: mixed precision", i.e. float32).
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "no": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(value: str | torch.dtype, *, name: str = "dtype") -> torch.dtype:
    """The torch dtype that ``value`` names (a key of :data:`DTYPE_NAMES`, or a floating ``torch.dtype``).

    Raises:
        ValueError: naming ``name``, the accepted spellings and what came.
    """
    if isinstance(value, torch.dtype):
        if value in DTYPE_NAMES.values():
            return value
    elif isinstance(value, str) and value.strip().lower().removeprefix("torch.") in DTYPE_NAMES:
        return DTYPE_NAMES[value.strip().lower().removeprefix("torch.")]
    raise ValueError(f"{name}: expected one of {', '.join(DTYPE_NAMES)} (or a float torch.dtype); got {value!r}")
