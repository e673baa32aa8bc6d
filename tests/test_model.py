"""NearIDModel against transformers' own SigLIP: parity, gradients, frozen weights, options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import Siglip2ImageProcessorPil, Siglip2VisionModel, SiglipImageProcessorPil, SiglipVisionModel

from nearid_reward import NearIDModel
from nearid_reward.testing import random_images, save_tiny_siglip


def _hf_embedding(model: torch.nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model(**inputs).pooler_output, dim=-1)


def test_parity_with_transformers_siglip(tiny_siglip: Path) -> None:
    ours = NearIDModel.from_pretrained(tiny_siglip)
    ref = SiglipVisionModel.from_pretrained(tiny_siglip).eval()
    x = random_images(5, 32, seed=3)  # already at model resolution: no resize on either side
    with torch.no_grad():
        emb = ours.embed(x)
    expected = _hf_embedding(ref, pixel_values=(x - 0.5) / 0.5)
    cos = (emb * expected).sum(-1)
    assert emb.shape == (5, 32)
    assert cos.min().item() >= 0.99999
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-5)


def test_parity_with_transformers_siglip_on_pil_images(tiny_siglip: Path) -> None:
    ours = NearIDModel.from_pretrained(tiny_siglip)
    ref = SiglipVisionModel.from_pretrained(tiny_siglip).eval()
    processor = SiglipImageProcessorPil.from_pretrained(tiny_siglip)
    images = [
        Image.fromarray((random_images(1, (45, 70), seed=i)[0].permute(1, 2, 0).numpy() * 255).astype("uint8"))
        for i in range(3)
    ]
    with torch.no_grad():
        emb = ours.embed(images)
    expected = _hf_embedding(ref, **processor(images=images, return_tensors="pt"))
    assert (emb * expected).sum(-1).min().item() >= 0.99999


def test_parity_with_transformers_siglip2_naflex(tiny_siglip2: Path) -> None:
    ours = NearIDModel.from_pretrained(tiny_siglip2)
    ref = Siglip2VisionModel.from_pretrained(tiny_siglip2).eval()
    processor = Siglip2ImageProcessorPil.from_pretrained(tiny_siglip2)
    sizes = [(32, 32), (24, 64), (70, 20)]  # different aspect ratios -> different patch grids and padding
    images = [
        Image.fromarray((random_images(1, s, seed=i)[0].permute(1, 2, 0).numpy() * 255).astype("uint8"))
        for i, s in enumerate(sizes)
    ]
    with torch.no_grad():
        emb = ours.embed(images)
    expected = _hf_embedding(ref, **processor(images=images, return_tensors="pt"))
    assert (emb * expected).sum(-1).min().item() >= 0.99999


def test_full_vision_text_checkpoint_loads_the_vision_tower(tmp_path: Path) -> None:
    full = save_tiny_siglip(tmp_path / "full", with_text=True, seed=4)
    vision_only = SiglipVisionModel.from_pretrained(full).eval()  # transformers extracts the same tower
    ours = NearIDModel.from_pretrained(full)
    x = random_images(2, 32)
    with torch.no_grad():
        got = ours.embed(x)
    expected = _hf_embedding(vision_only, pixel_values=(x - 0.5) / 0.5)
    assert (got * expected).sum(-1).min().item() >= 0.99999


def test_original_siglip_head_is_not_built_or_run(tiny_siglip: Path) -> None:
    model = NearIDModel.from_pretrained(tiny_siglip)
    assert not hasattr(model.backbone, "head")
    assert model.backbone.config.vision_use_head is False
    pooling_heads = [m for m in model.modules() if type(m).__name__.endswith("MultiheadAttentionPoolingHead")]
    assert pooling_heads == []


def test_gradients_reach_pixels_and_never_parameters(tiny_head: Path) -> None:
    model = NearIDModel.from_pretrained(tiny_head)
    x = random_images(3, 40).requires_grad_(True)
    emb = model.embed(x)
    emb[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum().item() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(tiny_head: Path) -> None:
    model = NearIDModel.from_pretrained(tiny_head)
    x = random_images(2, 40)
    grads = []
    for enabled in (False, True):
        if enabled:
            model.gradient_checkpointing_enable()
        xi = x.clone().requires_grad_(True)
        model.embed(xi).pow(3).sum().backward()
        grads.append(xi.grad)
    assert model.is_gradient_checkpointing
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    assert "forward" not in vars(model.backbone.encoder.layers[0])


def test_backbone_stays_in_eval_mode(tiny_head: Path) -> None:
    model = NearIDModel.from_pretrained(tiny_head)
    parent = torch.nn.Sequential(model)
    parent.train()
    assert not model.backbone.training
    assert all(not m.training for m in model.backbone.modules())


def test_batch_invariance_and_chunking(tiny_head: Path) -> None:
    model = NearIDModel.from_pretrained(tiny_head)
    x = random_images(5, 37, seed=1)
    with torch.no_grad():
        whole = model.embed(x)
        parts = torch.cat([model.embed(x[i : i + 1]) for i in range(5)])
        chunked = model.embed(x, chunk_size=2)
    assert torch.allclose(whole, parts, atol=1e-5)
    assert torch.allclose(whole, chunked, atol=1e-5)


def test_value_range_equivalence(tiny_head: Path) -> None:
    model = NearIDModel.from_pretrained(tiny_head)
    x = random_images(2, 40, seed=2)
    with torch.no_grad():
        a = model.embed(x)
        b = model.embed(x * 2 - 1, value_range=(-1.0, 1.0))
        c = model.embed(x * 255, value_range=(0.0, 255.0))
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)


def test_tensor_numpy_pil_and_path_inputs_agree(tiny_head: Path, tmp_path: Path) -> None:
    model = NearIDModel.from_pretrained(tiny_head)
    x = random_images(2, 32, seed=7)  # model resolution: the tensor and PIL paths only differ by 8-bit rounding
    arrays = [(img.permute(1, 2, 0).numpy() * 255).round().astype("uint8") for img in x]
    paths = []
    for i, arr in enumerate(arrays):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(arr).save(paths[-1])
    with torch.no_grad():
        from_tensor = model.embed(x)
        from_numpy = model.embed(arrays)
        from_pil = model.embed([Image.fromarray(a) for a in arrays])
        from_paths = model.embed([str(p) for p in paths])
        from_folder = model.embed(tmp_path)
    assert (
        torch.equal(from_numpy, from_pil)
        and torch.equal(from_pil, from_paths)
        and torch.equal(from_paths, from_folder)
    )
    assert (from_tensor * from_pil).sum(-1).min().item() > 0.9999


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_backbone_with_fp32_head(tiny_head: Path, dtype: torch.dtype) -> None:
    full = NearIDModel.from_pretrained(tiny_head)
    low = NearIDModel.from_pretrained(tiny_head, torch_dtype=dtype, head_dtype=torch.float32)
    assert low.dtype == dtype and next(low.head.parameters()).dtype == torch.float32
    x = random_images(2, 40)
    with torch.no_grad():
        a, b = full.embed(x), low.embed(x)
    assert b.dtype == torch.float32
    assert (a * b).sum(-1).min().item() > 0.99


def test_eager_and_sdpa_attention_agree(tiny_head: Path) -> None:
    x = random_images(2, 32)
    with torch.no_grad():
        a = NearIDModel.from_pretrained(tiny_head, attn_implementation="sdpa").embed(x)
        b = NearIDModel.from_pretrained(tiny_head, attn_implementation="eager").embed(x)
    assert torch.allclose(a, b, atol=1e-5)


def test_regional_compilation_keeps_embeddings_gradients_and_state_dict(tiny_head: Path, tmp_path: Path) -> None:
    import torch._dynamo

    model = NearIDModel.from_pretrained(tiny_head)
    x = random_images(3, 40)
    with torch.no_grad():
        expected = model.embed(x)
    xi = x.clone().requires_grad_(True)
    model.embed(xi).pow(3).sum().backward()
    keys = list(model.state_dict())
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    # "eager" runs dynamo's capture without code generation: the wiring is tested here, the speed on a GPU
    assert model.compile_regions(backend="eager") is model and model.is_compiled
    model.gradient_checkpointing_enable()
    with torch.no_grad():
        torch.testing.assert_close(model.embed(x), expected, atol=1e-6, rtol=1e-5)
    xc = x.clone().requires_grad_(True)
    model.embed(xc).pow(3).sum().backward()
    torch.testing.assert_close(xc.grad, xi.grad, atol=1e-6, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really captured the layers
    assert list(model.state_dict()) == keys  # no "_orig_mod." prefixes: checkpoints save and load as before
    model.save_pretrained(tmp_path / "saved", format="head")
    assert NearIDModel.from_pretrained(tmp_path / "saved").state_dict().keys() == model.state_dict().keys()
    torch._dynamo.reset()
