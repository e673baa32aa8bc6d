"""Measuring a personalised model of the generation world against the truth.

For one subject (a held-out identity) the pieces are: its three training views in three contexts, a look-alike that
differs in one attribute (three views on the same backgrounds), a fixed prompt/seed set that asks for the subject in
each of the four contexts, and, for every rendered sample:

* ``nearid`` / ``frozen`` / ``meanpool``: mean cosine to the subject's views under the world's trained NearID head,
  the backbone's own (frozen) pooling head, and mean-pooled backbone tokens (the CLIP-I/DINO-style baseline);
  ``leaveout``: under the second head, trained without part and secondary-colour distractors (where shipped);
* ``truth``: the oracle's true identity (:func:`nearid_world.oracle.true_identity`);
* ``prompt_fidelity``: the oracle reads the prompted context;
* ``copy_rate``: the oracle reads a training view's context other than the prompted one;
* ``lookalike_rate``: the oracle reads the look-alike's value of the attribute it changes.

Every figure is a mean over the samples, in [0, 1] except the cosines (in [-1, 1]); ``samples`` holds the
per-sample values of each (for bootstrapping samples, :mod:`nearid_world.stats`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from nearid_reward import NearIDModel
from nearid_reward.files import atomic_write, write_text_atomic
from nearid_reward.pipelines import load_pipeline
from nearid_reward.rendering import RenderConfig, render_images
from train_head.batching import mean_pool

from . import scenes
from .oracle import AttributeOracle, _unit, lookalike_hits, true_identity

__all__ = ["WorldAssets", "Subject", "make_subject", "Scorers", "EvalSet", "evaluate_images", "render_eval_set",
           "prompt_following", "attribute_rates", "autoencoder_ceiling"]

WEIGHTS = Path(__file__).resolve().parent / "weights"
PROMPTS = Path(__file__).resolve().parent / "prompts.json"
INSTANCE_PROMPT = f"a {scenes.INSTANCE_TOKEN} {scenes.CLASS_NOUN}"


@dataclass
class WorldAssets:
    """Where the world's shipped models live (default: ``nearid_world/weights``)."""

    root: Path = WEIGHTS

    @property
    def world_model(self) -> Path:
        return self.root / "world_model"

    @property
    def nearid(self) -> Path:
        return self.root / "nearid" / "head"

    @property
    def nearid_leaveout(self) -> Path:
        """The head trained without part and secondary-colour distractors (unseen look-alike kinds)."""
        return self.root / "nearid" / "head_leaveout"

    @property
    def leaveout_config(self) -> Path:
        return self.root / "nearid" / "head_leaveout_config.json"

    @property
    def encoder_config(self) -> Path:
        return self.root / "nearid" / "encoder_config.json"

    @property
    def backbone(self) -> Path:
        return self.root / "nearid" / "backbone"

    @property
    def oracle(self) -> Path:
        return self.root / "oracle"

    def check(self) -> None:
        for path in (self.world_model / "model_index.json", self.nearid, self.backbone, self.oracle):
            if not path.exists():
                raise FileNotFoundError(f"world asset {path} is missing: the shipped weights live in {WEIGHTS}; "
                                        "see docs/world.md for the commands that rebuild them")


@dataclass
class Subject:
    """One benchmark subject and the files made for it."""

    index: int
    identity: scenes.Identity
    lookalike: scenes.Identity
    changed: str
    contexts: list[str]
    instance_dir: Path
    negative_dir: Path

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "identity": self.identity.attributes(), "lookalike": self.lookalike.attributes(),
                "changed": self.changed, "contexts": self.contexts}


def make_subject(index: int, folder: str | Path, *, seed: int = 0, image_size: int = 32,
                 single_context: bool = False) -> Subject:
    """Held-out subject ``index``: write its three views and its look-alike's (same backgrounds) under ``folder``.

    The views are drawn in three different contexts; with ``single_context`` all three are drawn in the first of
    them (as photos taken in one room: each view keeps its own placement, lighting and background blotches), and
    ``Subject.contexts`` lists that one context three times. Everything else is drawn as without it.
    """
    ident = scenes.held_out_identities(index + 1)[index]
    rng = np.random.default_rng([seed, 7100, index])
    changed = scenes.NEAR_ATTRIBUTES[index % len(scenes.NEAR_ATTRIBUTES)]
    lookalike = scenes.near_identity(ident, changed, rng)
    contexts = [str(c) for c in rng.permutation(list(scenes.CONTEXTS))[:3]]
    if single_context:
        contexts = [contexts[0]] * 3
    root = Path(folder)
    inst, neg = root / "instance", root / "lookalike"
    inst.mkdir(parents=True, exist_ok=True)
    neg.mkdir(parents=True, exist_ok=True)
    for v, context in enumerate(contexts):
        ctx = scenes.view_context(context, rng)
        view_seed = int(rng.integers(2**31))
        for who, out in ((ident, inst), (lookalike, neg)):
            image = scenes.render_view(who, context, np.random.default_rng(view_seed), image_size, ctx=ctx)
            with atomic_write(out / f"view{v}.png", "wb") as handle:
                Image.fromarray(image).save(handle, format="PNG")
    subject = Subject(index, ident, lookalike, changed, contexts, inst, neg)
    write_text_atomic(root / "subject.json", json.dumps(subject.to_dict(), indent=2, sort_keys=True))
    return subject


class Scorers:
    """The identity scores of a sample against the subject's views: NearID, frozen head, mean pooling, and the
    leave-out head where it is shipped (``assets.nearid_leaveout``)."""

    def __init__(self, assets: WorldAssets, references: Path | Sequence[Any]) -> None:
        self.nearid = NearIDModel.from_pretrained(assets.nearid).eval()
        self.frozen = NearIDModel.from_pretrained(assets.backbone).eval()
        self.leaveout = (NearIDModel.from_pretrained(assets.nearid_leaveout).eval()
                         if (assets.nearid_leaveout / "head.safetensors").is_file() else None)
        self.set_references(references)

    @torch.no_grad()
    def embed(self, images: Any) -> dict[str, torch.Tensor]:
        """Unit embeddings per kind (``images``: float ``[B, 3, H, W]`` in [0, 1], or paths/PIL)."""
        tokens, mask = self.frozen.encode_tokens(self.frozen.prepare(images))  # one backbone pass for both baselines
        out = {"nearid": self.nearid.embed(images), "frozen": self.frozen.pool(tokens, mask),
               "meanpool": mean_pool(tokens, mask)}
        if self.leaveout is not None:
            out["leaveout"] = self.leaveout.embed(images)
        return out

    def set_references(self, references: Path | Sequence[Any]) -> None:
        self.references = self.embed(references)

    @torch.no_grad()
    def scores(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """Mean cosine of each image to the references, per kind: ``[N]`` arrays."""
        emb = self.embed(images)
        return {k: (emb[k] @ self.references[k].T).mean(1).numpy() for k in emb}


@dataclass
class EvalSet:
    """The fixed prompt/seed set: each context's prompt, ``per_context`` seeds each."""

    per_context: int = 4
    contexts: list[str] = field(default_factory=lambda: list(scenes.CONTEXTS))
    seed_offset: int = 10**8

    def prompts(self) -> list[str]:
        return [f"{INSTANCE_PROMPT} on the {c}" for c in self.contexts for _ in range(self.per_context)]

    def prompted_contexts(self) -> list[str]:
        return [c for c in self.contexts for _ in range(self.per_context)]

    def seeds(self) -> list[int]:
        return [self.seed_offset + i for i in range(len(self.contexts) * self.per_context)]


def render_eval_set(pipeline: Any, eval_set: EvalSet, config: RenderConfig) -> torch.Tensor:
    """Render the fixed set with the pipeline as it is (adapter on or off): float ``[N, 3, H, W]`` in [0, 1]."""
    return render_images(pipeline, eval_set.prompts(), seeds=eval_set.seeds(), config=config)


def evaluate_images(images: torch.Tensor, eval_set: EvalSet, subject: Subject, oracle: AttributeOracle,
                    scorers: Scorers) -> dict[str, float]:
    """Every figure of one rendered set (see the module docstring)."""
    predicted = oracle.predict(images)
    prompted = eval_set.prompted_contexts()
    scores = scorers.scores(images)
    truth = [true_identity(p, subject.identity) for p in predicted]
    fidelity = [p["context"] == c for p, c in zip(predicted, prompted)]
    copies = [p["context"] != c and p["context"] in subject.contexts for p, c in zip(predicted, prompted)]
    lookalike = [lookalike_hits(p, subject.lookalike, subject.identity) for p in predicted]
    result: dict[str, Any] = {k: float(v.mean()) for k, v in scores.items()}
    result |= {"truth": float(np.mean(truth)), "prompt_fidelity": float(np.mean(fidelity)),
               "copy_rate": float(np.mean(copies)), "lookalike_rate": float(np.mean(lookalike))}
    for name in scenes.IDENTITY_ATTRIBUTES:
        result[f"match_{name}"] = float(np.mean([p[name] == getattr(subject.identity, name) for p in predicted]))
    samples = {k: v.tolist() for k, v in scores.items()} | {
        "truth": truth, "prompt_fidelity": fidelity, "copy_rate": copies, "lookalike_rate": lookalike}
    result["samples"] = {k: [round(float(x), 5) for x in v] for k, v in samples.items()}  # [N] each
    return result


def load_world_pipeline(assets: WorldAssets) -> Any:
    """The shipped world model as a ``StableDiffusionPipeline`` (float32, CPU, safetensors only)."""
    return load_pipeline(assets.world_model, torch_dtype=torch.float32)


def prompt_following(pipeline: Any, oracle: AttributeOracle, *, count: int = 64, seed: int = 0,
                     config: RenderConfig | None = None, held_out: bool = False) -> dict[str, float]:
    """How often the model draws what a full prompt names: oracle accuracy per attribute, in [0, 1].

    ``count`` random identities (the held-out ones with ``held_out``, never seen in training) in random contexts,
    each prompted with every attribute ("a red and blue striped star with a hat on the beach").
    """
    idents, contexts = _draw_identities(np.random.default_rng([seed, 7200]), count, held_out=held_out)
    prompts = [scenes.prompt_for(i, c) for i, c in zip(idents, contexts)]
    cfg = config or RenderConfig(num_inference_steps=20, guidance_scale=4.0, batch_size=32)
    images = render_images(pipeline, prompts, seeds=[seed * 10**6 + i for i in range(count)], config=cfg)
    return attribute_rates(oracle.predict(images), idents, contexts)


def _draw_identities(rng: np.random.Generator, count: int, *,
                     held_out: bool = False) -> tuple[list[scenes.Identity], list[str]]:
    """``count`` random identities (held-out ones with ``held_out``, else never held-out ones), then their contexts."""
    pool = scenes.held_out_identities()
    idents = [pool[int(rng.integers(len(pool)))] if held_out else scenes.sample_identity(rng, pool)
              for _ in range(count)]
    contexts = [list(scenes.CONTEXTS)[int(rng.integers(len(scenes.CONTEXTS)))] for _ in range(count)]
    return idents, contexts


def attribute_rates(predicted: Sequence[dict[str, str]], identities: Sequence[scenes.Identity],
                    contexts: Sequence[str]) -> dict[str, float]:
    """Share of images in which the oracle reads each attribute it should, in [0, 1].

    Keys: the identity attributes, ``context``, and ``all_identity_attributes`` (all five read at once).
    """
    out = {name: float(np.mean([p[name] == getattr(i, name) for p, i in zip(predicted, identities)]))
           for name in scenes.IDENTITY_ATTRIBUTES}
    out["context"] = float(np.mean([p["context"] == c for p, c in zip(predicted, contexts)]))
    out["all_identity_attributes"] = float(np.mean([all(p[n] == getattr(i, n) for n in scenes.IDENTITY_ATTRIBUTES)
                                                    for p, i in zip(predicted, identities)]))
    return out


@torch.no_grad()
def autoencoder_ceiling(vae: Any, oracle: AttributeOracle, *, count: int = 480, seed: int = 0,
                        image_size: int = 32, batch_size: int = 96) -> dict[str, float]:
    """What the oracle still reads after the autoencoder: a ceiling on the world model's prompt following.

    ``count`` freshly rendered views (random identities that are not held out, random contexts; their own seed, never
    a training view) go through ``vae`` (encode, the posterior mean, decode) and the oracle reads the
    reconstructions. A denoiser can draw no better than its autoencoder decodes, so a rate here below a
    prompt-following goal means the autoencoder, not the denoiser, must improve.

    Args:
        vae: a diffusers ``AutoencoderKL`` (or anything with ``encode(x).latent_dist.mean`` and ``decode(z).sample``)
            taking images in [-1, 1]; used on its own device and dtype.
        oracle: reads the reconstructions.
        count: views rendered.
        seed: draws the views.
        image_size: pixels of the views.
        batch_size: views per autoencoder pass.

    Returns:
        :func:`attribute_rates` of the reconstructions.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    rng = np.random.default_rng([seed, 7300])
    idents, contexts = _draw_identities(rng, count)
    pixels = _unit(np.stack([scenes.render_view(i, c, rng, image_size) for i, c in zip(idents, contexts)]))
    param = next(vae.parameters())
    recon = []
    for start in range(0, count, batch_size):
        x = (pixels[start:start + batch_size] * 2 - 1).to(param.device, param.dtype)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        recon.append(((y.float().cpu() + 1) / 2).clamp(0, 1))
    return attribute_rates(oracle.predict(torch.cat(recon)), idents, contexts)
