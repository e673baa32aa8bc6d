"""The generation world's NearID encoder: a tiny SigLIP backbone and a NearID head trained with the project's trainer.

Three steps, each with the project's own tools:

1. a NearID-schema dataset of the generation world (:func:`write_world_dataset`): per identity three views in random
   contexts and, for every view, one near-identity distractor per identity attribute (the same object with one
   attribute changed, on the same background at the same place); the benchmark's held-out identities are left out;
2. a tiny SigLIP backbone with the generic synthetic pretraining of :mod:`train_head.synthetic_backbone` on
   generation-world scenes (attribute and scene read-outs, never the identity task); its own pooling head is the
   frozen baseline;
3. ``nearid-train-head`` (two-tier objective with every distractor level) on the training identities, then the best
   head by validation SSR, saved head-only next to the backbone it references (``backbone/`` and ``head/``).

Command that made the shipped encoder (``nearid_world/weights/nearid``)::

    python -m nearid_world.encoder --output_dir nearid_world/weights/nearid --seed 0

and the second head, trained on the same backbone without part and secondary-colour distractors (the benchmark's
"unseen look-alike kinds"; only the head is trained)::

    python -m nearid_world.encoder --output_dir nearid_world/weights/nearid --seed 0 \\
        --head_name head_leaveout --leave_out part secondary
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nearid_reward.cli.arguments import parse_arguments
from nearid_reward.cli.entry_points import entry_point
from nearid_reward.files import write_json_atomic

from . import scenes

logger = logging.getLogger(__name__)

__all__ = [
    "EncoderConfig",
    "write_world_dataset",
    "train_world_encoder",
    "train_world_head",
    "train_head_only",
    "parse_args",
    "main",
]

WORLD = "generation"


def _scene(rng: np.random.Generator) -> tuple[Any, Any]:
    ident = scenes.sample_identity(rng)
    context = list(scenes.CONTEXTS)[int(rng.integers(len(scenes.CONTEXTS)))]
    return scenes.synth_object(ident, rng), scenes.view_context(context, rng)


def register() -> None:
    """Register the generation world's scenes with the synthetic backbone pretraining (``world="generation"``)."""
    from train_head.synthetic_backbone import register_scene_sampler

    register_scene_sampler(WORLD, _scene)


@dataclass
class EncoderConfig:
    """Settings of the world encoder (each is a ``python -m nearid_world.encoder`` flag).

    Attributes:
        num_identities: identities in the NearID-schema dataset (train / val / test split by identity).
        image_size, patch_size, hidden_size, num_layers, backbone_steps, backbone_images: the tiny SigLIP and its
            pretraining.
        head_steps, batch_size, learning_rate, temperature, alpha: ``nearid-train-head`` settings.
        held_out: benchmark identities left out of the dataset.
        seed: everything derives from it.
        leave_out: distractor kinds left out of the head's training and validation (the dataset keeps them, so
            the evaluation reports the head on kinds it never saw).
    """

    num_identities: int = field(
        default=2000, metadata={"help": "identities in the NearID-schema dataset (split by identity)"}
    )
    image_size: int = field(default=32, metadata={"help": "pixels of the world's images and the SigLIP input"})
    patch_size: int = field(default=4, metadata={"help": "SigLIP patch size"})
    hidden_size: int = field(default=128, metadata={"help": "SigLIP width"})
    num_layers: int = field(default=2, metadata={"help": "SigLIP layers"})
    backbone_steps: int = field(default=2000, metadata={"help": "steps of the backbone's synthetic pretraining"})
    backbone_images: int = field(default=8000, metadata={"help": "scenes of the backbone's synthetic pretraining"})
    head_steps: int = field(default=600, metadata={"help": "nearid-train-head steps"})
    batch_size: int = field(default=128, metadata={"help": "nearid-train-head batch size"})
    learning_rate: float = field(default=3e-3, metadata={"help": "nearid-train-head learning rate"})
    temperature: float = field(default=0.1, metadata={"help": "nearid-train-head temperature"})
    alpha: float = field(default=0.0, metadata={"help": "nearid-train-head alpha"})
    held_out: int = field(default=48, metadata={"help": "benchmark identities left out of the dataset"})
    seed: int = field(default=0, metadata={"help": "everything derives from it"})
    leave_out: list[str] = field(
        default_factory=list,
        metadata={"help": "distractor kinds (identity attributes) the head never trains or validates on; the "
                  "evaluation still covers every kind"},
    )

    def __post_init__(self) -> None:
        unknown = [k for k in self.leave_out if k not in scenes.NEAR_ATTRIBUTES]
        if unknown:
            raise ValueError(f"EncoderConfig.leave_out must name kinds of {scenes.NEAR_ATTRIBUTES}, got {unknown}")
        if len(set(self.leave_out)) >= len(scenes.NEAR_ATTRIBUTES):
            raise ValueError(f"EncoderConfig.leave_out must keep at least one distractor kind, got {self.leave_out}")


def write_world_dataset(output_dir: str | Path, config: EncoderConfig, *, progress: bool = False) -> Path:
    """Write the generation world in the NearID schema: ``positives/``, ``distractors/<attribute>/``, ``splits/``.

    Distractor level ``<attribute>`` changes that one identity attribute (:data:`scenes.NEAR_ATTRIBUTES`).
    """
    from tqdm.auto import tqdm

    from train_head.data import split_by_identity
    from train_head.synthetic import png_bytes, write_image_table

    out = Path(output_dir)
    banned = scenes.held_out_identities(config.held_out) if config.held_out else []
    n = config.num_identities
    views: list[list[bytes]] = []
    distractors: dict[str, list[list[bytes]]] = {a: [] for a in scenes.NEAR_ATTRIBUTES}
    descriptions = []
    contexts = list(scenes.CONTEXTS)
    for i in tqdm(range(n), desc="world identities", disable=not progress, leave=False):
        rng = np.random.default_rng([config.seed, 7004, i])
        ident = scenes.sample_identity(rng, banned)
        descriptions.append(ident.describe())
        row: list[bytes] = []
        per_level: dict[str, list[bytes]] = {a: [] for a in scenes.NEAR_ATTRIBUTES}
        for context in rng.permutation(contexts)[:3]:
            ctx = scenes.view_context(str(context), rng)
            view_seed = int(rng.integers(2**31))
            row.append(png_bytes(scenes.render_view(ident, str(context), np.random.default_rng(view_seed),
                                               config.image_size, ctx=ctx)))
            for attribute in scenes.NEAR_ATTRIBUTES:
                other = scenes.near_identity(ident, attribute, rng)
                # same background, place and colour shades: only the attribute differs
                per_level[attribute].append(png_bytes(scenes.render_view(other, str(context),
                                                                    np.random.default_rng(view_seed),
                                                                    config.image_size, ctx=ctx)))
        views.append(row)
        for attribute in scenes.NEAR_ATTRIBUTES:
            distractors[attribute].append(per_level[attribute])
    ids = list(range(n))
    positives: dict[str, list[Any]] = {"id": ids, "category": ["world"] * n, "category_description": descriptions,
                                       "n_images": [3] * n}
    for j in range(3):
        positives[f"img{j + 1}"] = [r[j] for r in views]
    write_image_table(positives, [f"img{j + 1}" for j in range(3)], out / "positives")
    for attribute, rows in distractors.items():
        table: dict[str, list[Any]] = {"id": ids, "category": ["world"] * n, "n_images": [3] * n}
        for j in range(3):
            table[f"nimg{j + 1}"] = [r[j] for r in rows]
        write_image_table(table, [f"nimg{j + 1}" for j in range(3)], out / "distractors" / attribute)
    splits = split_by_identity(ids, ids, seed=config.seed, val_fraction=0.1, test_fraction=0.1)
    for name, indices in splits.items():
        write_json_atomic(out / "splits" / f"{name}.json", {"indices": indices, "seed": config.seed, "split": name})
    return out


def train_world_encoder(output_dir: str | Path, config: EncoderConfig | None = None, *,
                        work_dir: str | Path | None = None, progress: bool = False) -> Path:
    """Build the world's NearID encoder into ``output_dir`` (``backbone/``, ``head/``, ``encoder_config.json``).

    Args:
        output_dir: destination (the parts that are shipped).
        config: settings.
        work_dir: where the dataset and the trainer's run go (default ``output_dir/../encoder_work``).
        progress: progress bars.

    Returns:
        ``output_dir``; ``NearIDModel.from_pretrained(output_dir / "head")`` loads the trained encoder and
        ``NearIDModel.from_pretrained(output_dir / "backbone")`` the frozen baseline.
    """
    from train_head.synthetic_backbone import BackbonePretrainConfig, pretrain_synthetic_backbone

    config = config or EncoderConfig()
    out = Path(output_dir)
    work = Path(work_dir) if work_dir is not None else out.parent / "encoder_work"
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    data = write_world_dataset(work / "data", config, progress=progress)
    seconds["dataset"] = time.perf_counter() - t
    register()
    t = time.perf_counter()
    backbone = pretrain_synthetic_backbone(out / "backbone", BackbonePretrainConfig(
        image_size=config.image_size, patch_size=config.patch_size, hidden_size=config.hidden_size,
        intermediate_size=4 * config.hidden_size, num_hidden_layers=config.num_layers, steps=config.backbone_steps,
        num_images=config.backbone_images, seed=config.seed, world=WORLD,
    ), force=True, progress=progress)  # fmt: skip
    seconds["backbone"] = time.perf_counter() - t
    t = time.perf_counter()
    evaluation = train_world_head(data, backbone, out / "head", config, work)
    seconds["head"] = time.perf_counter() - t
    write_json_atomic(out / "encoder_config.json", {
        "config": dataclasses.asdict(config), "held_out_test_identities": evaluation,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "total_seconds": round(time.perf_counter() - started, 1),
    })  # fmt: skip
    return out


def train_world_head(data: Path, backbone: Path, head_dir: Path, config: EncoderConfig,
                     work: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Train a NearID head with ``nearid-train-head`` on the world dataset and save it head-only in ``head_dir``.

    The head trains and validates on the distractor kinds not in ``config.leave_out``; the best head by validation
    SSR is kept. Both it and the frozen ``backbone`` are then evaluated by ``nearid-eval`` on the test identities
    for *every* kind.

    Returns:
        ``{"frozen" | "nearid": {kind | "pooled": {"ssr", "pa"}}}`` in percent (one decimal).
    """
    from nearid_reward import NearIDModel
    from train_head import eval as nearid_eval
    from train_head import train as nearid_train

    run = work / f"run_{head_dir.name}"
    if run.exists():
        shutil.rmtree(run)
    every = [str(data / "distractors" / a) for a in scenes.NEAR_ATTRIBUTES]
    seen = [str(data / "distractors" / a) for a in scenes.NEAR_ATTRIBUTES if a not in config.leave_out]
    nearid_train.main([
        "--backbone", str(backbone), "--output_dir", str(run), "--train_data", str(data / "positives"),
        "--distractors", *seen, "--train_indices", str(data / "splits" / "train.json"),
        "--val_data", str(data / "positives"), "--val_distractors", *seen,
        "--val_indices", str(data / "splits" / "val.json"),
        "--train_batch_size", str(config.batch_size), "--max_train_steps", str(config.head_steps),
        "--learning_rate", str(config.learning_rate), "--lr_warmup_steps", "50", "--alpha", str(config.alpha),
        "--temperature", str(config.temperature), "--validation_steps", "100",
        "--checkpointing_steps", str(config.head_steps), "--logging_steps", "100", "--report_to", "none",
        "--seed", str(config.seed),
    ])  # fmt: skip
    model = NearIDModel.from_pretrained(run / "best")
    model.save_pretrained(head_dir, backbone=Path("..") / backbone.name)
    evaluation: dict[str, dict[str, dict[str, float]]] = {}
    for name, folder in (("frozen", backbone), ("nearid", head_dir)):
        report = work / "eval" / f"{head_dir.name}_{name}"
        nearid_eval.main(["--model", str(folder), "--data", str(data / "positives"), "--distractors", *every,
                          "--indices", str(data / "splits" / "test.json"), "--output_dir", str(report)])
        settings = json.loads((report / "metrics.json").read_text())["settings"]
        evaluation[name] = {k: {"ssr": round(v["ssr"], 1), "pa": round(v["pa"], 1)} for k, v in settings.items()}
    return evaluation


def train_head_only(output_dir: str | Path, head_name: str, config: EncoderConfig, *,
                    work_dir: str | Path | None = None, progress: bool = False) -> Path:
    """Train one more head on the shipped backbone ``output_dir/backbone`` (the backbone is not retrained).

    Writes ``output_dir/<head_name>/`` (head-only checkpoint referencing ``../backbone``) and
    ``output_dir/<head_name>_config.json`` (settings, per-kind SSR/PA of the head and the frozen backbone, seconds).
    The dataset is the one :func:`train_world_encoder` writes for the same ``config`` (the same bytes), so a
    ``leave_out`` head differs from the shipped head only by the distractor kinds it trains on.

    Returns:
        ``output_dir / head_name``.
    """
    out = Path(output_dir)
    backbone = out / "backbone"
    if not (backbone / "config.json").is_file():
        raise FileNotFoundError(f"--head_name needs a trained backbone in {backbone}, found no config.json")
    if head_name in ("backbone", "head") or "/" in head_name or not head_name:
        raise ValueError(f"--head_name must be a new folder name other than 'backbone' and 'head', got {head_name!r}")
    work = Path(work_dir) if work_dir is not None else out.parent / "encoder_work"
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    data = write_world_dataset(work / "data", config, progress=progress)
    seconds["dataset"] = time.perf_counter() - t
    t = time.perf_counter()
    evaluation = train_world_head(data, backbone, out / head_name, config, work)
    seconds["head"] = time.perf_counter() - t
    write_json_atomic(out / f"{head_name}_config.json", {
        "config": dataclasses.asdict(config), "held_out_test_identities": evaluation,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "total_seconds": round(time.perf_counter() - started, 1),
    })  # fmt: skip
    return out / head_name


@dataclass
class EncoderArguments:
    """``python -m nearid_world.encoder``'s options besides the :class:`EncoderConfig` fields."""

    output_dir: str = field(metadata={"help": "where backbone/ and head/ are written"})
    work_dir: str | None = field(
        default=None, metadata={"help": "dataset and trainer run (None: OUTPUT_DIR/../encoder_work)"}
    )
    head_name: str | None = field(
        default=None,
        metadata={"help": "only train a head named this on the backbone already in OUTPUT_DIR/backbone (None: "
                  "build the backbone and head/)"},
    )


def parse_args(argv: Sequence[str] | None = None) -> tuple[EncoderArguments, EncoderConfig]:
    """The command's own options and the :class:`EncoderConfig` that ``argv`` gives the command."""
    args, config = parse_arguments([EncoderArguments, EncoderConfig], argv, prog="python -m nearid_world.encoder",
                                   description=__doc__.split("\n\n")[0])
    return args, config


@entry_point("python -m nearid_world.encoder")
def main(argv: Sequence[str] | None = None) -> int:
    args, config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.head_name is not None:
        import torch

        torch.set_num_threads(1)  # the head's bytes then do not depend on the machine's core count
        head = train_head_only(args.output_dir, args.head_name, config, work_dir=args.work_dir, progress=True)
        print(json.dumps(json.loads((head.parent / f"{head.name}_config.json").read_text()), indent=2))
        return 0
    out = train_world_encoder(args.output_dir, config, work_dir=args.work_dir, progress=True)
    print(json.dumps(json.loads((out / "encoder_config.json").read_text()), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
