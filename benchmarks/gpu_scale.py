"""GPU-scale measurements at the released model size: embedding throughput, the reward's cost, DRaFT-K, head training.

Everything is built from the real configurations with random weights (no download, no network):

* the SigLIP so400m-patch14-384 vision tower (27 layers, width 1152, 729 tokens) with the NearID MAP head, written
  to a local folder and loaded with ``NearIDModel.from_pretrained`` exactly as users load a checkpoint;
* Stable Diffusion 1.5's UNet, VAE and CLIP text encoder configurations (diffusers/transformers classes).

Sections (each prints a Markdown table; ``--sections a,b,c,d,e`` picks some):

a. Embedding throughput in images/s at batch 64 and 256 (bf16, SDPA, ``torch.inference_mode``), the model FLOP
   utilisation (FLOPs of one image counted with ``torch.utils.flop_counter`` times images/s, against the GPU's bf16
   dense peak from its datasheet and against a bf16 matrix product measured in the same run), and the
   official-style path (the HF image processor on PIL images, the full SigLIP tower *with* its original head, then
   the NearID head) against ours (uint8 pixels to the GPU, tensor preprocessing, no original head) end to end.
b. Reward forward+backward w.r.t. 512x512 images: median time and peak CUDA memory, with and without gradient
   checkpointing of the encoder.
c. One DRaFT-K LoRA step (DDIM sampling with gradients through the last K steps, VAE decode at 512x512, NearID
   reward, backward into the LoRA, AdamW step) on SD 1.5-sized modules: time and peak memory for K=1 and K=4.
d. One head-training step as the trainer takes it (the MAP head's factorised forward, two-tier loss, clipping,
   AdamW) on a NearID batch (128 identities x 3 views + 3 distractors = 768 images) with cached features against
   computing them with the frozen backbone.
e. (if the time budget allows) the throughput of section a, eager against ``NearIDModel.compile_regions()`` (each
   encoder layer and the head compiled by ``torch.compile``), side by side.
f. The throughput at the largest batch with each SDPA backend forced (flash, memory-efficient, cuDNN, math), and
   the embeddings' agreement with the default choice.

Reproduce on one GPU (about 5 minutes on an H200; needs diffusers and peft for section c)::

    python benchmarks/gpu_scale.py --markdown benchmarks/gpu_scale_latest.md --json gpu_scale.json

``--tiny --device cpu`` runs every section on tiny configurations in seconds (the test suite does this so that the
script stays runnable); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import environment_info, median_time, peak_memory_mib  # noqa: E402

from nearid_reward import IdentityReward, NearIDModel  # noqa: E402
from nearid_reward.files import atomic_write  # noqa: E402

# Dense bf16 peak of the SXM parts from the vendor datasheets, TFLOP/s (H100 and H200 share the chip).
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}

SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
              patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
TINY_VIT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215,
)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 hidden_act="quick_gelu", projection_dim=768)
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
    sample_size=16, scaling_factor=0.18215,
)
TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)


# ---------------------------------------------------------------------------------------------- small helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def measured_bf16_tflops(device: torch.device, size: int) -> float:
    """TFLOP/s of a ``size``-cubed bf16 matrix product on random data (median of 10 after 3 warm-ups)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = median_time(lambda: a @ b, repeats=10, warmup=3)
    return 2 * size**3 / seconds / 1e12


# ---------------------------------------------------------------------------------------------- NearID model
def write_siglip(folder: Path, vit: dict[str, Any], device: torch.device) -> Path:
    """A randomly initialised SigLIP vision checkpoint (bf16 safetensors + image processor), like a local copy."""
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    with torch.device(device):
        model = SiglipVisionModel(SiglipVisionConfig(**vit, vision_use_head=True))
    model.to(torch.bfloat16).save_pretrained(str(folder))
    size = vit["image_size"]
    SiglipImageProcessorPil(size={"height": size, "width": size}, resample=2, image_mean=[0.5] * 3,
                            image_std=[0.5] * 3).save_pretrained(str(folder))
    del model
    return folder


def analytic_flops(vit: dict[str, Any]) -> float:
    """Matmul FLOPs of one image through the tower and the (factorised) MAP head, 2 per multiply-add."""
    d, m, p = vit["hidden_size"], vit["intermediate_size"], vit["patch_size"]
    n = (vit["image_size"] // p) ** 2
    layer = 2 * n * (4 * d * d + 2 * d * m) + 2 * 2 * n * n * d
    heads = vit["num_attention_heads"]
    # the factorised single-query head: probe query, key vector per head, value and output projections (4 D^2),
    # logits and pooling over the tokens (2 N D H), MLP (2 D M)
    head = 2 * (4 * d * d + 2 * n * d * heads + 2 * d * m)
    return 2 * n * 3 * p * p * d + vit["num_hidden_layers"] * layer + head


def counted_flops(model: NearIDModel, size: int, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 3, size, size, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model.embed(x, check_inputs=False)
    return float(counter.get_total_flops())


def official_style_model(folder: Path, device: torch.device) -> Any:
    from transformers import SiglipVisionModel

    return SiglipVisionModel.from_pretrained(str(folder), dtype=torch.bfloat16, attn_implementation="sdpa").to(device)


def hf_processors(folder: Path) -> list[tuple[str, Any]]:
    """The HF image processors available here: the PIL backend (what NearID training used) and the default one."""
    import transformers

    found: list[tuple[str, Any]] = []
    pil_cls = getattr(transformers, "SiglipImageProcessorPil", None)
    if pil_cls is not None:
        found.append(("HF processor, PIL backend", pil_cls.from_pretrained(str(folder))))
    default = transformers.SiglipImageProcessor.from_pretrained(str(folder))
    if pil_cls is None or type(default) is not pil_cls:
        found.append((f"HF processor, {type(default).__name__}", default))
    return found


# ---------------------------------------------------------------------------------------------- section a
def section_a(ctx: dict[str, Any]) -> dict[str, Any]:
    device, vit, model, folder = ctx["device"], ctx["vit"], ctx["model"], ctx["folder"]
    size = vit["image_size"]
    flops = counted_flops(model, size, device)
    analytic = analytic_flops(vit)
    peaks = ctx["peaks"]
    rows, results = [], {"flops_per_image": flops, "flops_per_image_analytic": analytic, "throughput": {}}
    official = official_style_model(folder, device)
    head = model.head

    def ours(x: torch.Tensor) -> Callable[[], Any]:
        return lambda: model.embed(x, check_inputs=False)

    def theirs(x: torch.Tensor) -> Callable[[], Any]:
        def run() -> torch.Tensor:
            pixels = ((x - 0.5) / 0.5).to(torch.bfloat16)
            out = official(pixel_values=pixels)  # runs the original head too (pooler_output), as the official code
            return F.normalize(head(out.last_hidden_state).float(), dim=-1)

        return run

    for batch in ctx["batches"]:
        x = torch.rand(batch, 3, size, size, device=device)
        for name, make in (("ours: NearIDModel.embed", ours), ("official-style: full SigLIP + NearID head", theirs)):
            with torch.inference_mode():
                seconds = median_time(make(x), repeats=ctx["repeats"], warmup=2)
            ips = batch / seconds
            tflops = flops * ips / 1e12
            results["throughput"][f"{name} @ {batch}"] = {"images_per_s": ips, "tflops": tflops}
            rows.append([name, str(batch), fmt(ips), fmt(tflops), fmt(100 * tflops / peaks["datasheet"])
                         if peaks["datasheet"] else "n/a", fmt(100 * tflops / peaks["measured"])])
        del x
    text = [f"FLOPs per image (counted): {flops / 1e9:.1f} GFLOP (analytic matmul count {analytic / 1e9:.1f}); "
            f"bf16 peak: datasheet {fmt(peaks['datasheet'], 0)} TFLOP/s, measured matmul "
            f"{fmt(peaks['measured'], 0)} TFLOP/s.", "",
            table(["path (input already at model resolution, on the device)", "batch", "images/s", "TFLOP/s",
                   "MFU vs datasheet %", "MFU vs measured %"], rows)]

    # End to end from 512x512 8-bit images in host memory, as a user scores generated samples.
    e2e_batch = ctx["e2e_batch"]
    from PIL import Image

    rng = np.random.default_rng(0)
    src = 2 * size if ctx["tiny"] else 512
    arrays = rng.integers(0, 256, (e2e_batch, src, src, 3), dtype=np.uint8)
    pil = [Image.fromarray(a) for a in arrays]
    uint8 = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
    rows2 = []

    def ours_e2e() -> torch.Tensor:
        x = uint8.to(device, non_blocking=True).float().div_(255)
        return model.embed(x, check_inputs=False)

    variants: list[tuple[str, Callable[[], Any]]] = [("ours: uint8 tensor -> device, tensor preprocessing", ours_e2e)]
    for label, processor in hf_processors(folder):
        def run(processor: Any = processor) -> torch.Tensor:
            pixels = processor(images=pil, return_tensors="pt")["pixel_values"].to(device, torch.bfloat16)
            out = official(pixel_values=pixels)
            return F.normalize(head(out.last_hidden_state).float(), dim=-1)

        variants.append((f"official-style: {label} on PIL, full SigLIP + head", run))
    times = {}
    with torch.inference_mode():
        for label, fn in variants:
            times[label] = median_time(fn, repeats=ctx["repeats"], warmup=1)
            results["throughput"][f"e2e {label}"] = {"images_per_s": e2e_batch / times[label]}
    base = times[variants[0][0]]
    for label, seconds in times.items():
        rows2.append([label, fmt(e2e_batch / seconds), fmt(seconds / base, 2)])
    with torch.inference_mode():
        a = ours_e2e()
        b = variants[1][1]() if len(variants) > 1 else a
    cos = float((a * b).sum(-1).min())
    results["e2e_min_cosine"] = cos
    text += ["", f"End to end from {e2e_batch} random {src}x{src} 8-bit images in host memory (batch {e2e_batch}):",
             "", table(["path", "images/s", "time vs ours"], rows2), "",
             f"Same weights, both paths: minimum cosine between their embeddings {cos:.5f}."]
    results["markdown"] = "\n".join(text)
    return results


# ---------------------------------------------------------------------------------------------- section b
def section_b(ctx: dict[str, Any]) -> dict[str, Any]:
    device, model = ctx["device"], ctx["model"]
    src = 64 if ctx["tiny"] else 512
    batch = ctx["reward_batch"]
    refs = torch.rand(4, 3, src, src, device=device)
    rows, results = [], {}
    for ckpt in (False, True):
        reward = IdentityReward(model, refs, gradient_checkpointing=ckpt)
        images = torch.rand(batch, 3, src, src, device=device)

        def step(reward: IdentityReward = reward, images: torch.Tensor = images) -> None:
            x = images.detach().clone().requires_grad_()
            reward(x).sum().backward()

        seconds = median_time(step, repeats=ctx["repeats"], warmup=1)
        peak = peak_memory_mib(step)[0]
        key = "with checkpointing" if ckpt else "no checkpointing"
        results[key] = {"seconds": seconds, "peak_mib": peak}
        rows.append([key, fmt(seconds * 1000), fmt(batch / seconds), fmt(peak, 0)])
        del reward, images
    model.gradient_checkpointing_disable()
    with torch.inference_mode():
        x = torch.rand(batch, 3, src, src, device=device)
        fwd = median_time(lambda: model.embed(x, check_inputs=False), repeats=ctx["repeats"], warmup=1)
    rows.insert(0, ["plain forward (inference_mode)", fmt(fwd * 1000), fmt(batch / fwd), "-"])
    results["plain_forward_seconds"] = fwd
    a, b = results["no checkpointing"]["peak_mib"], results["with checkpointing"]["peak_mib"]
    ratio = a / b if a is not None and b else None
    results["memory_ratio"] = ratio
    results["markdown"] = "\n".join([
        f"Batch {batch} of {src}x{src} images, bf16 backbone and head; reward = mean cosine to 4 references; "
        "peak = CUDA allocator peak above the memory held before the step.", "",
        table(["variant", "ms", "images/s", "peak MiB"], rows), "",
        f"Checkpointing cuts peak memory by {fmt(ratio, 2)}x at "
        f"{fmt(results['with checkpointing']['seconds'] / results['no checkpointing']['seconds'], 2)}x the time; "
        f"fwd+bwd costs {fmt(results['no checkpointing']['seconds'] / fwd, 2)}x a plain forward.",
    ])
    return results


# ---------------------------------------------------------------------------------------------- section c
def build_sd(tiny: bool, device: torch.device, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from nearid_reward.testing.pipelines import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    text = dict(TINY_TEXT if tiny else SD15_TEXT, vocab_size=len(tokenizer), max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET))
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE))
        text_encoder = CLIPTextModel(CLIPTextConfig(**text))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    return pipe


def section_c(ctx: dict[str, Any]) -> dict[str, Any]:
    from nearid_reward.diffusion import SamplerConfig, sample_images
    from nearid_reward.testing.pipelines import add_lora_adapter

    device, tiny = ctx["device"], ctx["tiny"]
    pipe = build_sd(tiny, device, ctx["model"].dtype)
    params = add_lora_adapter(pipe.unet, rank=8, seed=0, target_modules=("to_k", "to_q", "to_v", "to_out.0"))
    for p in params:  # frozen weights in bf16, trainable LoRA tensors in fp32 (as the diffusers scripts do)
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    src = 2 * TINY_VAE["sample_size"] if tiny else 512
    reward = IdentityReward(ctx["model"], torch.rand(4, 3, src, src, device=device))
    steps, batch = ctx["ddim_steps"], ctx["draft_batch"]
    prompts = ["a photo of sks dog"] * batch
    unet_params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    rows, results = [], {"unet_params_m": unet_params, "lora_params_m": sum(p.numel() for p in params) / 1e6}
    for k, ckpt in ((1, False), (4, False), (4, True)):
        cfg = SamplerConfig(num_inference_steps=steps, grad_steps=k, gradient_checkpointing=ckpt)

        def step(cfg: SamplerConfig = cfg) -> None:
            gens = [torch.Generator().manual_seed(i) for i in range(batch)]
            images = sample_images(pipe, prompts, config=cfg, height=src, width=src, generator=gens)
            loss = (1 - reward(images)).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = median_time(step, repeats=ctx["repeats_c"], warmup=1)
        peak = peak_memory_mib(step)[0]
        key = f"K={k}" + (" + checkpointing" if ckpt else "")
        results[key] = {"seconds": seconds, "peak_mib": peak}
        rows.append([key, fmt(seconds, 2), fmt(peak, 0)])
    with torch.inference_mode():
        cfg0 = SamplerConfig(num_inference_steps=steps, grad_steps=0)
        sample_only = median_time(lambda: sample_images(pipe, prompts, config=cfg0, height=src, width=src),
                                  repeats=ctx["repeats_c"], warmup=1)
    rows.insert(0, ["sampling only (no gradients)", fmt(sample_only, 2), "-"])
    results["sample_only_seconds"] = sample_only
    results["markdown"] = "\n".join([
        f"SD 1.5-sized UNet ({unet_params:.0f} M parameters, bf16, frozen) with a rank-8 LoRA on the attention "
        f"projections ({results['lora_params_m']:.2f} M fp32 parameters), VAE decode and NearID reward at "
        f"{src}x{src}, batch {batch}, {steps} DDIM steps, no guidance; one step = sample, decode, reward, backward, "
        "clip, AdamW. Random prompt embeddings from a random CLIP text encoder of SD 1.5's size.", "",
        table(["variant", "seconds / step", "peak MiB"], rows),
    ])
    return results


# ---------------------------------------------------------------------------------------------- section d
def section_d(ctx: dict[str, Any]) -> dict[str, Any]:
    from nearid_reward.preprocess import PixelInputs
    from train_head.batching import CachedBatcher, batch_tokens
    from train_head.cache import FeatureStore
    from train_head.losses import nearid_loss_terms

    device, model, vit = ctx["device"], ctx["model"], ctx["vit"]
    b, v = ctx["head_identities"], 3
    n_img = b * 2 * v
    size = vit["image_size"]
    n_tok, width = (size // vit["patch_size"]) ** 2, vit["hidden_size"]
    head = type(model.head)(model.head.config).to(device)
    head.load_state_dict(model.head.state_dict())
    head.float().requires_grad_(True)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-4, weight_decay=1e-4)
    pin = device.type == "cuda"

    def head_step(tokens: torch.Tensor, mask: torch.Tensor | None) -> None:
        emb = F.normalize(head(tokens, mask).float(), dim=-1).view(b, 2 * v, -1)
        terms = nearid_loss_terms(emb[:, 0], emb[:, 1:v], emb[:, v:], temperature=0.07, alpha=0.5)
        terms.loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # the pixel batch the loader hands over (preprocessed float32 at model resolution) and the cached tokens
    pixels = torch.rand(n_img, 3, size, size).mul_(2).sub_(1)
    if pin:
        pixels = pixels.pin_memory()
    keys = [f"{i:064x}" for i in range(n_img)]
    tmp = Path(ctx["work"]) / "cache"
    store = FeatureStore(tmp, shard_size=n_img + 1)
    gen = torch.Generator().manual_seed(0)
    for start in range(0, n_img, 64):
        store.add(keys[start:start + 64], torch.randn(min(64, n_img - start), n_tok, width, generator=gen).half())
    store.flush()
    store = FeatureStore(tmp)  # reopened: reads go through the memory-mapped shard, as in a later epoch
    refs = [(0, i) for i in range(n_img)]
    batcher = CachedBatcher(store, dict(zip(refs, keys)))
    prefetched = store.get(keys)[0]
    if pin:
        prefetched = prefetched.pin_memory()

    def computing() -> None:
        with torch.no_grad():
            tokens, mask = model.encode_tokens(PixelInputs(pixels.to(device, non_blocking=True).to(model.dtype)))
        head_step(tokens, mask)

    def cached_read() -> None:
        tokens, mask = batch_tokens(batcher(refs), None, device)
        head_step(tokens, mask)

    def cached_prefetched() -> None:
        head_step(prefetched.to(device, non_blocking=True), None)

    rows, results = [], {"images_per_step": n_img, "cache_mib_per_image": n_tok * width * 2 / 2**20}
    for name, fn, reps in (("computing the backbone", computing, max(3, ctx["repeats"] // 2)),
                           ("cached, read from the memory-mapped store in the step", cached_read, ctx["repeats"]),
                           ("cached, prefetched by the loader (pinned host memory)", cached_prefetched,
                            ctx["repeats"])):
        seconds = median_time(fn, repeats=reps, warmup=1)
        results[name] = seconds
        rows.append([name, fmt(seconds * 1000), ""])
    base = results["computing the backbone"]
    for row, name in zip(rows, list(results)[2:]):
        row[2] = fmt(base / results[name], 1)
    results["markdown"] = "\n".join([
        f"One optimizer step on a batch of {b} identities x ({v} views + {v} distractors) = {n_img} images; "
        f"cached tokens are {n_tok}x{width} fp16 ({results['cache_mib_per_image']:.2f} MiB per image).", "",
        table(["head step", "ms", "speed-up vs computing"], rows),
    ])
    return results


# ---------------------------------------------------------------------------------------------- sections e, f
def _throughput_row(ctx: dict[str, Any], flops: float, run: Callable[[], Any], batch: int) -> dict[str, float]:
    seconds = median_time(run, repeats=ctx["repeats"], warmup=1)
    ips = batch / seconds
    tflops = flops * ips / 1e12
    peaks = ctx["peaks"]
    return {"images_per_s": ips, "tflops": tflops, "mfu_measured": 100 * tflops / peaks["measured"],
            "mfu_datasheet": 100 * tflops / peaks["datasheet"] if peaks["datasheet"] else float("nan")}


def _uncompile(model: NearIDModel) -> None:
    """Undo ``compile_regions`` (a benchmark needs the eager model back; the library has no use for it)."""
    for module in [*model.backbone.encoder.layers, model.head]:
        module._compiled_call_impl = None
    model._compiled = False
    torch._dynamo.reset()


def section_e(ctx: dict[str, Any]) -> dict[str, Any]:
    """The library's regional compilation (``NearIDModel.compile_regions``) against eager, side by side."""
    device, model, vit = ctx["device"], ctx["model"], ctx["vit"]
    flops = counted_flops(model, vit["image_size"], device)
    # mode="max-autotune-no-cudagraphs" is left out: at this size its GEMM autotuning alone took over five minutes on
    # an H200, and it picked cuBLAS's kernels for the large products anyway.
    modes = [("eager (no compile)", None), ("compile_regions()", {})]
    if ctx["tiny"]:  # a smoke run checks the wiring: dynamo's capture without code generation
        modes = [modes[0], ("compile_regions()", {"backend": "eager"})]
    rows, results = [], {}
    for name, options in modes:
        for batch in ctx["batches"]:
            x = torch.rand(batch, 3, vit["image_size"], vit["image_size"], device=device)
            compile_s = 0.0
            try:
                with torch.inference_mode():
                    if options is not None:
                        model.compile_regions(**options)
                        started = time.perf_counter()
                        model.embed(x, check_inputs=False)
                        sync(device)
                        compile_s = time.perf_counter() - started
                    row = _throughput_row(ctx, flops, lambda x=x: model.embed(x, check_inputs=False), batch)
            finally:
                if options is not None:
                    _uncompile(model)
            row["first_call_s"] = compile_s
            results[f"{name} @ {batch}"] = row
            rows.append([name, str(batch), fmt(row["images_per_s"]), fmt(row["tflops"]), fmt(row["mfu_datasheet"]),
                         fmt(row["mfu_measured"]), fmt(compile_s) if options is not None else "-"])
            if ctx["deadline"] is not None and time.perf_counter() > ctx["deadline"]:
                break
    results["markdown"] = table(["model", "batch", "images/s", "TFLOP/s", "MFU vs datasheet %", "MFU vs measured %",
                                 "first call s (compile)"], rows)
    return results


def section_f(ctx: dict[str, Any]) -> dict[str, Any]:
    """Embedding throughput at the largest batch with each SDPA backend forced, eager model, side by side."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device, model, vit = ctx["device"], ctx["model"], ctx["vit"]
    batch = max(ctx["batches"])
    flops = counted_flops(model, vit["image_size"], device)
    x = torch.rand(batch, 3, vit["image_size"], vit["image_size"], device=device)
    with torch.inference_mode():
        reference = model.embed(x, check_inputs=False)
    backends = [("default choice", None), ("flash", SDPBackend.FLASH_ATTENTION),
                ("memory-efficient", SDPBackend.EFFICIENT_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION),
                ("math", SDPBackend.MATH)]
    rows, results = [], {}
    for name, backend in backends:
        context = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
        try:
            with context, torch.inference_mode():
                out = model.embed(x, check_inputs=False)
                row = _throughput_row(ctx, flops, lambda: model.embed(x, check_inputs=False), batch)
            row["min_cosine_vs_default"] = float((out * reference).sum(-1).min())
        except RuntimeError as exc:  # the backend cannot run these shapes/dtype on this device
            results[name] = {"error": str(exc).splitlines()[0][:200]}
            rows.append([name, "n/a", "n/a", "n/a", "n/a", results[name]["error"][:60]])
            continue
        results[name] = row
        rows.append([name, fmt(row["images_per_s"]), fmt(row["tflops"]), fmt(row["mfu_measured"]),
                     f"{row['min_cosine_vs_default']:.5f}", ""])
    results["markdown"] = "\n".join([
        f"Batch {batch}, {str(model.dtype).removeprefix('torch.')}, eager model; attention is "
        f"{vit['num_attention_heads']} heads of {vit['hidden_size'] // vit['num_attention_heads']} over "
        f"{(vit['image_size'] // vit['patch_size']) ** 2} tokens.", "",
        table(["SDPA backend", "images/s", "TFLOP/s", "MFU vs measured %", "min cosine vs default", "note"], rows),
    ])
    return results


SECTIONS: dict[str, tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = {
    "a": ("Embedding throughput and model FLOP utilisation", section_a),
    "b": ("Reward forward+backward at 512x512", section_b),
    "c": ("DRaFT-K LoRA step on SD 1.5-sized modules", section_c),
    "d": ("Head-training step: cached features against computing them", section_d),
    "e": ("Embedding throughput with the library's regional compilation", section_e),
    "f": ("Embedding throughput by attention backend", section_f),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny configurations (a smoke run; numbers mean nothing)")
    p.add_argument("--sections", default="a,b,c,d,f,e", help="comma-separated subset of a,b,c,d,e,f, in order")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="skip the sections not yet started once this many seconds have passed")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="dtype of the frozen models (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--markdown", default=None, help="write the report here (Markdown)")
    p.add_argument("--json", default=None, help="write the raw results here (JSON)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"--sections: unknown section(s) {unknown}; expected a subset of {sorted(SECTIONS)}")
    started = time.perf_counter()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    env = environment_info(device)
    print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    datasheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
    report: dict[str, Any] = {"environment": env, "sections": {}}
    with tempfile.TemporaryDirectory() as work:
        vit = TINY_VIT if args.tiny else SO400M
        folder = write_siglip(Path(work) / "siglip", vit, device)
        dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
        model = NearIDModel.from_pretrained(folder, torch_dtype=dtype).to(device)
        peaks = {"datasheet": datasheet, "measured": measured_bf16_tflops(device, 256 if args.tiny else 8192)}
        report["peaks_tflops"] = peaks
        print(f"model ready in {time.perf_counter() - started:.1f} s; bf16 matmul {peaks['measured']:.0f} TFLOP/s "
              f"(datasheet {peaks['datasheet']})", flush=True)
        ctx = dict(device=device, vit=vit, model=model, folder=folder, peaks=peaks, tiny=args.tiny, work=work,
                   repeats=args.repeats, repeats_c=max(2, args.repeats // 2),
                   batches=(4, 8) if args.tiny else (64, 256), e2e_batch=4 if args.tiny else 64,
                   reward_batch=2 if args.tiny else 32, draft_batch=1 if args.tiny else 2,
                   ddim_steps=5 if args.tiny else 20, head_identities=4 if args.tiny else 128,
                   deadline=started + args.budget_s)
        for key in wanted:
            title, fn = SECTIONS[key]
            elapsed = time.perf_counter() - started
            if elapsed > args.budget_s:
                print(f"\n## {key}. {title}\n\nskipped: {elapsed:.0f} s already spent (--budget-s {args.budget_s})")
                report["sections"][key] = {"title": title, "skipped": True}
                continue
            t0 = time.perf_counter()
            try:
                result = fn(ctx)
            except Exception as exc:  # one failing section must not lose the others' results
                traceback.print_exc()
                result = {"error": f"{type(exc).__name__}: {exc}", "markdown": f"failed: {type(exc).__name__}: {exc}"}
            result["title"], result["seconds"] = title, time.perf_counter() - t0
            report["sections"][key] = result
            print(f"\n## {key}. {title} ({result['seconds']:.0f} s)\n\n{result['markdown']}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if args.json:  # rewritten after every section: a run stopped later keeps what it measured
                with atomic_write(Path(args.json), "w") as handle:
                    json.dump(report, handle, indent=2, default=str)
    report["total_seconds"] = time.perf_counter() - started
    print(f"\ntotal {report['total_seconds']:.0f} s")
    if args.json:
        with atomic_write(Path(args.json), "w") as handle:
            json.dump(report, handle, indent=2, default=str)
    if args.markdown:
        lines = [f"# GPU-scale measurements ({env['date']})", "",
                 " | ".join(f"{k} {v}" for k, v in env.items() if k != "date"), ""]
        for key, result in report["sections"].items():
            body = "skipped (time budget)" if result.get("skipped") else result["markdown"]
            lines += [f"## {key}. {result['title']}", "", body, ""]
        with atomic_write(Path(args.markdown), "w") as handle:
            handle.write("\n".join(lines))
    failed = [k for k, r in report["sections"].items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
