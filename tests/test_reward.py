"""IdentityReward: hand-computed scores, gradients, invariances, reference caching, options and bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nearid_reward import IdentityReward, NearIDModel, RewardConfig
from nearid_reward.reward import hinge_loss, identity_loss, penalised_reward
from nearid_reward.testing import random_images, save_tiny_nearid, write_random_images


@pytest.fixture(scope="module")
def nearid_path(tmp_path_factory):
    return save_tiny_nearid(tmp_path_factory.mktemp("nearid"), format="head")


@pytest.fixture
def model(nearid_path):
    return NearIDModel.from_pretrained(nearid_path)


@pytest.fixture
def refs():
    return random_images(4, 48, seed=11)


def _manual_scores(model, images, refs, aggregate):
    with torch.no_grad():
        e = model.embed(images)
        r = model.embed(refs)
    sims = e @ r.T  # unit-norm embeddings: dot product = cosine
    if aggregate == "mean":
        return sims.mean(1)
    if aggregate == "max":
        return sims.max(1).values
    centroid = r.mean(0)
    return e @ (centroid / centroid.norm())


@pytest.mark.parametrize("aggregate", ["mean", "max", "centroid"])
def test_scores_match_hand_computation(model, refs, aggregate):
    reward = IdentityReward(model, refs, aggregate=aggregate)
    images = random_images(3, 40, seed=5)
    expected = _manual_scores(model, images, refs, aggregate)
    torch.testing.assert_close(reward(images).detach(), expected, atol=1e-5, rtol=0)
    assert reward.higher_is_better is True


def test_relative_kind_divides_by_leave_one_out_oracle(model, refs):
    reward = IdentityReward(model, refs, kind="relative")
    with torch.no_grad():
        r = model.embed(refs)
    loo = [torch.cat([r[:i], r[i + 1 :]]) @ r[i] for i in range(4)]
    oracle = torch.stack([x.mean() for x in loo]).mean()
    assert reward.oracle == pytest.approx(float(oracle), abs=1e-6)
    images = random_images(2, 32, seed=3)
    expected = _manual_scores(model, images, refs, "mean") / oracle
    torch.testing.assert_close(reward(images).detach(), expected, atol=1e-5, rtol=0)


def test_negative_penalty(model, refs):
    negatives = random_images(3, 48, seed=99)
    reward = IdentityReward(model, refs, negatives=negatives, negative_weight=0.5)
    images = random_images(2, 48, seed=4)
    with torch.no_grad():
        e, n = model.embed(images), model.embed(negatives)
    expected = _manual_scores(model, images, refs, "mean") - 0.5 * (e @ n.T).max(1).values
    out = reward.score(images)
    torch.testing.assert_close(out.reward.detach(), expected, atol=1e-5, rtol=0)
    # an image identical to a negative is penalised by exactly lambda * 1
    same = reward.score(negatives[:1])
    assert float(same.negative) == pytest.approx(1.0, abs=1e-5)
    assert float(same.reward) == pytest.approx(float(same.identity) - 0.5, abs=1e-5)
    reward.set_negatives(None)
    assert reward.num_negatives == 0 and reward.score(images).negative is None


def test_pure_loss_helpers_hand_worked():
    s = torch.tensor([1.0, 0.25, -0.5])
    torch.testing.assert_close(identity_loss(s), torch.tensor([0.0, 0.75, 1.5]))
    torch.testing.assert_close(hinge_loss(s, 0.5), torch.tensor([0.0, 0.25, 1.0]))
    penalised = penalised_reward(s, torch.tensor([0.2, 0.4, 0.0]), 2.0)
    torch.testing.assert_close(penalised, torch.tensor([0.6, -0.55, -0.5]))
    assert penalised_reward(s, None, 3.0) is s


def test_gradcheck_of_scoring_maths_float64(model, refs):
    reward = IdentityReward(model, refs, negatives=random_images(2, 48, seed=8), kind="relative").to(torch.float64)
    assert reward.reference_embeddings.dtype == torch.float64  # buffers follow the module's dtype
    emb = F.normalize(torch.randn(3, model.embed_dim, dtype=torch.float64), dim=-1).requires_grad_()
    assert torch.autograd.gradcheck(lambda e: reward.score_embeddings(e).reward, (emb,))
    centroid = IdentityReward(model, refs, aggregate="centroid").to(torch.float64)
    assert torch.autograd.gradcheck(lambda e: centroid.score_embeddings(e).reward, (emb,))


@pytest.mark.parametrize("kind,aggregate,value_range", [
    ("cosine", "mean", (0.0, 255.0)), ("relative", "max", (-1.0, 1.0)), ("cosine", "centroid", (0.0, 1.0)),
])
def test_pixel_gradient_of_the_whole_reward_matches_finite_differences(model, refs, kind, aggregate, value_range):
    """Autograd through value-range scaling, the antialiased resize (45 -> 32), normalisation, the SigLIP encoder, the
    head, the aggregation, the oracle division and the negative penalty, against central differences in float64."""
    reward = IdentityReward(model, refs, negatives=random_images(2, 40, seed=8), kind=kind,
                            aggregate=aggregate).double()
    assert reward.model.preprocess.height == 32
    lo, hi = value_range
    unit = 0.1 + 0.8 * random_images(2, 45, seed=3).double()  # away from 0 and 1, where the resize clamps
    images = (lo + (hi - lo) * unit).requires_grad_()
    out = reward(images, value_range=value_range)
    assert out.dtype == torch.float64
    (grad,) = torch.autograd.grad(out.sum(), images)
    generator = torch.Generator().manual_seed(0)
    eps = 1e-5 * (hi - lo)  # a step of 1e-5 of the range: truncation and rounding errors both below 1e-8
    for _ in range(3):
        direction = torch.randn(images.shape, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            plus = reward(images + eps * direction, value_range=value_range).sum()
            minus = reward(images - eps * direction, value_range=value_range).sum()
        numeric = (plus - minus) / (2 * eps)
        analytic = (grad * direction).sum()
        assert abs(numeric) > 1e-5 / (hi - lo)  # a direction that moves the reward
        assert analytic.item() == pytest.approx(numeric.item(), rel=1e-5), (analytic.item(), numeric.item())


def test_gradients_reach_pixels_never_weights_and_encoder_stays_eval(model, refs):
    model.head.requires_grad_(True)  # as a head trainer would leave it
    reward = IdentityReward(model, refs)
    assert not any(p.requires_grad for p in reward.parameters())
    reward.train()
    assert reward.training and not reward.model.training and not reward.model.backbone.training
    parent = torch.nn.Sequential(reward)
    parent.train()
    assert not any(m.training for m in reward.model.modules())
    images = random_images(2, 64, seed=1).requires_grad_()
    reward.loss(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.parameters())


def test_hinge_loss_has_no_gradient_above_threshold(model, refs):
    reward = IdentityReward(model, refs)
    images = random_images(2, 48, seed=2).requires_grad_()
    scores = reward(images).detach()
    threshold = float(scores.min()) - 0.01  # both images already above the bar
    loss = reward.loss(images, hinge_threshold=threshold)
    assert torch.all(loss == 0)
    loss.sum().backward()
    assert images.grad is None or torch.all(images.grad == 0)


def test_batch_invariance_and_chunking(model, refs):
    reward = IdentityReward(model, refs)
    images = random_images(5, 48, seed=7)
    together = reward(images)
    apart = torch.cat([reward(images[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(together, apart, atol=1e-5, rtol=0)
    chunked = IdentityReward(model, refs, chunk_size=2)(images)
    torch.testing.assert_close(together, chunked, atol=1e-5, rtol=0)


def test_value_range_equivalence(model, refs):
    reward = IdentityReward(model, refs)
    x = random_images(3, 48, seed=9)
    a = reward(x)
    b = reward(x * 2 - 1, value_range=(-1.0, 1.0))
    c = reward(x * 255, value_range=(0.0, 255.0))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
    ref_pm1 = IdentityReward(model, refs * 2 - 1, reference_value_range=(-1, 1))
    torch.testing.assert_close(ref_pm1.reference_embeddings, reward.reference_embeddings, atol=1e-5, rtol=0)


def test_references_are_embedded_once_and_replaced(model, refs, monkeypatch):
    calls = []
    original = NearIDModel.embed

    def counting(self, images, **kwargs):
        calls.append(images.shape[0] if isinstance(images, torch.Tensor) else len(images))
        return original(self, images, **kwargs)

    monkeypatch.setattr(NearIDModel, "embed", counting)
    reward = IdentityReward(model, refs)
    assert calls == [4]
    for _ in range(3):
        reward(random_images(2, 32, seed=1))
    assert calls == [4, 2, 2, 2]  # only the generated images are embedded on each call
    cached = reward.reference_embeddings.clone()
    assert "reference_embeddings" not in reward.state_dict()  # data, not weights
    other = random_images(2, 48, seed=21)
    reward.set_references(other)
    fresh = IdentityReward(model, other)
    torch.testing.assert_close(reward.reference_embeddings, fresh.reference_embeddings)
    assert not torch.allclose(reward.reference_embeddings[:2], cached[:2])
    assert reward.num_references == 2


def test_reference_inputs_files_folder_pil(model, nearid_path, tmp_path):
    paths = write_random_images(tmp_path / "refs", 3, 40, seed=4)
    from_folder = IdentityReward(model, tmp_path / "refs")
    from_files = IdentityReward(model, [str(p) for p in paths])
    from_pil = IdentityReward(model, [Image.open(p) for p in paths])
    torch.testing.assert_close(from_folder.reference_embeddings, from_files.reference_embeddings)
    torch.testing.assert_close(from_folder.reference_embeddings, from_pil.reference_embeddings)
    from_path_model = IdentityReward(str(nearid_path), tmp_path / "refs")
    assert from_path_model.num_references == 3


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_reference_photos_are_read_upright_from_their_exif_orientation(model, tmp_path, suffix):
    """A phone photo stored sideways with an EXIF orientation tag is scored as the upright photo (as the diffusers
    DreamBooth scripts train on it), not as the sideways pixels."""
    rng = np.random.default_rng(0)
    upright = Image.fromarray(rng.integers(0, 256, (48, 32, 3), dtype=np.uint8))  # portrait: 32 wide, 48 high
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # the sensor's landscape pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    (tmp_path / "tagged").mkdir()
    (tmp_path / "plain").mkdir()
    stored.save(tmp_path / "tagged" / f"photo{suffix}", exif=exif.tobytes(), quality=100)
    stored.save(tmp_path / "plain" / f"photo{suffix}", quality=100)
    # the upright reference is the tagged file's own pixels turned upright (JPEG is lossy: not `upright` itself)
    with Image.open(tmp_path / "plain" / f"photo{suffix}") as img:
        expected = img.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    tagged = IdentityReward(model, tmp_path / "tagged")
    torch.testing.assert_close(tagged.reference_embeddings, IdentityReward(model, [expected]).reference_embeddings)
    sideways = IdentityReward(model, tmp_path / "plain").reference_embeddings
    assert not torch.allclose(tagged.reference_embeddings, sideways, atol=1e-3)
    images = random_images(2, 48, seed=3)
    torch.testing.assert_close(tagged(images), IdentityReward(model, [expected])(images))


def test_reward_fn_adapter(model, refs):
    reward = IdentityReward(model, refs, negatives=random_images(2, 48, seed=30))
    images = random_images(3, 48, seed=12)
    rewards, info = reward.reward_fn(images, ("a", "b", "c"), ({}, {}, {}))
    torch.testing.assert_close(rewards, reward(images))
    assert set(info) == {"identity", "negative", "reference_oracle"}
    assert not info["identity"].requires_grad
    uint8 = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # [B, H, W, 3] as Flow-GRPO passes
    r8, _ = reward.reward_fn(uint8, None, None)
    torch.testing.assert_close(r8, rewards, atol=2e-3, rtol=0)
    pil = [Image.fromarray(a) for a in uint8]
    rp, _ = reward.reward_fn(pil, None, None)
    assert rp.shape == (3,)
    images.requires_grad_()
    r, _ = reward.reward_fn(images, None, None)
    r.sum().backward()  # AlignProp-style: the reward keeps its gradient
    assert images.grad is not None


def test_low_precision_backbone_and_gradient_checkpointing(nearid_path, refs):
    images = random_images(2, 48, seed=14)
    full = IdentityReward(nearid_path, refs)
    half = IdentityReward(nearid_path, refs, backbone_dtype=torch.bfloat16)
    assert half.model.dtype == torch.bfloat16 and half.model.head.probe.dtype == torch.float32
    assert half.config.backbone_dtype == "bfloat16"
    out = half(images)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, full(images), atol=3e-2, rtol=0)

    x1 = images.clone().requires_grad_()
    full(x1).sum().backward()
    ckpt = IdentityReward(nearid_path, refs, gradient_checkpointing=True)
    assert ckpt.model.is_gradient_checkpointing
    x2 = images.clone().requires_grad_()
    ckpt(x2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-5)


def test_bad_input_errors(model, refs):
    with pytest.raises(ValueError, match="`references` is empty"):
        IdentityReward(model, [])
    with pytest.raises(ValueError, match="`references` is empty"):
        IdentityReward(model, torch.zeros(0, 3, 32, 32))
    with pytest.raises(ValueError, match="at least 2 references"):
        IdentityReward(model, refs[:1], kind="relative")
    with pytest.raises(TypeError, match="unknown options"):
        IdentityReward(model, refs, agregate="max")
    with pytest.raises(TypeError, match="`model` must be a NearIDModel"):
        IdentityReward(42, refs)
    with pytest.raises(ValueError, match="contains NaN"):
        IdentityReward(model, torch.full((2, 3, 32, 32), float("nan")))
    reward = IdentityReward(model, refs, check_inputs=True)
    bad = random_images(2, 32)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        reward(bad)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\], got shape \(3, 32, 32\)"):
        reward(random_images(1, 32)[0])
    with pytest.raises(ValueError, match="value_range"):
        reward(random_images(1, 32) * 255)
    with pytest.raises(ValueError, match="reference embeddings must be a tensor"):
        reward.set_reference_embeddings(torch.zeros(3, model.embed_dim + 1))
    with pytest.raises(ValueError, match="RewardConfig.aggregate"):
        RewardConfig(aggregate="median")
    with pytest.raises(ValueError, match="RewardConfig.negative_weight"):
        RewardConfig(negative_weight=-1)
    with pytest.raises(ValueError, match="RewardConfig.backbone_dtype"):
        RewardConfig(backbone_dtype="int8")


def test_import_stays_light():
    code = (
        "import sys, nearid_reward; "
        "bad = sorted({m.split('.')[0] for m in sys.modules} & "
        "{'diffusers', 'peft', 'matplotlib', 'datasets', 'train_head', 'integrations'}); print(bad)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.gpu
def test_reward_follows_the_module_to_cuda(model, refs):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    images = random_images(2, 48, seed=3)
    reward = IdentityReward(model, refs)
    expected = reward(images)
    reward.to("cuda")
    assert reward.reference_embeddings.device.type == "cuda" and reward.reference_oracle.device.type == "cuda"
    x = images.cuda().requires_grad_()
    out = reward(x)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=0)
    out.sum().backward()
    assert x.grad is not None and all(p.grad is None for p in reward.parameters())
