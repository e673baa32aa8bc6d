"""Tiny random diffusers pipelines and LoRA checkpoints for tests, demos and benchmarks (offline, no downloads).

Everything here is built from configs with seeded random weights: a CLIP BPE tokenizer from a generated vocabulary,
a tiny CLIP text encoder, UNet and VAE, and a DDIM (or DDPM) scheduler; for the transformer families (Flux, SD3,
Sana, Qwen-Image, Lumina2, HiDream, see :func:`build_tiny_pipeline`) T5, Qwen2, Gemma and Llama tokenizers built in
memory and tiny text encoders, transformers and VAEs of each model's own classes. A 64x64 SD-style image needs a
32x32 latent (the VAE downsamples by 2). Builders return real ``StableDiffusionPipeline``,
``StableDiffusionXLPipeline``, ``FluxPipeline``, ... objects that ``save_pretrained`` / ``from_pretrained``
round-trip, so LoRA loading, adapters and offloading behave as with real checkpoints.

This module imports diffusers, transformers and peft at import time; ``import nearid_reward`` does not import it.

Example:
    >>> from nearid_reward.testing.pipelines import build_tiny_sd_pipeline, add_lora_adapter
    >>> pipe = build_tiny_sd_pipeline(seed=0)
    >>> lora = add_lora_adapter(pipe.unet, rank=4, seed=0)  # the adapter's trainable tensors
    >>> pipe("a photo of sks dog", num_inference_steps=2, output_type="pt").images.shape
    torch.Size([1, 3, 64, 64])
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

try:
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
except ImportError as error:  # pragma: no cover - exercised by a test that hides diffusers
    raise ImportError(
        "nearid_reward.testing.pipelines builds diffusers pipelines and needs the 'diffusers' extra: "
        f"pip install 'nearid-reward[diffusers]' ({error})"
    ) from error
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..rendering import denoiser_of

__all__ = [
    "DEFAULT_WORDS",
    "LORA_WEIGHT_NAME",
    "byte_alphabet",
    "build_clip_tokenizer",
    "build_tiny_sd_pipeline",
    "save_tiny_sd_pipeline",
    "build_tiny_sdxl_pipeline",
    "save_tiny_sdxl_pipeline",
    "TRANSFORMER_FAMILIES",
    "build_t5_tokenizer",
    "build_qwen2_tokenizer",
    "build_gemma_tokenizer",
    "build_llama_tokenizer",
    "build_tiny_flux_pipeline",
    "build_tiny_sd3_pipeline",
    "build_tiny_sana_pipeline",
    "build_tiny_qwen_image_pipeline",
    "build_tiny_lumina2_pipeline",
    "build_tiny_hidream_pipeline",
    "build_tiny_pipeline",
    "save_tiny_pipeline",
    "add_lora_adapter",
    "lora_parameters",
    "diffusers_lora_state_dict",
    "write_lora_checkpoint",
    "write_lora_checkpoints",
    "write_full_checkpoint",
]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

# Words that become single tokens; any other text still tokenises (byte-level fallback, one token per character).
DEFAULT_WORDS: tuple[str, ...] = (
    "a", "photo", "of", "sks", "dog", "cat", "toy", "on", "the", "in", "with", "beach", "snow", "city",
    "table", "forest", "red", "blue", "style", "painting", "close", "up", "front", "side", "view",
)  # fmt: skip

SchedulerName = Literal["ddim", "ddpm"]


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2/CLIP), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:  # control characters, space, etc. move above 255
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The pieces byte-level BPE makes of one word under ``ranks`` (lowest rank merged first, as CLIP's tokenizer)."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        known = [(r, i) for r, i in pairs if r is not None]
        if not known:
            break
        _, i = min(known)
        pieces = [*pieces[:i], pieces[i] + pieces[i + 1], *pieces[i + 2:]]
    return pieces


def build_clip_tokenizer(words: Iterable[str] = DEFAULT_WORDS, *, model_max_length: int = 77) -> CLIPTokenizer:
    """A real ``CLIPTokenizer`` over a generated BPE vocabulary: every byte, plus one token per word in ``words``.

    Each listed (lower-case ASCII) word encodes to exactly one token, whatever the other words: a word whose pieces
    earlier merges would split differently (``"cyan"`` after ``"an"``) gets merges that join the pieces BPE actually
    produces. Merges only ever append, so a later word never changes how an earlier one encodes. Other text falls
    back to one token per byte. Special tokens come last.
    """
    alphabet = byte_alphabet()
    vocab: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        if not word:
            continue
        pieces = _bpe(word, ranks)
        while len(pieces) > 1:  # join left to right; new merges rank after every existing one
            merge = (pieces[0], pieces[1])
            if merge not in ranks:
                ranks[merge] = len(merges)
                merges.append(merge)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _text_config(tokenizer: CLIPTokenizer, **overrides: Any) -> CLIPTextConfig:
    fields: dict[str, Any] = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=32,
    )  # fmt: skip
    fields.update(overrides)
    return CLIPTextConfig(**fields)


def _tiny_vae(sample_size: int) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, sample_size=sample_size,
    )  # fmt: skip


def _sd_scheduler(name: SchedulerName) -> DDIMScheduler | DDPMScheduler:
    common: dict[str, Any] = dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        prediction_type="epsilon", steps_offset=1,
    )  # fmt: skip
    if name == "ddim":
        return DDIMScheduler(set_alpha_to_one=False, **common)
    if name == "ddpm":
        return DDPMScheduler(**common)
    raise ValueError(f"scheduler must be 'ddim' or 'ddpm', got {name!r}")


def build_tiny_sd_pipeline(
    seed: int = 0, *, scheduler: SchedulerName = "ddim", image_size: int = 64, words: Iterable[str] = DEFAULT_WORDS
) -> StableDiffusionPipeline:
    """A tiny Stable Diffusion 1.x-style pipeline with seeded random weights (about 1.5 M parameters, float32).

    Args:
        seed: weight seed (same seed, same weights).
        scheduler: ``"ddim"`` (default; also what the differentiable sampler uses) or ``"ddpm"``.
        image_size: default output size in pixels (the UNet's ``sample_size`` is half of it).
        words: words the tokenizer encodes as single tokens.

    Returns:
        A ``StableDiffusionPipeline`` on the CPU without a safety checker; default output ``image_size`` square.
    """
    if image_size % 8 != 0 or image_size <= 0:
        raise ValueError(f"image_size must be a positive multiple of 8, got {image_size}")
    tokenizer = build_clip_tokenizer(words)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    unet = UNet2DConditionModel(
        sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )  # fmt: skip
    vae = _tiny_vae(image_size)
    return _quiet(StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_sd_scheduler(scheduler),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    ))  # fmt: skip


def save_tiny_sd_pipeline(
    folder: str | os.PathLike[str], seed: int = 0, *, scheduler: SchedulerName = "ddim", image_size: int = 64
) -> Path:
    """Write :func:`build_tiny_sd_pipeline` with ``save_pretrained`` (safetensors) and return the folder.

    The folder loads with ``StableDiffusionPipeline.from_pretrained(folder)`` or ``DiffusionPipeline.from_pretrained``
    and can be passed as ``--pretrained_model_name_or_path`` to diffusers' training scripts (about 6 MB).
    """
    out = Path(folder)
    build_tiny_sd_pipeline(seed, scheduler=scheduler, image_size=image_size).save_pretrained(str(out))
    return out


def build_tiny_sdxl_pipeline(seed: int = 0, *, image_size: int = 64) -> StableDiffusionXLPipeline:
    """A tiny SDXL-style pipeline (two CLIP text encoders, ``text_time`` conditioning) with seeded random weights."""
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_act="gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden_act="gelu"))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=image_size // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=32,
    )  # fmt: skip
    vae = _tiny_vae(image_size)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear", timestep_spacing="leading"
    )
    return _quiet(StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    ))  # fmt: skip


def save_tiny_sdxl_pipeline(folder: str | os.PathLike[str], seed: int = 0, *, image_size: int = 64) -> Path:
    """Write :func:`build_tiny_sdxl_pipeline` with ``save_pretrained`` and return the folder."""
    out = Path(folder)
    build_tiny_sdxl_pipeline(seed, image_size=image_size).save_pretrained(str(out))
    return out


# ---------------------------------------------------------------------------------------------- transformer families
# Tiny pipelines of the transformer (flow-matching) families the diffusers DreamBooth LoRA scripts train. Every
# text encoder, tokenizer, VAE and transformer is built from a config with seeded random weights; sizes are the
# smallest the models accept. Output images are ``image_size`` square (32 px by default).
TransformerFamily = Literal["flux", "sd3", "sana", "qwen_image", "lumina2", "hidream"]
TRANSFORMER_FAMILIES: tuple[str, ...] = ("flux", "sd3", "sana", "qwen_image", "lumina2", "hidream")


def _byte_level_bpe(words: Iterable[str], space: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a byte-level BPE where each word of ``words`` (after a ``space`` marker) is one
    token and any other text falls back to one token per byte (GPT-2/Qwen style with ``space="Ġ"``)."""
    alphabet = byte_alphabet()
    vocab = {token: i for i, token in enumerate(alphabet)}
    merges: list[tuple[str, str]] = []
    for word in words:
        _merge_into_one_token([space, *word] if space else list(word), vocab, merges)
    return vocab, merges


def _merge_into_one_token(pieces: list[str], vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Add to ``vocab`` and ``merges`` (in place) the left-to-right merges that make ``pieces`` one token."""
    while len(pieces) > 1:
        merge = (pieces[0], pieces[1])
        if merge not in merges:
            merges.append(merge)
        vocab.setdefault(pieces[0] + pieces[1], len(vocab))
        pieces = [pieces[0] + pieces[1], *pieces[2:]]


def build_t5_tokenizer(words: Iterable[str] = DEFAULT_WORDS, *, model_max_length: int = 512) -> Any:
    """A real ``T5Tokenizer`` (Unigram) built in memory: one piece per word of ``words``, letters and digits."""
    from transformers import T5Tokenizer

    chars = "abcdefghijklmnopqrstuvwxyz0123456789{}.,'-_"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in dict.fromkeys(words)] + [(c, -5.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def build_qwen2_tokenizer(words: Iterable[str] = DEFAULT_WORDS) -> Any:
    """A real byte-level ``Qwen2Tokenizer`` with the chat-template special tokens Qwen-Image's prompt template uses."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _byte_level_bpe(words, "\u0120")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]  # fmt: skip
    for token in specials:
        vocab.setdefault(token, len(vocab))
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=1024)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
    return tokenizer


def _sentencepiece_bpe(words: Iterable[str], specials: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a sentencepiece-style BPE (``▁`` marks a space, ``<0xNN>`` byte fallback): the
    ``specials`` first, then the bytes, letters and digits, and one token per word of ``words``."""
    vocab: dict[str, int] = {token: i for i, token in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for char in "\u2581abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;'\"!?-()":
        vocab.setdefault(char, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        _merge_into_one_token(["\u2581", *word], vocab, merges)
    return vocab, merges


def build_gemma_tokenizer(words: Iterable[str] = DEFAULT_WORDS) -> Any:
    """A real ``GemmaTokenizer`` (BPE on ``▁``-marked words, byte fallback) with Gemma's chat special tokens."""
    from transformers import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    vocab, merges = _sentencepiece_bpe(words, specials)
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    return tokenizer


def build_llama_tokenizer(words: Iterable[str] = DEFAULT_WORDS) -> Any:
    """A real ``LlamaTokenizer`` (BPE on ``▁``-marked words, byte fallback), padding with ``</s>``."""
    from transformers import LlamaTokenizer

    vocab, merges = _sentencepiece_bpe(words, ["<unk>", "<s>", "</s>"])
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges)
    tokenizer.pad_token = "</s>"
    return tokenizer


def _quiet(pipe: Any) -> Any:
    """``pipe`` with its progress bar turned off, as every tiny builder returns it."""
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _t5_encoder(tokenizer: Any, d_model: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_ff=37, d_kv=8, num_layers=2, num_heads=4, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0,
    ))  # fmt: skip


def _gemma2_encoder(tokenizer: Any, hidden_size: int) -> Any:
    from transformers import Gemma2Config, Gemma2Model

    return Gemma2Model(Gemma2Config(
        head_dim=16, hidden_size=hidden_size, intermediate_size=32, max_position_embeddings=1024,
        num_attention_heads=2, num_hidden_layers=1, num_key_value_heads=2, vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        attn_implementation="eager",
    ))  # fmt: skip


def _flow_vae(image_size: int, **config: Any) -> AutoencoderKL:
    return AutoencoderKL(
        sample_size=image_size, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, **config,
    )  # fmt: skip


def build_tiny_flux_pipeline(seed: int = 0, *, image_size: int = 32, guidance_embeds: bool = False) -> Any:
    """A tiny ``FluxPipeline`` (CLIP + T5 text encoders, one double and one single block, packed 2x2 latents).

    ``guidance_embeds=True`` makes the transformer guidance-distilled (as Flux.1-dev): it takes the guidance scale as
    an input instead of classifier-free guidance.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=guidance_embeds,
    )  # fmt: skip
    return _quiet(FluxPipeline(
        transformer=transformer, text_encoder=CLIPTextModel(_text_config(tokenizer)), tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(tokenizer_2, 32), tokenizer_2=tokenizer_2,
        vae=_flow_vae(image_size, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                      scaling_factor=1.5035),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    ))  # fmt: skip


def build_tiny_sd3_pipeline(seed: int = 0, *, image_size: int = 32) -> Any:
    """A tiny ``StableDiffusion3Pipeline`` (two CLIP encoders with projection and a T5, one joint block)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2, tokenizer_3 = build_clip_tokenizer(), build_clip_tokenizer(), build_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=image_size // 2, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64,
        out_channels=4,
    )  # fmt: skip
    return _quiet(StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flow_vae(image_size, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                      scaling_factor=1.5035),
        text_encoder=CLIPTextModelWithProjection(_text_config(tokenizer, hidden_act="gelu")), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden_act="gelu")),
        tokenizer_2=tokenizer_2, text_encoder_3=_t5_encoder(tokenizer_3, 32), tokenizer_3=tokenizer_3,
    ))  # fmt: skip


def build_tiny_sana_pipeline(seed: int = 0, *, image_size: int = 32) -> Any:
    """A tiny ``SanaPipeline`` (Gemma2 text encoder, deep-compression VAE with 2x downsampling, one block)."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel

    tokenizer = build_gemma_tokenizer()
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=image_size // 2,
    )  # fmt: skip
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407,
    )  # fmt: skip
    return _quiet(SanaPipeline(
        tokenizer=tokenizer, text_encoder=_gemma2_encoder(tokenizer, 8), vae=vae, transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    ))  # fmt: skip


def build_tiny_qwen_image_pipeline(seed: int = 0, *, image_size: int = 32) -> Any:
    """A tiny ``QwenImagePipeline`` (Qwen2.5-VL text encoder, Qwen-Image video VAE, two transformer blocks)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_qwen2_tokenizer()
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )  # fmt: skip
    vae = AutoencoderKLQwenImage(
        base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )  # fmt: skip
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "rope_theta": 1000000.0,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "vocab_size": len(tokenizer), "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
        },
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tokenizer), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"), vision_token_id=ids("<|video_pad|>"),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
    )  # fmt: skip
    return _quiet(QwenImagePipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=Qwen2_5_VLForConditionalGeneration(config).eval(), tokenizer=tokenizer,
    ))  # fmt: skip


def build_tiny_lumina2_pipeline(seed: int = 0, *, image_size: int = 32) -> Any:
    """A tiny ``Lumina2Pipeline`` (Gemma2 text encoder, two transformer layers, 8x VAE)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    tokenizer = build_gemma_tokenizer()
    torch.manual_seed(seed)
    transformer = Lumina2Transformer2DModel(
        sample_size=image_size // 2, patch_size=2, in_channels=4, hidden_size=8, num_layers=2, num_attention_heads=1,
        num_kv_heads=1, multiple_of=16, ffn_dim_multiplier=None, norm_eps=1e-5, scaling_factor=1.0,
        axes_dim_rope=[4, 2, 2], cap_feat_dim=8,
    )  # fmt: skip
    return _quiet(Lumina2Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=AutoencoderKL(  # the pipeline assumes an 8x downsampling VAE
            sample_size=image_size, in_channels=3, out_channels=3, block_out_channels=(8, 8, 8, 8),
            layers_per_block=1, latent_channels=4, norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, shift_factor=0.0609, scaling_factor=1.5035,
        ),
        text_encoder=_gemma2_encoder(tokenizer, 8), tokenizer=tokenizer,
    ))  # fmt: skip


def build_tiny_hidream_pipeline(seed: int = 0, *, image_size: int = 32) -> Any:
    """A tiny ``HiDreamImagePipeline`` (two CLIP encoders, a T5 and a Llama; one double and one single MoE block).

    The pipeline rescales every request to its maximum area: renders are 256 px whatever ``height``/``width``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, HiDreamImageTransformer2DModel
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer, tokenizer_2 = build_clip_tokenizer(model_max_length=128), build_clip_tokenizer(model_max_length=128)
    tokenizer_3, tokenizer_4 = build_t5_tokenizer(), build_llama_tokenizer()
    torch.manual_seed(seed)
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_channels=[32, 16], text_emb_dim=64, num_routed_experts=4,
        num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=(0, 1),
    )  # fmt: skip
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer_4), hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=tokenizer_4.bos_token_id, eos_token_id=tokenizer_4.eos_token_id,
        pad_token_id=tokenizer_4.pad_token_id, max_position_embeddings=256,
    ))  # fmt: skip
    return _quiet(HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flow_vae(image_size, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=CLIPTextModelWithProjection(_text_config(tokenizer, hidden_act="gelu")), tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden_act="gelu")),
        tokenizer_2=tokenizer_2, text_encoder_3=_t5_encoder(tokenizer_3, 32), tokenizer_3=tokenizer_3,
        text_encoder_4=llama.eval(), tokenizer_4=tokenizer_4, transformer=transformer.eval(),
    ))  # fmt: skip


_TRANSFORMER_BUILDERS = {
    "flux": build_tiny_flux_pipeline, "sd3": build_tiny_sd3_pipeline, "sana": build_tiny_sana_pipeline,
    "qwen_image": build_tiny_qwen_image_pipeline, "lumina2": build_tiny_lumina2_pipeline,
    "hidream": build_tiny_hidream_pipeline,
}  # fmt: skip


def build_tiny_pipeline(family: str, seed: int = 0, *, image_size: int | None = None) -> Any:
    """A tiny pipeline of ``family``: ``"sd"``, ``"sdxl"`` (64 px) or one of :data:`TRANSFORMER_FAMILIES` (32 px)."""
    if family == "sd":
        return build_tiny_sd_pipeline(seed, image_size=image_size or 64)
    if family == "sdxl":
        return build_tiny_sdxl_pipeline(seed, image_size=image_size or 64)
    if family not in _TRANSFORMER_BUILDERS:
        raise ValueError(f"family must be 'sd', 'sdxl' or one of {TRANSFORMER_FAMILIES}, got {family!r}")
    return _TRANSFORMER_BUILDERS[family](seed, image_size=image_size or 32)


def save_tiny_pipeline(folder: str | os.PathLike[str], family: str, seed: int = 0) -> Path:
    """Write :func:`build_tiny_pipeline` with ``save_pretrained`` (safetensors) and return the folder: a base model
    for ``--pretrained_model_name_or_path`` that ``DiffusionPipeline.from_pretrained`` loads offline."""
    out = Path(folder)
    build_tiny_pipeline(family, seed).save_pretrained(str(out))
    return out


# ---------------------------------------------------------------------------------------------- LoRA helpers
def add_lora_adapter(
    denoiser: torch.nn.Module,
    *,
    rank: int = 4,
    seed: int | None = 0,
    b_std: float = 0.02,
    target_modules: Sequence[str] = ("to_k", "to_q", "to_v", "to_out.0"),
    adapter_name: str = "default",
) -> list[torch.nn.Parameter]:
    """Add a PEFT LoRA adapter to a diffusers UNet/transformer (``add_adapter``) and return its trainable tensors.

    peft initialises ``lora_B`` to zero, which makes a fresh adapter a no-op whose ``lora_A`` gradients are exactly
    zero. With ``seed`` given, ``lora_B`` is filled with seeded normal noise of standard deviation ``b_std`` so
    that the adapter changes the output (useful for checkpoints whose effect must be visible).
    With ``seed=None`` the peft initialisation (``lora_B = 0``) is kept.
    """
    from peft import LoraConfig

    denoiser.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(target_modules)),
        adapter_name=adapter_name,
    )
    params = lora_parameters(denoiser, adapter_name)
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in denoiser.named_parameters():
                if f"lora_B.{adapter_name}." in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * b_std)
    return params


def lora_parameters(denoiser: torch.nn.Module, adapter_name: str = "default") -> list[torch.nn.Parameter]:
    """The LoRA tensors (``lora_A``/``lora_B``) of ``adapter_name`` in ``denoiser``, in module order."""
    keys = (f"lora_A.{adapter_name}.", f"lora_B.{adapter_name}.")
    return [p for n, p in denoiser.named_parameters() if any(k in n for k in keys)]


def diffusers_lora_state_dict(denoiser: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's weights in the key format the DreamBooth LoRA scripts save for this denoiser: diffusers' names
    for a UNet, peft's own for a transformer (see :func:`nearid_reward.adapters.adapter_state_dict`)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(denoiser, adapter_name=adapter_name)
    return convert_state_dict_to_diffusers(state) if "Transformer" not in type(denoiser).__name__ else state


def write_lora_checkpoint(
    folder: str | os.PathLike[str],
    pipeline: Any,
    *,
    adapter_name: str = "default",
    scale: float = 1.0,
) -> Path:
    """Save the pipeline's UNet/transformer adapter as ``folder/pytorch_lora_weights.safetensors``.

    Uses the pipeline class's ``save_lora_weights`` exactly as diffusers' DreamBooth LoRA scripts do, so
    ``pipeline.load_lora_weights(folder)`` reads it back. ``scale`` multiplies every ``lora_B`` tensor in the saved
    file (the live adapter is untouched): scale 0 saves a no-op adapter, 1 the adapter as it is.

    Returns:
        The path of the written safetensors file.
    """
    denoiser, attr = denoiser_of(pipeline)
    state = diffusers_lora_state_dict(denoiser, adapter_name)
    if scale != 1.0:
        state = {k: (v * scale if ".lora.up." in k or "lora_B" in k else v) for k, v in state.items()}
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = {f"{attr}_lora_layers": state}
    type(pipeline).save_lora_weights(str(out), weight_name=LORA_WEIGHT_NAME, **kwargs)
    return out / LORA_WEIGHT_NAME


def write_lora_checkpoints(
    output_dir: str | os.PathLike[str],
    pipeline: Any,
    scales: dict[int, float],
    *,
    adapter_name: str = "default",
) -> list[Path]:
    """Write ``output_dir/checkpoint-{step}/pytorch_lora_weights.safetensors`` for each ``{step: scale}``.

    Each checkpoint holds the pipeline's adapter with ``lora_B`` scaled by its ``scale``: a family of checkpoints
    whose effect on the images grows with the scale, in whatever step order the caller chooses.
    """
    root = Path(output_dir)
    return [
        write_lora_checkpoint(root / f"checkpoint-{step}", pipeline, adapter_name=adapter_name, scale=scale).parent
        for step, scale in sorted(scales.items())
    ]


def write_full_checkpoint(folder: str | os.PathLike[str], denoiser: torch.nn.Module) -> Path:
    """Save a full UNet (``folder/unet``) or transformer (``folder/transformer``) like ``train_dreambooth.py``."""
    name = "transformer" if "Transformer" in type(denoiser).__name__ else "unet"
    out = Path(folder) / name
    denoiser.save_pretrained(str(out))
    return out
