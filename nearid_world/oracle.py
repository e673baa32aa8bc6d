"""The ground-truth oracle: which attributes an image of the generation world shows, independent of NearID.

A small convolutional classifier (plain torch, no SigLIP, no NearID weights) with one head per attribute
(:data:`nearid_world.scenes.ATTRIBUTES`: shape, primary and secondary colour, pattern, part, and the context). It is
trained on rendered views with their known attributes, with blur, noise, colour and placement jitter so that it reads
a generated image as well as a rendered one, and is saved as safetensors plus a JSON config.

*True identity* of an image with respect to a subject is the fraction of the subject's five identity attributes
(shape, primary, secondary, pattern, part) that the oracle reads in the image (:func:`true_identity`), in
{0, 0.2, ..., 1}. The *look-alike rate* counts images that show the look-alike's value of the one attribute a
near-identity distractor changes (:func:`lookalike_hits`).

Command that made the shipped oracle (``nearid_world/weights/oracle``)::

    python -m nearid_world.oracle --output_dir nearid_world/weights/oracle --seed 0
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nearid_reward.cli.arguments import parse_arguments
from nearid_reward.cli.entry_points import entry_point
from nearid_reward.files import save_safetensors_atomic, write_json_atomic

from . import scenes

logger = logging.getLogger(__name__)

__all__ = ["OracleConfig", "AttributeOracle", "train_oracle", "true_identity", "lookalike_hits", "parse_args", "main"]

WEIGHTS_NAME = "oracle.safetensors"
CONFIG_NAME = "oracle_config.json"


@dataclass
class OracleConfig:
    """Training settings of the oracle (each is a ``python -m nearid_world.oracle`` flag).

    Attributes:
        image_size: input pixels (images of another size are resized to it).
        width: channels of the first convolution (doubled twice).
        num_images, num_val_images: rendered training / held-out views (random identities and contexts).
        steps, batch_size, learning_rate: AdamW with a cosine schedule.
        seed: everything derives from it (held-out views use other seeds).
    """

    image_size: int = field(default=32, metadata={"help": "input pixels (images of another size are resized to it)"})
    width: int = field(default=16, metadata={"help": "channels of the first convolution (doubled twice)"})
    num_images: int = field(
        default=30000, metadata={"help": "rendered training views (random identities and contexts)"}
    )
    num_val_images: int = field(default=2000, metadata={"help": "rendered held-out views"})
    steps: int = field(default=2500, metadata={"help": "AdamW steps (cosine schedule)"})
    batch_size: int = field(default=64, metadata={"help": "training batch size"})
    learning_rate: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    seed: int = field(default=0, metadata={"help": "everything derives from it (held-out views use other seeds)"})


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class AttributeOracle(nn.Module):
    """Reads every attribute of a generation-world image.

    Input: float ``[B, 3, H, W]`` in [0, 1] (resized to ``image_size`` when needed). Output of :meth:`forward`: a
    dict attribute -> logits ``[B, len(choices(attribute))]``; :meth:`predict` gives the names.

    Example:
        >>> oracle = AttributeOracle(OracleConfig(width=8))
        >>> sorted(oracle(torch.rand(2, 3, 32, 32)))
        ['context', 'part', 'pattern', 'primary', 'secondary', 'shape']
    """

    def __init__(self, config: OracleConfig | None = None) -> None:
        super().__init__()
        self.config = config or OracleConfig()
        w = self.config.width
        self.features = nn.Sequential(_block(3, w), nn.MaxPool2d(2), _block(w, 2 * w), nn.MaxPool2d(2),
                                      _block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.heads = nn.ModuleDict({name: nn.Linear(16 * w, len(scenes.choices(name))) for name in scenes.ATTRIBUTES})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"`images` must be [B, 3, H, W], got {tuple(images.shape)}")
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = self.features(images * 2.0 - 1.0)  # [B, 16w]
        return {name: head(x) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> list[dict[str, str]]:
        """Attribute names per image (``images`` float ``[B, 3, H, W]`` in [0, 1])."""
        was_training = self.training
        self.eval()
        out: list[dict[str, str]] = []
        for start in range(0, len(images), batch_size):
            logits = self(images[start:start + batch_size].float())
            idx = {name: v.argmax(1).tolist() for name, v in logits.items()}
            for i in range(len(next(iter(idx.values())))):
                out.append({name: scenes.choices(name)[idx[name][i]] for name in scenes.ATTRIBUTES})
        self.train(was_training)
        return out

    def save_pretrained(self, folder: str | Path) -> Path:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomic(self.state_dict(), out / WEIGHTS_NAME)
        write_json_atomic(out / CONFIG_NAME, {"config": dataclasses.asdict(self.config),
                                              "attributes": {n: list(scenes.choices(n)) for n in scenes.ATTRIBUTES}})
        return out

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> AttributeOracle:
        from safetensors.torch import load_file

        root = Path(folder)
        if not (root / WEIGHTS_NAME).is_file() or not (root / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"oracle folder {root} must hold {WEIGHTS_NAME} and {CONFIG_NAME}")
        meta = json.loads((root / CONFIG_NAME).read_text(encoding="utf-8"))
        stored = {n: tuple(v) for n, v in meta.get("attributes", {}).items()}
        wanted = {n: scenes.choices(n) for n in scenes.ATTRIBUTES}
        if stored != wanted:
            raise ValueError(f"oracle in {root} was trained for attributes {stored}, this world has {wanted}")
        model = cls(OracleConfig(**meta["config"]))
        model.load_state_dict(load_file(str(root / WEIGHTS_NAME)))
        return model.eval()


def true_identity(predicted: dict[str, str], subject: scenes.Identity) -> float:
    """Fraction of the subject's identity attributes the image shows, in [0, 1] (0.2 per attribute)."""
    hits = [predicted[name] == getattr(subject, name) for name in scenes.IDENTITY_ATTRIBUTES]
    return sum(hits) / len(hits)


def lookalike_hits(predicted: dict[str, str], lookalike: scenes.Identity, subject: scenes.Identity) -> bool:
    """Whether the image shows the look-alike's value of the attribute it changes (it drifted to the look-alike)."""
    changed = [n for n in scenes.IDENTITY_ATTRIBUTES if getattr(lookalike, n) != getattr(subject, n)]
    if len(changed) != 1:
        raise ValueError(f"a look-alike differs from its subject in exactly one attribute, got {changed}")
    return predicted[changed[0]] == getattr(lookalike, changed[0])


def _render_labelled(n: int, size: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = {name: np.empty(n, dtype=np.int64) for name in scenes.ATTRIBUTES}
    contexts = list(scenes.CONTEXTS)
    for i in range(n):
        rng = np.random.default_rng([seed, 7003, i])
        ident = scenes.sample_identity(rng)
        context = contexts[int(rng.integers(len(contexts)))]
        images[i] = scenes.render_view(ident, context, rng, size)
        for name in scenes.IDENTITY_ATTRIBUTES:
            labels[name][i] = scenes.choices(name).index(getattr(ident, name))
        labels["context"][i] = contexts.index(context)
    return images, labels


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, noise, brightness/contrast and one-pixel shifts: what a small generator's samples differ by."""
    b = x.shape[0]
    blur = torch.rand(b, 1, 1, 1, generator=generator) * 0.6
    smooth = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = x * (1 - blur) + smooth * blur
    shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
    x = torch.roll(x, shifts=shift, dims=(2, 3))
    gain = 1 + (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.2
    offset = (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.1
    noise = torch.randn(x.shape, generator=generator) * torch.rand(b, 1, 1, 1, generator=generator) * 0.05
    return (x * gain + offset + noise).clamp(0, 1)


def _unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


def evaluate_oracle(oracle: AttributeOracle, images: np.ndarray, labels: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-attribute accuracy (in [0, 1]) on rendered views with known labels."""
    predicted = oracle.predict(_unit(images))
    return {name: float(np.mean([scenes.choices(name).index(p[name]) == labels[name][i]
                                 for i, p in enumerate(predicted)])) for name in scenes.ATTRIBUTES}


def train_oracle(output_dir: str | Path, config: OracleConfig | None = None, *, progress: bool = False) -> Path:
    """Render labelled views, train the oracle, measure it on held-out views, save it (safetensors + JSON).

    The held-out accuracy per attribute is written to ``oracle_config.json`` (``held_out_accuracy``).
    """
    from tqdm.auto import tqdm

    config = config or OracleConfig()
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    images, labels = _render_labelled(config.num_images, config.image_size, config.seed)
    val_images, val_labels = _render_labelled(config.num_val_images, config.image_size, config.seed + 10**6)
    oracle = AttributeOracle(config)
    optimizer = torch.optim.AdamW(oracle.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / config.steps)))
    generator = torch.Generator().manual_seed(config.seed)
    pixels = _unit(images)
    targets = {name: torch.from_numpy(v) for name, v in labels.items()}
    oracle.train()
    for step in tqdm(range(config.steps), desc="oracle", disable=not progress, leave=False):
        idx = torch.randint(len(pixels), (config.batch_size,), generator=generator)
        logits = oracle(_augment(pixels[idx], generator))
        loss = sum(F.cross_entropy(logits[name], targets[name][idx]) for name in scenes.ATTRIBUTES)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0:
            logger.info("oracle step %d/%d: loss %.4f", step, config.steps, float(loss))
    oracle.eval()
    accuracy = evaluate_oracle(oracle, val_images, val_labels)
    out = oracle.save_pretrained(output_dir)
    meta = json.loads((out / CONFIG_NAME).read_text(encoding="utf-8"))
    meta |= {"held_out_accuracy": {k: round(v, 4) for k, v in accuracy.items()},
             "num_held_out_views": config.num_val_images, "seconds": round(time.perf_counter() - started, 1)}
    write_json_atomic(out / CONFIG_NAME, meta)
    logger.info("oracle held-out accuracy: %s", accuracy)
    return out


@dataclass
class OutputArguments:
    """``python -m nearid_world.oracle``'s option besides the :class:`OracleConfig` fields."""

    output_dir: str = field(metadata={"help": "where oracle.safetensors and oracle_config.json are written"})


def parse_args(argv: Sequence[str] | None = None) -> tuple[OutputArguments, OracleConfig]:
    """The command's own options and the :class:`OracleConfig` that ``argv`` gives the command."""
    args, config = parse_arguments([OutputArguments, OracleConfig], argv, prog="python -m nearid_world.oracle",
                                   description=__doc__.split("\n\n")[0])
    return args, config


@entry_point("python -m nearid_world.oracle")
def main(argv: Sequence[str] | None = None) -> int:
    args, config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = train_oracle(args.output_dir, config, progress=True)
    print(json.dumps(json.loads((out / CONFIG_NAME).read_text(encoding="utf-8"))["held_out_accuracy"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
