"""``nearid-score``: identity score of images against a subject's reference photos."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..images import IMAGE_SUFFIXES, list_image_files
from ..model import NearIDModel
from ..similarity import Aggregate, cosine_matrix, leave_one_out_oracle, reference_scores
from .arguments import parse_arguments, parse_device, parse_dtype
from .entry_points import entry_point

PROG = "nearid-score"


@dataclass
class ScoreArguments:
    """The options of ``nearid-score`` (one flag per field)."""

    model: str = field(metadata={"help": "NearID checkpoint folder (release, head-only or SigLIP) or hub id"})
    references: list[str] = field(metadata={"help": "reference image files or folders"})
    images: list[str] = field(metadata={"help": "image files or folders to score"})
    aggregate: Aggregate = field(
        default="mean", metadata={"help": "how an image's similarities to the references are combined"}
    )
    batch_size: int = field(default=32, metadata={"help": "images per forward pass"})
    device: str = field(default="cpu", metadata={"help": "torch device, e.g. cpu, cuda or cuda:1"})
    dtype: str = field(default="float32", metadata={"help": "backbone dtype (float32, float16/fp16, bfloat16/bf16)"})
    json: bool = field(default=False, metadata={"help": "print JSON instead of a table"})

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
        parse_device(self.device, name="--device")
        parse_dtype(self.dtype, name="--dtype")

    @property
    def torch_device(self) -> torch.device:
        return parse_device(self.device, name="--device")

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype, name="--dtype")


def parse_args(argv: Sequence[str] | None = None) -> ScoreArguments:
    """The options that ``argv`` (``sys.argv[1:]`` when None) gives ``nearid-score``."""
    (args,) = parse_arguments(
        ScoreArguments, argv, prog=PROG,
        description="Score images against a subject's reference photos with a NearID model.",
    )  # fmt: skip
    return args


def _expand(paths: Sequence[str], what: str) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(list_image_files(path))
        elif path.is_file():
            files.append(path)
        else:
            raise SystemExit(f"{PROG}: {what} path not found: {path}")
    if not files:
        raise SystemExit(f"{PROG}: no {what} given (image files or folders of {', '.join(IMAGE_SUFFIXES)})")
    return files


def _embed_files(model: NearIDModel, files: list[Path], batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        parts = [model.embed([str(p) for p in files[i : i + batch_size]]) for i in range(0, len(files), batch_size)]
    return torch.cat(parts)


@entry_point(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    references = _expand(args.references, "reference")
    images = _expand(args.images, "image")
    model = NearIDModel.from_pretrained(args.model, torch_dtype=args.torch_dtype, head_dtype=torch.float32)
    model.to(args.torch_device)
    ref_emb = _embed_files(model, references, args.batch_size)  # [R, E]
    img_emb = _embed_files(model, images, args.batch_size)  # [B, E]
    scores = reference_scores(img_emb, ref_emb, args.aggregate)  # [B]
    nearest = cosine_matrix(img_emb, ref_emb).max(dim=1)  # [B]
    oracle = leave_one_out_oracle(ref_emb, args.aggregate).mean().item() if len(references) >= 2 else None
    rows = [
        {
            "image": str(path),
            "score": round(float(s), 6),
            "nearest_reference": str(references[int(j)]),
            "nearest_similarity": round(float(v), 6),
        }
        for path, s, v, j in zip(images, scores, nearest.values, nearest.indices)
    ]
    if args.json:
        json.dump({"aggregate": args.aggregate, "reference_oracle": oracle, "results": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    width = max(len("image"), *(len(Path(r["image"]).name) for r in rows))
    print(f"{'image':<{width}}  {'score':>8}  {'nearest':>8}  nearest reference")
    for r in rows:
        print(
            f"{Path(r['image']).name:<{width}}  {r['score']:>8.4f}  {r['nearest_similarity']:>8.4f}  "
            f"{Path(r['nearest_reference']).name}"
        )
    if oracle is not None:
        print(f"reference oracle (leave-one-out, {args.aggregate}): {oracle:.4f}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
