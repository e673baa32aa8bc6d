"""``nearid-score``: identity score of images against a subject's reference photos."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..images import IMAGE_SUFFIXES, list_image_files
from ..model import NearIDModel
from ..similarity import cosine_matrix, leave_one_out_oracle, reference_scores
from .entry_points import add_debug_flag, entry_point, torch_device

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _expand(paths: Sequence[str], what: str) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(list_image_files(path))
        elif path.is_file():
            files.append(path)
        else:
            raise SystemExit(f"nearid-score: {what} path not found: {path}")
    if not files:
        raise SystemExit(f"nearid-score: no {what} given (image files or folders of {', '.join(IMAGE_SUFFIXES)})")
    return files


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nearid-score", description="Score images against a subject's reference photos with a NearID model."
    )
    parser.add_argument(
        "--model", required=True, help="NearID checkpoint folder (release, head-only or SigLIP) or hub id"
    )
    parser.add_argument("--references", nargs="+", required=True, help="reference image files or folders")
    parser.add_argument("--images", nargs="+", required=True, help="image files or folders to score")
    parser.add_argument(
        "--aggregate",
        choices=["mean", "max", "centroid"],
        default="mean",
        help="how an image's similarities to the references are combined (default: mean)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--device", type=torch_device, default="cpu",
                        help="torch device, e.g. cpu, cuda or cuda:1 (default: cpu)")
    parser.add_argument(
        "--dtype", choices=sorted(_DTYPES), default="float32", help="backbone dtype (default: float32)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_debug_flag(parser)
    return parser


def _embed_files(model: NearIDModel, files: list[Path], batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        parts = [model.embed([str(p) for p in files[i : i + batch_size]]) for i in range(0, len(files), batch_size)]
    return torch.cat(parts)


@entry_point("nearid-score")
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit(f"nearid-score: --batch-size must be >= 1, got {args.batch_size}")
    references = _expand(args.references, "reference")
    images = _expand(args.images, "image")
    model = NearIDModel.from_pretrained(args.model, torch_dtype=_DTYPES[args.dtype], head_dtype=torch.float32)
    model.to(args.device)
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
