"""What the launcher needs from a host script's pipeline before it renders NearID's prompt set with it.

* **Text components.** Several diffusers DreamBooth scripts build their validation and final pipelines without text
  components and feed pre-computed prompt embeddings (Qwen-Image and HiDream with ``tokenizer=None,
  text_encoder=None``; ``train_dreambooth_lora.py --pre_compute_text_embeddings`` with ``text_encoder=None``).
  NearID renders text prompts, so :class:`TextComponents` loads the missing tokenizers and text encoders from the
  base model (``--pretrained_model_name_or_path``) once, on the pipeline's device and dtype, and puts them into the
  pipeline only while NearID renders (:meth:`TextComponents.filled`); the script's pipeline is left as it was.
  A component the script loads from elsewhere (HiDream's Llama: ``--pretrained_text_encoder_4_name_or_path``,
  ``--pretrained_tokenizer_4_name_or_path``, which need not be in the base model) comes from there, as for the script
  (:func:`text_component_sources`).
* **Conditioning.** :func:`host_conditioning` reads, from the script's parsed arguments, the conditioning options
  the pipeline's ``__call__`` takes (Sana's ``complex_human_instruction``, Lumina2's ``system_prompt``,
  ``max_sequence_length``) and the guidance scale of guidance-distilled transformers (Flux's ``--guidance_scale``),
  so NearID renders under the conditioning the run trains and validates with.
* **CPU offload.** Some scripts call ``pipeline.enable_model_cpu_offload()`` inside their ``log_validation``
  (Flux2-klein, Z-Image), which raises without an accelerator. :func:`offload_without_accelerator` turns that call
  into a warning on such a machine, so the script's validation (and NearID's) run with the pipeline where it is.

diffusers and transformers are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from nearid_reward.pipelines import from_pretrained_safetensors

logger = logging.getLogger(__name__)

__all__ = [
    "CONDITIONING_ARGUMENTS",
    "TextComponents",
    "base_model_index",
    "host_conditioning",
    "text_component_sources",
    "offload_without_accelerator",
]

TEXT_COMPONENT_PREFIXES = ("tokenizer", "text_encoder")
# Options of the host scripts that condition the prompt encoding, passed on when the pipeline's __call__ takes them.
CONDITIONING_ARGUMENTS = ("max_sequence_length", "complex_human_instruction", "system_prompt")


def base_model_index(base: str) -> dict[str, Any]:
    """The ``model_index.json`` of the base model (a local folder or a cached hub id)."""
    folder = Path(base)
    if folder.is_dir():
        return json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(base))


def _is_text_component(name: str) -> bool:
    return name.startswith(TEXT_COMPONENT_PREFIXES)


def _pipeline_device_and_dtype(pipeline: Any) -> tuple[torch.device, torch.dtype]:
    """Where the pipeline runs and the dtype of its frozen parts (the VAE's when it has one)."""
    device = getattr(pipeline, "_execution_device", None) or getattr(pipeline, "device", torch.device("cpu"))
    vae = getattr(pipeline, "vae", None)
    dtype = vae.dtype if isinstance(vae, torch.nn.Module) else getattr(pipeline, "dtype", torch.float32)
    return torch.device(device), dtype


class TextComponents:
    """The base model's tokenizers and text encoders, for pipelines the host script built without them.

    Each missing component is loaded once (from safetensors only) and kept; it is moved to the pipeline's device
    and dtype when a pipeline needs it.

    Args:
        base: the script's ``--pretrained_model_name_or_path``.
        sources: components the script loads from elsewhere than ``base``, by name (``"text_encoder_4"``) to a local
            folder or hub id (see :func:`text_component_sources`); these are loaded from there, not from ``base``.
    """

    def __init__(self, base: str, sources: Mapping[str, str] | None = None) -> None:
        self.base = base
        self.sources = dict(sources or {})
        self.loaded: dict[str, Any] = {}
        self._index: dict[str, Any] | None = None

    @property
    def index(self) -> dict[str, Any]:
        if self._index is None:
            self._index = base_model_index(self.base)
        return self._index

    def missing(self, pipeline: Any) -> list[str]:
        """Text components the base model has (or :attr:`sources` names) and ``pipeline`` was built without
        (``None``): the base model's in index order, then the others."""
        components = getattr(pipeline, "components", {})
        available = [name for name, spec in self.index.items()
                     if _is_text_component(name) and ((isinstance(spec, list) and spec[0] is not None)
                                                       or name in self.sources)]
        available += [name for name in self.sources if name not in available and _is_text_component(name)]
        return [name for name in available if name in components and components[name] is None]

    def load(self, name: str, device: torch.device, dtype: torch.dtype) -> Any:
        """Component ``name`` from the base model or its source (loaded on first use), on ``device`` in ``dtype``
        for a model."""
        if name not in self.loaded:
            where, folder = (self.sources[name], {}) if name in self.sources else (self.base, {"subfolder": name})
            cls = self._component_class(name)
            if issubclass(cls, torch.nn.Module):
                module = from_pretrained_safetensors(cls, where, dtype=dtype, **folder)
                self.loaded[name] = module.requires_grad_(False).eval()
            else:  # a tokenizer: no weights
                self.loaded[name] = cls.from_pretrained(where, **folder)
            logger.info("NearID renders text prompts: loaded %s (%s) from %s", name, cls.__name__, where)
        component = self.loaded[name]
        if isinstance(component, torch.nn.Module):
            component.to(device=device, dtype=dtype)
        return component

    def _component_class(self, name: str) -> type:
        """The class of component ``name``: the base model's index says it; for a :attr:`sources` component, the
        architecture in its ``config.json`` (a text encoder) or ``AutoTokenizer`` (a tokenizer)."""
        if name not in self.sources:
            library, class_name = self.index[name]
            return getattr(importlib.import_module(library), class_name)
        import transformers

        if name.startswith("tokenizer"):
            return transformers.AutoTokenizer
        architectures = transformers.AutoConfig.from_pretrained(self.sources[name]).architectures or []
        cls = getattr(transformers, architectures[0], None) if architectures else None
        if cls is None:
            raise ValueError(f"{name} from {self.sources[name]}: its config.json must name a transformers "
                             f"architecture, got {architectures!r}")
        return cls

    @contextlib.contextmanager
    def filled(self, pipeline: Any) -> Iterator[list[str]]:
        """Inside the block ``pipeline`` has every text component; yields the names that were filled in."""
        names = self.missing(pipeline)
        if not names:
            yield []
            return
        device, dtype = _pipeline_device_and_dtype(pipeline)
        pipeline.register_modules(**{name: self.load(name, device, dtype) for name in names})
        try:
            yield names
        finally:
            pipeline.register_modules(**dict.fromkeys(names))


def text_component_sources(args: Any) -> dict[str, str]:
    """Text components the host script loads from their own flag instead of the base model, by name.

    A flag ``--pretrained_<name>_name_or_path`` of the script (HiDream's ``--pretrained_text_encoder_4_name_or_path``
    and ``--pretrained_tokenizer_4_name_or_path``, the Llama that HiDream loads apart from its base model) names where
    component ``<name>`` comes from; unset flags are left out.
    """
    sources = {}
    for flag, value in sorted(vars(args).items()):
        name = flag.removeprefix("pretrained_").removesuffix("_name_or_path")
        if flag.startswith("pretrained_") and flag.endswith("_name_or_path") and _is_text_component(name) and value:
            sources[name] = str(value)
    return sources


def host_conditioning(args: Any, base: str) -> tuple[dict[str, Any], float | None]:
    """The conditioning of the host script's validations: ``(pipeline kwargs, guidance scale or None)``.

    * Each of :data:`CONDITIONING_ARGUMENTS` that the script has (``args.<name>``, its default included) and the base
      pipeline's ``__call__`` takes is passed as it is: e.g. the Sana script's ``--complex_human_instruction``
      (None by default, which turns off the long instruction the pipeline would otherwise prepend).
    * The guidance scale is the script's ``--guidance_scale`` when the base transformer is guidance-distilled
      (``guidance_embeds`` in its config, as Flux.1-dev); otherwise None (the pipeline's default or
      ``--nearid_guidance_scale``).
    """
    index = base_model_index(base)
    import diffusers

    pipeline_class = getattr(diffusers, str(index.get("_class_name")), None)
    params = inspect.signature(pipeline_class.__call__).parameters if pipeline_class is not None else {}
    kwargs = {name: getattr(args, name) for name in CONDITIONING_ARGUMENTS if hasattr(args, name) and name in params}
    guidance = None
    spec = index.get("transformer")
    if getattr(args, "guidance_scale", None) is not None and isinstance(spec, list) and spec[0] is not None:
        config = getattr(diffusers, spec[1]).load_config(base, subfolder="transformer")
        if config.get("guidance_embeds"):
            guidance = float(args.guidance_scale)
    return kwargs, guidance


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


@contextlib.contextmanager
def offload_without_accelerator(pipeline: Any) -> Iterator[None]:
    """Inside the block, on a machine without an accelerator, ``pipeline.enable_model_cpu_offload()`` (and the
    sequential variant) warn and leave the pipeline where it is instead of raising; elsewhere nothing changes."""
    names = [n for n in ("enable_model_cpu_offload", "enable_sequential_cpu_offload") if hasattr(pipeline, n)]
    if not names or _accelerator_available():
        yield
        return

    def skipped(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> None:
            logger.warning("the training script calls pipeline.%s(), which needs an accelerator (none here): the "
                           "pipeline stays on %s for this validation", name, getattr(pipeline, "device", "cpu"))

        return call

    for name in names:
        object.__setattr__(pipeline, name, skipped(name))
    try:
        yield
    finally:
        for name in names:
            pipeline.__dict__.pop(name, None)
