"""``NearIDModel``: a frozen SigLIP vision backbone (transformers) plus the NearID MAP head."""

from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedConfig

from .config import HEAD_CONFIG_NAME, HEAD_WEIGHTS_NAME, NearIDConfig, PreprocessConfig
from .files import save_safetensors_atomic, write_json_atomic
from .head import MAPHead
from .images import ImageInput, check_image_tensor, check_value_range, to_pil_list
from .preprocess import PixelInputs, preprocess_pil, preprocess_tensor
from .weight_formats import (
    RELEASE_PREFIX,
    RELEASE_VISION_FIELDS,
    BackboneType,
    LoadedCheckpoint,
    check_state,
    expected_head_shapes,
    read_checkpoint,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

__all__ = ["NearIDModel", "as_nearid_model", "check_chunk_size", "mean_pool_tokens", "Pooling"]

SaveFormat = Literal["head", "release"]
Pooling = Literal["head", "mean"]
POOLINGS: tuple[str, ...] = ("head", "mean")


def mean_pool_tokens(tokens: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Masked mean of backbone tokens, L2-normalised: the CLIP-I / DINO-style baseline embedding.

    Args:
        tokens: ``[B, N, D]`` final backbone tokens.
        token_mask: ``[B, N]`` (1 = real token, 0 = padding), or None when every token is real.

    Returns:
        ``[B, D]`` embeddings with unit norm, float32 (float64 for float64 tokens).

    Example:
        >>> emb = mean_pool_tokens(torch.tensor([[[3.0, 0.0], [1.0, 0.0]], [[0.0, 2.0], [0.0, 9.0]]]),
        ...                        torch.tensor([[1, 1], [1, 0]]))
        >>> emb.tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    x = tokens.to(torch.promote_types(tokens.dtype, torch.float32))  # [B, N, D]
    if token_mask is None:
        return F.normalize(x.mean(1), dim=-1)
    w = token_mask.to(x.dtype).unsqueeze(-1)  # [B, N, 1]
    return F.normalize((x * w).sum(1) / w.sum(1).clamp(min=1), dim=-1)


def check_pooling(pooling: Any, name: str = "pooling") -> Pooling:
    if pooling not in POOLINGS:
        raise ValueError(f"`{name}` must be 'head' or 'mean', got {pooling!r}")
    return pooling  # type: ignore[no-any-return]


def check_chunk_size(chunk_size: Any, name: str = "chunk_size", *, allow_none: bool = True) -> int | None:
    """Validate a number of images per backbone call: an int >= 1 (or None when ``allow_none``).

    Raises:
        TypeError: not an int (bools and floats included).
        ValueError: below 1.
    """
    expected = f"`{name}` must be an int >= 1 (images per backbone call)" + (" or None" if allow_none else "")
    if chunk_size is None and allow_none:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"{expected}; got {type(chunk_size).__name__} {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"{expected}; got {chunk_size}")
    return int(chunk_size)


def _build_backbone(
    kind: BackboneType, vision_config: PreTrainedConfig, *, attn_implementation: str, dtype: torch.dtype | None
) -> PreTrainedModel:
    """A transformers SigLIP vision model *without* its pooling head (so the original head never runs)."""
    # transformers' modeling code is imported here, not at module level: it pulls in accelerate when installed.
    from transformers import Siglip2VisionModel, SiglipVisionModel

    config = vision_config.__class__.from_dict(vision_config.to_dict())
    config.vision_use_head = False
    model_cls = SiglipVisionModel if kind == "siglip" else Siglip2VisionModel
    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:  # skip random initialisation: every weight is overwritten from the checkpoint
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        return model_cls._from_config(config, **kwargs)
    with no_init_weights():
        return model_cls._from_config(config, **kwargs)


class NearIDModel(nn.Module):
    """Frozen SigLIP/SigLIP2 vision backbone + MAP head, producing L2-normalised identity embeddings.

    Load with :meth:`from_pretrained` (release layout, head-only format or a plain SigLIP checkpoint) and call
    :meth:`embed`. Higher cosine similarity between embeddings means "more likely the same identity".
    All parameters are frozen (``requires_grad=False``) and the backbone stays in eval mode; a trainer that wants
    to train the head calls ``model.head.requires_grad_(True)`` explicitly.

    ``pooling="mean"`` (see :meth:`with_pooling`) replaces the head by the masked mean of the backbone's tokens:
    the CLIP-I / DINO-style baseline embedding ``[B, D]`` (D = backbone width), for comparing against NearID with the
    same reward, validator and selector code.

    Example:
        >>> from nearid_reward.testing import tiny_nearid_model  # NearIDModel.from_pretrained("path/to/nearid")
        >>> model = tiny_nearid_model()
        >>> emb = model.embed(torch.rand(2, 3, 96, 64))  # any H, W; values in [0, 1]
        >>> emb.shape, torch.allclose(emb.norm(dim=-1), torch.ones(2))  # [B, E], unit norm
        (torch.Size([2, 32]), True)
        >>> -1.0 <= float(emb[0] @ emb[1]) <= 1.0  # cosine: higher = more likely the same identity
        True
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        head: MAPHead,
        preprocess: PreprocessConfig,
        *,
        backbone_type: BackboneType,
        vision_config: PreTrainedConfig,
        backbone_ref: str | None = None,
        extra: dict[str, Any] | None = None,
        pooling: Pooling = "head",
    ) -> None:
        super().__init__()
        self.pooling: Pooling = check_pooling(pooling)
        self.backbone = backbone
        self.head = head
        self.preprocess = preprocess
        self.backbone_type: BackboneType = backbone_type
        self.vision_config = vision_config
        self.backbone_ref = backbone_ref
        self.extra: dict[str, Any] = dict(extra or {})
        self._chunk_size: int | None = None
        self._checkpointing = False
        self._compiled = False
        self.requires_grad_(False)
        self.eval()

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        torch_dtype: torch.dtype | None = None,
        head_dtype: torch.dtype | None = None,
        attn_implementation: str = "sdpa",
        backbone: str | os.PathLike[str] | None = None,
    ) -> NearIDModel:
        """Load any supported checkpoint folder (or hub id) with the project's own code.

        Args:
            path: a release-layout folder (``config.json`` with ``model_type: "nearid"``), a head-only folder
                (``nearid_config.json`` + ``head.safetensors``) or a plain SigLIP/SigLIP2 folder (frozen baseline).
            torch_dtype: dtype of the backbone (and of the head unless ``head_dtype`` is given); default float32.
            head_dtype: dtype of the head, e.g. ``torch.float32`` with a bf16 backbone.
            attn_implementation: transformers attention backend of the backbone (``"sdpa"`` or ``"eager"``).
            backbone: override the backbone folder/hub id referenced by a head-only checkpoint.

        Raises:
            CheckpointError: unknown format, missing/corrupt files, missing or mis-shaped tensors.
        """
        loaded = read_checkpoint(path, backbone=backbone)
        return cls._from_loaded(
            loaded, torch_dtype=torch_dtype, head_dtype=head_dtype, attn_implementation=attn_implementation
        )

    @classmethod
    def _from_loaded(
        cls,
        loaded: LoadedCheckpoint,
        *,
        torch_dtype: torch.dtype | None,
        head_dtype: torch.dtype | None,
        attn_implementation: str,
    ) -> NearIDModel:
        backbone = _build_backbone(
            loaded.backbone_type, loaded.vision_config, attn_implementation=attn_implementation, dtype=torch_dtype
        )
        expected = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
        check_state(loaded.backbone_state, expected, f"backbone weights in {loaded.folder}")
        backbone.load_state_dict({k: loaded.backbone_state[k] for k in expected}, strict=True)
        head = MAPHead(loaded.head_config)
        check_state(loaded.head_state, expected_head_shapes(loaded.head_config), f"head weights in {loaded.folder}")
        head.load_state_dict({k: loaded.head_state[k] for k in head.state_dict()}, strict=True)
        head_dtype = head_dtype or torch_dtype
        if head_dtype is not None:
            head.to(head_dtype)
        return cls(
            backbone,
            head,
            loaded.preprocess,
            backbone_type=loaded.backbone_type,
            vision_config=loaded.vision_config,
            backbone_ref=loaded.backbone_ref,
            extra=loaded.extra,
        )

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        *,
        format: SaveFormat = "head",
        backbone: str | os.PathLike[str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Save the model.

        Args:
            save_directory: output folder (created). Files are written atomically.
            format: ``"head"`` writes ``nearid_config.json`` + ``head.safetensors`` (the backbone is referenced);
                ``"release"`` writes the official release layout (``config.json``, fp16 ``model.safetensors`` with
                ``backbone.vision_model.*`` keys, ``preprocessor_config.json``) readable by the official loader.
            backbone: for ``"head"``, the backbone folder or hub id to reference (default: where it was loaded from).
            extra: metadata stored in the head config's ``extra`` (merged over the model's own).

        Returns:
            The output folder.
        """
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        if format == "head":
            self._save_head(out, backbone=backbone, extra=extra)
        elif format == "release":
            self._save_release(out)
        else:
            raise ValueError(f"format must be 'head' or 'release', got {format!r}")
        return out

    def _save_head(self, out: Path, *, backbone: str | os.PathLike[str] | None, extra: dict[str, Any] | None) -> None:
        ref = str(backbone) if backbone is not None else self.backbone_ref
        if ref is None:
            raise ValueError("this model does not know where its backbone comes from; pass backbone=<folder|hub id>")
        local = Path(ref).expanduser()
        if local.is_dir():
            absolute = str(local.resolve())
            stored = os.path.relpath(absolute, out.resolve())
        else:
            absolute, stored = None, ref
        config = NearIDConfig(
            backbone=stored,
            backbone_absolute=absolute,
            backbone_type=self.backbone_type,
            head=self.head.config,
            preprocess=self.preprocess,
            extra={**self.extra, **(extra or {})},
        )
        save_safetensors_atomic(self.head.state_dict(), out / HEAD_WEIGHTS_NAME, metadata={"format": "pt"})
        write_json_atomic(out / HEAD_CONFIG_NAME, config.to_dict())

    def _save_release(self, out: Path) -> None:
        if self.backbone_type != "siglip":
            raise ValueError(
                "the official release layout holds a fixed-resolution SigLIP backbone (SiglipVisionModel); this model "
                f"has a {self.backbone_type!r} (NaFlex) backbone: save it with format='head'"
            )
        tensors = self.release_state_dict()
        vision = self.vision_config.to_dict()
        import transformers

        config = {
            "model_type": "nearid",
            "architectures": ["NearIDModel"],
            # Names the release's own loader classes, for users of the official package; this project reads the
            # folder with its own code and never executes code from a checkpoint.
            "auto_map": {
                "AutoConfig": "Aleksandar/nearid-siglip2--configuration_nearid.NearIDConfig",
                "AutoModel": "Aleksandar/nearid-siglip2--modeling_nearid.NearIDModel",
            },
            "vision_config": {k: vision[k] for k in RELEASE_VISION_FIELDS},
            "embed_dim": self.embed_dim,
            "normalize_embeddings": True,
            "transformers_version": transformers.__version__,
        }
        save_safetensors_atomic(tensors, out / "model.safetensors", metadata={"format": "pt"})
        write_json_atomic(out / "config.json", config)
        write_json_atomic(out / "preprocessor_config.json", self.preprocess.to_processor_dict())

    def release_state_dict(self) -> dict[str, torch.Tensor]:
        """The official release layout's tensors: fp16, keys ``backbone.vision_model.*``, the head under ``head.*``."""
        if self.head.proj is not None:
            raise ValueError("the release layout has no output projection, but this head has one: use format='head'")
        tensors = {RELEASE_PREFIX + k: v.to(torch.float16) for k, v in self.backbone.state_dict().items()}
        tensors.update({f"{RELEASE_PREFIX}head.{k}": v.to(torch.float16) for k, v in self.head.state_dict().items()})
        return tensors

    # ------------------------------------------------------------------ properties
    @property
    def embed_dim(self) -> int:
        """Width E of the embeddings returned by :meth:`embed` (the backbone width with ``pooling="mean"``)."""
        if self.pooling == "mean":
            return int(self.vision_config.hidden_size)
        return self.head.config.embed_dim

    def with_pooling(self, pooling: Pooling) -> NearIDModel:
        """This model with another pooling: ``self`` if it already pools so, else a view sharing the same frozen
        backbone and head modules (no weights copied).

        Args:
            pooling: ``"head"`` (the NearID / MAP head) or ``"mean"`` (masked mean of the backbone tokens,
                L2-normalised, :func:`mean_pool_tokens`).

        Example:
            >>> from nearid_reward.testing import tiny_nearid_model
            >>> model = tiny_nearid_model()
            >>> mean = model.with_pooling("mean")
            >>> mean.backbone is model.backbone, mean.embed(torch.rand(2, 3, 32, 32)).shape[-1] == mean.embed_dim
            (True, True)
        """
        pooling = check_pooling(pooling)
        if pooling == self.pooling:
            return self
        view = NearIDModel(self.backbone, self.head, self.preprocess, backbone_type=self.backbone_type,
                           vision_config=self.vision_config, backbone_ref=self.backbone_ref, extra=self.extra,
                           pooling=pooling)
        view.chunk_size = self.chunk_size
        return view

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the backbone's weights."""
        return next(self.backbone.parameters()).dtype

    # ------------------------------------------------------------------ modes and memory options
    @property
    def chunk_size(self) -> int | None:
        """Run the backbone on at most this many images at a time in :meth:`forward` (None: the whole batch)."""
        return self._chunk_size

    @chunk_size.setter
    def chunk_size(self, value: int | None) -> None:
        self._chunk_size = check_chunk_size(value, "chunk_size")

    def train(self, mode: bool = True) -> NearIDModel:
        """The backbone always stays in eval mode; the head follows ``mode`` (it has no dropout)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def gradient_checkpointing_enable(self) -> None:
        """Recompute backbone layers in the backward pass (saves activation memory when pixels need gradients).

        transformers only checkpoints modules in training mode; this backbone stays in eval mode, so each encoder
        layer's forward is wrapped with ``torch.utils.checkpoint`` directly. Numerics are unchanged.
        """
        if self._checkpointing:
            return
        for layer in self.backbone.encoder.layers:
            layer.forward = _checkpointed(layer.forward)
        self._checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        if not self._checkpointing:
            return
        for layer in self.backbone.encoder.layers:
            del layer.forward  # back to the class's forward
        self._checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._checkpointing

    def compile_regions(self, **compile_kwargs: Any) -> NearIDModel:
        """Compile each backbone encoder layer and the head with ``torch.compile``, in place (regional compilation).

        The encoder's layers are identical blocks, so one compilation serves all of them: compiling takes seconds
        where compiling the whole model takes minutes, and the compiled model is as fast. Parameter names and
        ``save_pretrained`` are unchanged; gradient checkpointing may be enabled before or after. On an H200 at
        batch 256 in bf16 it lifts embedding throughput by about 1.2x (``benchmarks/gpu_scale.py``, section e).

        Args:
            compile_kwargs: passed to ``torch.compile`` (default ``dynamic=False``: a new batch or image size
                compiles once more); e.g. ``mode="max-autotune-no-cudagraphs"`` or ``backend="eager"``.

        Returns:
            ``self``.
        """
        options: dict[str, Any] = {"dynamic": False, **compile_kwargs}
        for layer in self.backbone.encoder.layers:
            layer.compile(**options)
        self.head.compile(**options)
        self._compiled = True
        return self

    @property
    def is_compiled(self) -> bool:
        """Whether :meth:`compile_regions` was called."""
        return self._compiled

    # ------------------------------------------------------------------ inference
    def prepare(
        self, images: ImageInput, *, value_range: tuple[float, float] = (0.0, 1.0), check_inputs: bool = True
    ) -> PixelInputs:
        """Validate and preprocess ``images`` into model inputs on the model's device (see :meth:`embed`)."""
        value_range = check_value_range(value_range)
        if isinstance(images, torch.Tensor):
            check_image_tensor(images, value_range=value_range, check_values=check_inputs)
            return preprocess_tensor(images.to(self.device), self.preprocess, value_range=value_range)
        return preprocess_pil(to_pil_list(images), self.preprocess).to(self.device)

    def encode_tokens(self, inputs: PixelInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the frozen backbone: final (post-LayerNorm) tokens ``[B, N, D]`` and the token mask ``[B, N]``."""
        if self.backbone_type == "siglip":
            out = self.backbone(pixel_values=inputs.pixel_values)
            return out.last_hidden_state, None
        out = self.backbone(
            pixel_values=inputs.pixel_values,
            pixel_attention_mask=inputs.pixel_attention_mask,
            spatial_shapes=inputs.spatial_shapes,
        )
        return out.last_hidden_state, inputs.pixel_attention_mask

    def pool(self, tokens: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Head (or, with ``pooling="mean"``, the token mean) + L2 normalisation: tokens ``[B, N, D]`` -> embeddings
        ``[B, E]`` with unit norm, float32 (float64 for a float64 head or float64 tokens)."""
        if self.pooling == "mean":
            return mean_pool_tokens(tokens, token_mask)
        pooled = self.head(tokens, token_mask)  # [B, E]
        return F.normalize(pooled.to(torch.promote_types(pooled.dtype, torch.float32)), dim=-1)

    def forward(self, inputs: PixelInputs) -> torch.Tensor:
        """Embeddings ``[B, E]`` (float32, unit norm) of already preprocessed inputs."""
        parts = [self.pool(tokens, mask) for tokens, mask in self._encoded_chunks(inputs, self.chunk_size)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _encoded_chunks(
        self, inputs: PixelInputs, chunk: int | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Backbone tokens ``[b, N, D]`` and mask ``[b, N]`` (or None) of at most ``chunk`` images at a time."""
        if chunk is None or len(inputs) <= chunk:
            yield self.encode_tokens(inputs)
            return
        for start in range(0, len(inputs), chunk):
            yield self.encode_tokens(inputs.slice(start, start + chunk))

    @overload
    def embed(
        self, images: ImageInput, *, value_range: tuple[float, float] = ..., chunk_size: int | None = ...,
        check_inputs: bool = ..., return_context: Literal[False] = ...,
    ) -> torch.Tensor: ...

    @overload
    def embed(
        self, images: ImageInput, *, value_range: tuple[float, float] = ..., chunk_size: int | None = ...,
        check_inputs: bool = ..., return_context: Literal[True],
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def embed(
        self,
        images: ImageInput,
        *,
        value_range: tuple[float, float] = (0.0, 1.0),
        chunk_size: int | None = None,
        check_inputs: bool = True,
        return_context: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised identity embeddings.

        Args:
            images: a float tensor ``[B, 3, H, W]`` of any H, W with values in ``value_range`` (differentiable
                w.r.t. the pixels: resized and normalised with tensor ops); or PIL images, uint8 numpy arrays
                ``[H, W, 3]``, file paths or folders (processed exactly like the HF image processor).
            value_range: ``(low, high)`` numbers with ``high > low`` giving the range of tensor pixel values, e.g.
                ``(0, 1)`` or ``(-1, 1)``; checked but not used for PIL/numpy/path inputs, which are 8-bit.
            chunk_size: run the backbone on at most this many images at a time, an int >= 1 (default: the model's
                ``chunk_size`` attribute, None = whole batch).
            check_inputs: check tensors for NaN/Inf and for values contradicting ``value_range`` (one device sync).
            return_context: also return the images' context features from the same backbone pass
                (:func:`mean_pool_tokens`: mean-pooled tokens, what the copy signal compares).

        Returns:
            ``[B, E]`` float32 embeddings with unit L2 norm; cosine similarity is their dot product. With
            ``return_context``, the pair ``(embeddings [B, E], context features [B, D])``, both float32, unit norm.
        """
        chunk_size = check_chunk_size(chunk_size, "chunk_size")
        inputs = self.prepare(images, value_range=value_range, check_inputs=check_inputs)
        if return_context:
            embeddings, contexts = [], []
            for tokens, mask in self._encoded_chunks(inputs, chunk_size or self.chunk_size):
                embeddings.append(self.pool(tokens, mask))
                contexts.append(mean_pool_tokens(tokens, mask))
            return torch.cat(embeddings), torch.cat(contexts)
        if chunk_size is None:
            return self(inputs)
        previous, self.chunk_size = self.chunk_size, chunk_size
        try:
            return self(inputs)
        finally:
            self.chunk_size = previous

    def extra_repr(self) -> str:
        pooling = "" if self.pooling == "head" else f", pooling={self.pooling!r}"
        return (f"backbone_type={self.backbone_type!r}, embed_dim={self.embed_dim}, "
                f"backbone_ref={self.backbone_ref!r}{pooling}")



def as_nearid_model(
    model: NearIDModel | str | os.PathLike[str], *, torch_dtype: torch.dtype | None = None
) -> NearIDModel:
    """``model`` itself, or the model loaded from a checkpoint folder / hub id (backbone in ``torch_dtype``, head in
    float32), for objects that accept either."""
    if isinstance(model, NearIDModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        return NearIDModel.from_pretrained(model, torch_dtype=torch_dtype, head_dtype=torch.float32)
    raise TypeError(f"`model` must be a NearIDModel or a checkpoint path, got {type(model).__name__}")

def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() and hidden_states.requires_grad:
            return checkpoint(forward, hidden_states, *args, use_reentrant=False, **kwargs)
        return forward(hidden_states, *args, **kwargs)

    return run

