"""Rendering a fixed, seeded validation prompt set from a diffusers pipeline (with and without its LoRA adapter).

Seeds are disjoint from training seeds (offset by ``10**8`` by default), identical across validations and
checkpoints, and identical between the adapted and the base model, so scores are paired. Rendering never casts or
moves the pipeline's modules (the training UNet is shared), works with ``enable_model_cpu_offload`` pipelines,
and restores every module's train/eval mode and every adapter tensor's ``requires_grad`` afterwards.

diffusers is never imported here: the functions only call methods of the pipeline they are given. The adapter
helpers used while rendering (``denoiser_of``, ``has_active_adapter``, ``adapters_disabled``) live in
:mod:`nearid_reward.adapters` and are re-exported here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adapters import adapters_disabled, denoiser_of, has_active_adapter, pipeline_modules
from .images import to_rgb

__all__ = [
    "PromptSet",
    "RenderConfig",
    "RenderedSet",
    "render_images",
    "render_validation_set",
    "denoiser_of",
    "has_active_adapter",
    "adapters_disabled",
    "quiet_eval_mode",
]

logger = logging.getLogger(__name__)

PROMPTS_FORMAT = "nearid-prompts"
_PLACEHOLDER = re.compile(r"\{(token|class)?\}")


# ---------------------------------------------------------------------------------------------- prompt sets
@dataclass
class PromptSet:
    """Validation prompts: ``instance`` prompts show the subject, ``class_prompts`` should not (leakage).

    Templates use ``{token}`` (instance token, e.g. ``sks``) and ``{class}`` (class noun, e.g. ``dog``); a bare
    ``{}`` stands for ``"{token} {class}"``. :meth:`fill` substitutes them.

    Example:
        >>> PromptSet(["a photo of {}"], ["a photo of a {class}"]).fill("sks", "dog").instance
        ['a photo of sks dog']
    """

    instance: list[str]
    class_prompts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("instance", "class_prompts"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise TypeError(f"PromptSet.{name} must be a list of strings, got {type(value).__name__}")
            if not all(isinstance(p, str) and p.strip() for p in value):
                raise ValueError(f"PromptSet.{name} must contain non-empty strings, got {list(value)!r}")
            setattr(self, name, list(value))
        if not self.instance:
            raise ValueError("PromptSet.instance is empty: give at least one prompt that shows the subject")

    @classmethod
    def default(cls) -> PromptSet:
        """The identity prompt set shipped with the package (``nearid_reward/data/prompts.json``), unfilled."""
        text = resources.files("nearid_reward").joinpath("data/prompts.json").read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text), where="nearid_reward/data/prompts.json")

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> PromptSet:
        """Read a prompt file: JSON ``{"instance": [...], "class": [...]}`` or plain text (one instance prompt per
        line); ``None`` loads :meth:`default`."""
        if path is None:
            return cls.default()
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"prompt file not found: {file}")
        text = file.read_text(encoding="utf-8")
        if file.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"prompt file {file} is not valid JSON: {exc}") from exc
            return cls.from_dict(data, where=str(file))
        lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        return cls(lines)

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "prompt set") -> PromptSet:
        if isinstance(data, list):
            return cls(data)
        if not isinstance(data, dict) or "instance" not in data:
            raise ValueError(f"{where}: expected a JSON object with an 'instance' list (and optionally 'class')")
        return cls(data["instance"], data.get("class", []))

    def to_dict(self) -> dict[str, Any]:
        return {"format": PROMPTS_FORMAT, "version": 1, "instance": self.instance, "class": self.class_prompts}

    @property
    def has_placeholders(self) -> bool:
        return any(_PLACEHOLDER.search(p) for p in self.instance + self.class_prompts)

    def fill(self, token: str, class_noun: str) -> PromptSet:
        """Substitute ``{token}``, ``{class}`` and ``{}``; whitespace left by an empty value is collapsed.

        Without a class noun, class prompts that need one are dropped (they would not name any class).
        """

        def sub(prompt: str) -> str:
            text = prompt.replace("{}", "{token} {class}").replace("{token}", token).replace("{class}", class_noun)
            return " ".join(text.split())

        class_prompts = [p for p in self.class_prompts if class_noun.strip() or not _PLACEHOLDER.search(p)]
        if len(class_prompts) < len(self.class_prompts):
            logger.info("no class noun given: %d class prompts dropped", len(self.class_prompts) - len(class_prompts))
        return PromptSet([sub(p) for p in self.instance], [sub(p) for p in class_prompts])


# ---------------------------------------------------------------------------------------------- configs
@dataclass
class RenderConfig:
    """How validation images are rendered.

    Attributes:
        num_inference_steps: sampler steps per image.
        guidance_scale: classifier-free guidance scale (None: the pipeline's default).
        height, width: image size in pixels (None: the pipeline's default); kept even by pipelines that rescale
            every request to their default area (HiDream), see :func:`requested_area_kept`.
        images_per_prompt: images rendered per prompt, each with its own seed.
        seed_offset: image ``j`` of prompt ``i`` uses seed ``seed_offset + i * images_per_prompt + j``; the default
            ``10**8`` keeps validation seeds away from training seeds.
        batch_size: images per pipeline call.
        negative_prompt: optional negative prompt for every image.
        render_base: also render the base model (adapter disabled) with the same seeds when an adapter is active.
        render_class: also render the class prompts (class-prompt leakage).
        pipeline_kwargs: extra keyword arguments for the pipeline call.
        scheduler: render with this diffusers scheduler class (e.g. ``"DDIMScheduler"``, built from the pipeline's
            scheduler config and swapped back afterwards), so that renders stay comparable when a training script
            changes its pipeline's scheduler; ``"auto"`` uses DDIM except on flow-matching pipelines (kept as they
            are); None renders with whatever scheduler the pipeline has.
    """

    num_inference_steps: int = 25
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    images_per_prompt: int = 1
    seed_offset: int = 10**8
    batch_size: int = 4
    negative_prompt: str | None = None
    render_base: bool = True
    render_class: bool = True
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)
    scheduler: str | None = None

    def __post_init__(self) -> None:
        if self.scheduler is not None and not isinstance(self.scheduler, str):
            raise TypeError(f"RenderConfig.scheduler must be a scheduler class name, 'auto' or None, "
                            f"got {type(self.scheduler).__name__}")
        for name in ("num_inference_steps", "images_per_prompt", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"RenderConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and int(value) < 8:
                raise ValueError(f"RenderConfig.{name} must be >= 8 pixels or None, got {value}")
        if int(self.seed_offset) < 0:
            raise ValueError(f"RenderConfig.seed_offset must be >= 0, got {self.seed_offset}")

    def seeds(self, num_prompts: int) -> list[int]:
        return [self.seed_offset + i for i in range(num_prompts * self.images_per_prompt)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
            "height": self.height, "width": self.width, "images_per_prompt": self.images_per_prompt,
            "seed_offset": self.seed_offset, "negative_prompt": self.negative_prompt,
            "pipeline_kwargs": {k: repr(v) for k, v in sorted(self.pipeline_kwargs.items())},
            "scheduler": self.scheduler,
        }  # fmt: skip


@dataclass
class RenderedSet:
    """Images of one validation pass; tensors are float32 ``[N, 3, H, W]`` in [0, 1] on the CPU.

    Attributes:
        images: instance-prompt images with the adapter (or the model as it is).
        prompts: the prompt of each image (``N`` entries).
        seeds: the seed of each image.
        base_images: the same prompts and seeds with the adapter disabled, or None (no adapter / not asked).
        class_images: class-prompt images with the adapter, or None.
        class_prompts: the prompt of each class image.
    """

    images: torch.Tensor
    prompts: list[str]
    seeds: list[int]
    base_images: torch.Tensor | None = None
    class_images: torch.Tensor | None = None
    class_prompts: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- pipeline state
@contextlib.contextmanager
def quiet_eval_mode(pipeline: Any) -> Iterator[None]:
    """Eval mode and a silent progress bar inside the block; every submodule's previous mode is restored."""
    modes = [(m, m.training) for comp in pipeline_modules(pipeline) for m in comp.modules()]
    previous_bar = getattr(pipeline, "_progress_bar_config", None)
    previous_bar = dict(previous_bar) if isinstance(previous_bar, dict) else None
    for comp in pipeline_modules(pipeline):
        comp.eval()
    if hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        if previous_bar is None:
            if hasattr(pipeline, "_progress_bar_config"):
                del pipeline._progress_bar_config
        else:
            pipeline._progress_bar_config = previous_bar


# ---------------------------------------------------------------------------------------------- rendering
def _to_unit_tensor(images: Any) -> torch.Tensor:
    """Pipeline output (``output_type="pt"`` tensor, numpy or PIL list) -> float32 ``[N, 3, H, W]`` CPU in [0, 1]."""
    if isinstance(images, torch.Tensor):
        out = images.detach().float().cpu()
        if out.ndim == 4 and out.shape[1] != 3 and out.shape[-1] == 3:
            out = out.permute(0, 3, 1, 2)
        return out.clamp(0, 1)
    if isinstance(images, np.ndarray):
        arr = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().clamp(0, 1)
    if isinstance(images, (list, tuple)) and images:
        arrays = [np.asarray(to_rgb(img), dtype=np.float32) / 255.0 for img in images]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    raise TypeError(f"unexpected pipeline output {type(images).__name__}; expected tensors, numpy arrays or PIL")


@contextlib.contextmanager
def scheduler_swapped(pipeline: Any, name: str | None) -> Iterator[None]:
    """Render with the diffusers scheduler class ``name`` inside the block (see :attr:`RenderConfig.scheduler`)."""
    current = getattr(pipeline, "scheduler", None)
    if name is None or current is None:
        yield
        return
    if name == "auto":
        name = None if type(current).__name__.startswith("FlowMatch") else "DDIMScheduler"
        if name is None or type(current).__name__ == name:
            yield
            return
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"RenderConfig.scheduler={name!r} is not a diffusers scheduler class")
    pipeline.scheduler = cls.from_config(current.config)
    try:
        yield
    finally:
        pipeline.scheduler = current


# Pipelines whose ``__call__`` rescales every requested size to the area of their default size (aspect ratio kept):
# asked for 32 px, HiDream renders 1024 px (256 px for a tiny one). The area follows ``default_sample_size``.
_AREA_RESCALING_PIPELINES = ("HiDreamImagePipeline",)


@contextlib.contextmanager
def requested_area_kept(pipeline: Any, height: int | None, width: int | None) -> Iterator[None]:
    """Inside the block, a pipeline that rescales requests to its default area renders ``height`` x ``width``.

    Other pipelines, or no size requested: nothing changes. The pipeline's ``default_sample_size`` (latent pixels) is
    set so that its area is the requested one, and restored afterwards.
    """
    if height is None or width is None or type(pipeline).__name__ not in _AREA_RESCALING_PIPELINES:
        yield
        return
    current = pipeline.default_sample_size
    pipeline.default_sample_size = max(1, round((height * width) ** 0.5 / pipeline.vae_scale_factor))
    try:
        yield
    finally:
        pipeline.default_sample_size = current


def render_images(
    pipeline: Any,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int],
    config: RenderConfig | None = None,
) -> torch.Tensor:
    """Render one image per ``(prompt, seed)`` pair.

    Args:
        pipeline: a diffusers text-to-image pipeline (its modules are neither cast nor moved).
        prompts: ``N`` prompts.
        seeds: ``N`` seeds; each image gets its own CPU ``torch.Generator`` so results do not depend on batching.
        config: sampling options (steps, guidance, size, batch size, extra kwargs).

    Returns:
        float32 ``[N, 3, H, W]`` in [0, 1] on the CPU.
    """
    cfg = config or RenderConfig()
    prompts = list(prompts)
    seeds = [int(s) for s in seeds]
    if not prompts:
        raise ValueError("`prompts` is empty: nothing to render")
    if len(prompts) != len(seeds):
        raise ValueError(f"`prompts` and `seeds` must have the same length, got {len(prompts)} and {len(seeds)}")
    outputs: list[torch.Tensor] = []
    with (
        quiet_eval_mode(pipeline),
        torch.no_grad(),
        scheduler_swapped(pipeline, cfg.scheduler),
        requested_area_kept(pipeline, cfg.height, cfg.width),
    ):
        for start in range(0, len(prompts), cfg.batch_size):
            batch = prompts[start : start + cfg.batch_size]
            kwargs: dict[str, Any] = {
                "prompt": batch,
                "num_inference_steps": cfg.num_inference_steps,
                "generator": [torch.Generator("cpu").manual_seed(s) for s in seeds[start : start + cfg.batch_size]],
                "output_type": "pt",
            }
            if cfg.guidance_scale is not None:
                kwargs["guidance_scale"] = cfg.guidance_scale
            if cfg.height is not None:
                kwargs["height"] = cfg.height
            if cfg.width is not None:
                kwargs["width"] = cfg.width
            if cfg.negative_prompt is not None:
                kwargs["negative_prompt"] = [cfg.negative_prompt] * len(batch)
            kwargs.update(cfg.pipeline_kwargs)
            result = pipeline(**kwargs)
            images = result.images if hasattr(result, "images") else result[0]
            outputs.append(_to_unit_tensor(images))
    return torch.cat(outputs)


def render_validation_set(pipeline: Any, prompts: PromptSet, *, config: RenderConfig | None = None) -> RenderedSet:
    """Render a filled prompt set: instance images, the base model's images (same seeds) and class images.

    The base model is rendered only when the pipeline has an active adapter and ``config.render_base`` is set;
    class images only when the set has class prompts and ``config.render_class`` is set.
    """
    cfg = config or RenderConfig()
    if prompts.has_placeholders:
        raise ValueError(
            "the prompt set still contains {token}/{class} placeholders: call prompts.fill(instance_token, class_noun)"
        )
    per = cfg.images_per_prompt
    inst_prompts = [p for p in prompts.instance for _ in range(per)]
    inst_seeds = cfg.seeds(len(prompts.instance))
    images = render_images(pipeline, inst_prompts, seeds=inst_seeds, config=cfg)
    class_prompts = [p for p in prompts.class_prompts for _ in range(per)] if cfg.render_class else []
    class_images = None
    if class_prompts:
        class_images = render_images(pipeline, class_prompts, seeds=cfg.seeds(len(prompts.class_prompts)), config=cfg)
    base_images = None
    if cfg.render_base and has_active_adapter(pipeline):
        with adapters_disabled(pipeline):
            base_images = render_images(pipeline, inst_prompts, seeds=inst_seeds, config=cfg)
    return RenderedSet(
        images=images, prompts=inst_prompts, seeds=inst_seeds, base_images=base_images, class_images=class_images,
        class_prompts=class_prompts,
    )  # fmt: skip


def __getattr__(name: str) -> Any:
    """Deprecated names of this module (``inference_mode`` is :func:`quiet_eval_mode`; removed in 0.3)."""
    if name == "inference_mode":
        import warnings

        warnings.warn("nearid_reward.rendering.inference_mode is deprecated: use quiet_eval_mode (it is not "
                      "torch.inference_mode)", DeprecationWarning, stacklevel=2)
        return quiet_eval_mode
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
