"""The differentiable DDIM sampler: it reproduces the diffusers pipeline, and the identity reward's gradient
reaches the images and the UNet's LoRA tensors (never the NearID weights) through a short sampling loop."""

from __future__ import annotations

import pytest
import torch

from nearid_reward import IdentityReward, NearIDModel, SamplerConfig
from nearid_reward.diffusion import ddim_sample, decode_latents, encode_prompts, initial_latents, sample_images
from nearid_reward.testing import random_images, save_tiny_nearid
from nearid_reward.testing.pipelines import add_lora_adapter, build_tiny_sd_pipeline

PROMPTS = ["a photo of sks dog", "a photo of sks dog on the beach"]


@pytest.fixture(scope="module")
def reward(tmp_path_factory):
    model = NearIDModel.from_pretrained(save_tiny_nearid(tmp_path_factory.mktemp("nearid")))
    return IdentityReward(model, random_images(3, 48, seed=1))


@pytest.fixture
def pipe():
    pipe = build_tiny_sd_pipeline(seed=0)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    return pipe


def _generators(n: int, offset: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sampler_reproduces_the_pipeline(pipe, guidance):
    config = SamplerConfig(num_inference_steps=3, grad_steps=0, guidance_scale=guidance)
    with torch.no_grad():
        ours = sample_images(pipe, PROMPTS, config=config, generator=_generators(2))
    theirs = pipe(PROMPTS, num_inference_steps=3, guidance_scale=guidance, output_type="pt",
                  generator=_generators(2)).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert ours.shape == (2, 3, 64, 64) and 0.0 <= float(ours.min()) and float(ours.max()) <= 1.0


def test_reward_gradient_reaches_lora_b_and_images_not_nearid(pipe, reward):
    add_lora_adapter(pipe.unet, rank=4, seed=None)  # peft init: lora_B = 0
    images = sample_images(pipe, PROMPTS, config=SamplerConfig(num_inference_steps=3, grad_steps=2),
                           generator=_generators(2))
    images.retain_grad()
    reward.loss(images).mean().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    grads_b = [p.grad for n, p in pipe.unet.named_parameters() if "lora_B" in n]
    grads_a = [p.grad for n, p in pipe.unet.named_parameters() if "lora_A" in n]
    assert len(grads_b) == 32 and all(g is not None and g.abs().sum() > 0 for g in grads_b)
    # with lora_B = 0 the gradient of lora_A is exactly zero on the first step (documented peft behaviour)
    assert all(g is None or torch.all(g == 0) for g in grads_a)
    assert all(p.grad is None for p in reward.parameters())
    frozen = [p for n, p in pipe.unet.named_parameters() if "lora" not in n]
    assert all(p.grad is None for p in frozen)


def test_only_the_last_k_steps_carry_gradients(pipe):
    params = add_lora_adapter(pipe.unet, rank=4, seed=3)
    latents = initial_latents(pipe, 2, generator=_generators(2))
    embeds, _ = encode_prompts(pipe, PROMPTS)
    calls: list[bool] = []
    hook = pipe.unet.register_forward_hook(lambda m, a, o: calls.append(torch.is_grad_enabled()))
    try:
        out = ddim_sample(pipe.unet, pipe.scheduler, latents, embeds,
                          config=SamplerConfig(num_inference_steps=4, grad_steps=1))
    finally:
        hook.remove()
    assert calls == [False, False, False, True]
    decode_latents(pipe.vae, out).mean().backward()
    assert all(p.grad is not None for p in params)
    config = SamplerConfig(num_inference_steps=2, grad_steps=0)
    none = ddim_sample(pipe.unet, pipe.scheduler, latents, embeds, config=config)
    assert not none.requires_grad
    assert pipe.scheduler.num_inference_steps is None  # the pipeline's scheduler was not touched


def test_gradient_checkpointing_gives_the_same_gradients(pipe):
    params = add_lora_adapter(pipe.unet, rank=4, seed=5)
    grads = []
    for checkpointing in (False, True):
        for p in params:
            p.grad = None
        config = SamplerConfig(num_inference_steps=2, grad_steps=2, gradient_checkpointing=checkpointing)
        sample_images(pipe, PROMPTS[:1], config=config, generator=_generators(1)).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-7, rtol=1e-4)


def test_sampler_bad_input(pipe):
    with pytest.raises(ValueError, match="grad_steps"):
        SamplerConfig(num_inference_steps=2, grad_steps=3)
    with pytest.raises(ValueError, match="guidance_scale"):
        SamplerConfig(guidance_scale=0.5)
    latents = initial_latents(pipe, 2, generator=_generators(2))
    embeds, _ = encode_prompts(pipe, PROMPTS)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        ddim_sample(pipe.unet, pipe.scheduler, latents, embeds, config=SamplerConfig(guidance_scale=2.0))
    with pytest.raises(ValueError, match="batch"):
        ddim_sample(pipe.unet, pipe.scheduler, latents[:1], embeds)
    with pytest.raises(ValueError, match="non-empty list"):
        encode_prompts(pipe, "a photo")
    with pytest.raises(ValueError, match="multiples"):
        initial_latents(pipe, 1, height=63)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sampler_reproduces_the_sdxl_pipeline(guidance):
    from diffusers import DDIMScheduler

    from nearid_reward.testing.pipelines import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline(seed=0)  # ships an Euler scheduler: the DDIM sampler must use DDIM's own sigma
    config = SamplerConfig(num_inference_steps=3, grad_steps=0, guidance_scale=guidance)
    with torch.no_grad():
        ours = sample_images(pipe, PROMPTS, config=config, generator=_generators(2))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    theirs = pipe(PROMPTS, num_inference_steps=3, guidance_scale=guidance, output_type="pt",
                  generator=_generators(2)).images
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])
def test_predict_x0_inverts_the_forward_process(kind):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from nearid_reward.diffusion import predict_x0

    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    if kind == "flow":
        sched = FlowMatchEulerDiscreteScheduler()
        sigma = torch.tensor([0.1, 0.5, 0.9]).view(-1, 1, 1, 1)
        noisy, target, t = (1 - sigma) * x0 + sigma * noise, noise - x0, sigma.flatten() * 1000
    else:
        sched = DDPMScheduler(prediction_type=kind)
        t = torch.tensor([10, 500, 900])
        noisy = sched.add_noise(x0, noise, t)
        target = noise if kind == "epsilon" else sched.get_velocity(x0, noise, t)
    torch.testing.assert_close(predict_x0(target, noisy, t, sched), x0, atol=1e-4, rtol=0)


def test_reward_weights_hand_worked():
    from nearid_reward.diffusion import reward_weights

    w = reward_weights(torch.tensor([1.0, 1.0, 1.0]))
    torch.testing.assert_close(w, torch.ones(3))
    w = reward_weights(torch.tensor([0.0, 2.0]), temperature=1.0)  # standardised to [-1, 1]
    e = torch.exp(torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(w, 2 * e / e.sum())
    assert reward_weights(torch.tensor([0.0, 10.0]), temperature=0.1)[1] > 1.99
    with pytest.raises(ValueError, match="temperature"):
        reward_weights(torch.tensor([1.0]), temperature=0.0)


def test_denoising_loss_is_zero_against_itself_and_reaches_lora(pipe):
    from diffusers import DDPMScheduler

    from nearid_reward.diffusion import denoising_loss

    params = add_lora_adapter(pipe.unet, rank=4, seed=3)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    latents = torch.randn(2, 4, 32, 32)
    embeds, _ = encode_prompts(pipe, PROMPTS)
    same = denoising_loss(pipe.unet, sched, latents, embeds, target_unet=pipe.unet, generator=torch.Generator())
    torch.testing.assert_close(same, torch.zeros(2))
    loss = denoising_loss(pipe.unet, sched, latents, embeds, generator=torch.Generator().manual_seed(0))
    assert loss.shape == (2,) and bool((loss > 0).all())
    loss.mean().backward()
    assert all(p.grad is not None for p in params)


def test_refl_images_carry_gradients_from_one_unet_call(pipe, reward):
    from nearid_reward.diffusion import refl_images

    params = add_lora_adapter(pipe.unet, rank=4, seed=None)
    calls: list[bool] = []
    hook = pipe.unet.register_forward_hook(lambda m, a, o: calls.append(torch.is_grad_enabled()))
    try:
        images = refl_images(pipe, PROMPTS, stop_index=2, num_inference_steps=4, generator=_generators(2))
    finally:
        hook.remove()
    assert calls == [False, False, True]
    reward.loss(images).mean().backward()
    assert all(p.grad is not None for n, p in pipe.unet.named_parameters() if "lora_B" in n)
    assert images.shape == (2, 3, 64, 64) and len(params) == 64
