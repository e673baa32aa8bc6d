"""The experimental identity loss (``--nearid_loss_weight``) on real tiny components: its sign and its weight.

The launcher's end-to-end test shows that weight 0 is the plain run bit for bit and that a positive weight changes
the LoRA; here, on the hook itself, a gradient step of the weighted loss must raise the NearID identity of the very
sample it was computed on (the one-step x0 of the kept denoiser call), and weight 0 must leave the step untouched.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import UNet2DConditionModel  # noqa: E402

from integrations.identity_loss import IdentityLossHook  # noqa: E402
from nearid_reward import ReferenceSet  # noqa: E402
from nearid_reward.testing import random_images, tiny_nearid_model  # noqa: E402
from nearid_reward.testing.pipelines import save_tiny_sd_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("pipe") / "sd", image_size=32)


def _hook(pipeline_dir: Path, weight: float) -> IdentityLossHook:
    model = tiny_nearid_model()
    references = ReferenceSet.from_images(model, random_images(3, 32, seed=7))
    session = SimpleNamespace(
        options=SimpleNamespace(nearid_loss_weight=weight, nearid_loss_max_timestep=1000),
        args=SimpleNamespace(pretrained_model_name_or_path=str(pipeline_dir), with_prior_preservation=False),
        strict=True, nearid_model=lambda: model, reference_set=lambda: references,
    )  # fmt: skip
    return IdentityLossHook(SimpleNamespace(device=torch.device("cpu")), session)


def _train_step(pipeline_dir: Path, weight: float, lr: float) -> tuple[float, float, float]:
    """One SGD step on the UNet with the script's (zero) loss plus the hook's weighted identity loss.

    Returns the identity loss of the kept sample before and after the step, and the largest weight change.
    """
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(str(pipeline_dir), subfolder="unet").train()
    hook = _hook(pipeline_dir, weight)
    hook.register(unet)
    generator = torch.Generator().manual_seed(3)
    noisy = torch.randn(2, 4, 16, 16, generator=generator)
    timesteps = torch.tensor([50, 200])
    text = torch.randn(2, 8, unet.config.cross_attention_dim, generator=generator)

    def forward() -> torch.Tensor:
        return unet(noisy, timesteps, text).sample  # the hook keeps this call

    script_loss = 0.0 * forward().sum()  # the script's own loss contributes no gradient here
    before = [p.detach().clone() for p in unet.parameters()]
    hook.backward(lambda loss: loss.backward(), script_loss)
    assert hook.applied == 1 and hook.last_value is not None
    loss_before = hook.last_value
    with torch.no_grad():
        for p in unet.parameters():
            if p.grad is not None:
                p -= lr * p.grad
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(unet.parameters(), before))
    forward()  # the same call after the step (train mode, so the hook keeps it)
    with torch.no_grad():
        loss_after = float(hook.identity_loss())
    return loss_before, loss_after, moved


def test_a_positive_weight_raises_the_identity_of_the_sample_it_scored(pipeline_dir: Path) -> None:
    loss_before, loss_after, moved = _train_step(pipeline_dir, weight=1.0, lr=0.05)
    assert moved > 0
    # 1 - identity fell: the step moved the denoiser towards the references (a sign error would raise it)
    assert loss_after < loss_before - 1e-4, (loss_before, loss_after)


def test_weight_zero_leaves_the_step_untouched(pipeline_dir: Path) -> None:
    loss_before, loss_after, moved = _train_step(pipeline_dir, weight=0.0, lr=0.05)
    assert moved == 0.0 and loss_after == pytest.approx(loss_before, abs=1e-7)
