"""``nearid-eval``: score a NearID checkpoint (or a frozen SigLIP baseline) on NearID-style data and MTG pairs.

Writes ``metrics.json``, ``metrics.csv`` and ``metrics.md`` to ``--output_dir``: one row per distractor setting plus
the pooled (micro-averaged) row, and the MTG row when ``--mtg_data`` is given. Rates are percentages.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from nearid_reward import NearIDModel
from nearid_reward.cli.arguments import build_parser as build_dataclass_parser
from nearid_reward.cli.arguments import parse_arguments, parse_device, parse_dtype
from nearid_reward.cli.entry_points import entry_point, torch_device
from nearid_reward.files import remove_stale_temporaries, write_json_atomic, write_text_atomic

from .batching import PixelBatcher, embed_references, gather_eval_arrays, mean_pool
from .data import NearIDData, load_data, load_mtg, mtg_oracles, read_index_file
from .metrics import mtg_metrics, nearid_metrics, pool_metrics

logger = logging.getLogger(__name__)

__all__ = ["ValidationSet", "evaluate_embeddings", "evaluate_model", "evaluate_mtg", "head_pool", "write_reports",
           "EvalOptions", "build_parser", "main"]

PROG = "nearid-eval"
DESCRIPTION = ("Score a NearID checkpoint (or a frozen SigLIP baseline) with SSR / PA per distractor setting, pooled "
               "over settings, and optionally on MTG part-edit pairs.")
TABLE_KEYS = ("ssr", "pa", "pa_pairwise", "ssr_mean", "n_samples", "pa_trials")
MTG_KEYS = ("m_o", "m_opair", "ssr", "pa", "n_samples", "pa_trials")


@dataclass
class ValidationSet:
    """Slot-aligned evaluation references: ``views [N][V]`` and per distractor setting ``distractors [N][V]``."""

    data: NearIDData
    rows: list[int]
    views: list[list[Any]]
    distractors: dict[str, list[list[Any]]]

    @classmethod
    def build(cls, data: NearIDData, rows: Sequence[int], settings: Sequence[str] | None = None) -> ValidationSet:
        """Use the rows of ``rows`` that have at least two views."""
        usable = set(data.rows.tolist())
        kept = [int(r) for r in rows if int(r) in usable]
        views, negs = data.eval_refs(kept, settings)
        return cls(data, kept, views, negs)

    def refs(self) -> list[Any]:
        out = [r for row in self.views for r in row if r is not None]
        out += [r for table in self.distractors.values() for row in table for r in row if r is not None]
        return list(dict.fromkeys(out))


def evaluate_embeddings(vset: ValidationSet, emb: dict[Any, np.ndarray], dim: int) -> dict[str, dict[str, float]]:
    """NearID metrics per distractor setting plus ``"pooled"`` (micro-average), from embeddings by reference."""
    pos, pos_ok = gather_eval_arrays(emb, vset.views, dim)
    results: dict[str, dict[str, float]] = {}
    for setting, refs in vset.distractors.items():
        neg, neg_ok = gather_eval_arrays(emb, refs, dim)
        results[setting] = nearid_metrics(pos, neg, pos_ok, neg_ok)
    if results:
        results["pooled"] = pool_metrics(list(results.values()))
    return results


def head_pool(model: NearIDModel) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """The model's own pooling (:meth:`NearIDModel.pool`: head + L2 normalisation, float32)."""
    return model.pool


def evaluate_model(
    model: NearIDModel,
    vset: ValidationSet,
    *,
    pooling: str = "head",
    batcher: Callable[..., dict[str, Any]] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
) -> dict[str, dict[str, float]]:
    """Embed every image of ``vset`` and compute NearID metrics per setting and pooled.

    Args:
        model: the model (its device is used).
        vset: the evaluation references.
        pooling: ``"head"`` (the model's head) or ``"mean"`` (mean of the backbone tokens).
        batcher: how references become inputs (default: decode + preprocess; pass a
            :class:`~train_head.batching.CachedBatcher` to use cached tokens).
        batch_size, num_workers: DataLoader settings.
    """
    if pooling not in ("head", "mean"):
        raise ValueError(f"pooling must be 'head' or 'mean', got {pooling!r}")
    batcher = batcher or PixelBatcher(vset.data.registry(), model.preprocess)
    pool = head_pool(model) if pooling == "head" else mean_pool
    emb, failed = embed_references(vset.refs(), batcher, pool, model=model, device=model.device,
                                   batch_size=batch_size, num_workers=num_workers)
    for ref, why in failed:
        vset.data.report.add("unreadable images", why, key=ref)
    vset.data.report.warn()
    dim = next(iter(emb.values())).shape[-1] if emb else model.embed_dim
    return evaluate_embeddings(vset, emb, dim)


def evaluate_mtg(
    model: NearIDModel, data: NearIDData, rows: Sequence[int], *, pooling: str = "head", batch_size: int = 64,
    num_workers: int = 0,
) -> dict[str, float]:
    """MTG metrics (M-O, M-Opair, SSR, PA) of ``model`` on the MTG rows ``rows``."""
    rows = [int(r) for r in rows]
    refs = [[data.view_ref(r, 0), data.view_ref(r, 1), data.distractor_ref("mtg", r, 0),
             data.distractor_ref("mtg", r, 1)] for r in rows]
    flat = list(dict.fromkeys(x for row in refs for x in row if x is not None))
    pool = head_pool(model) if pooling == "head" else mean_pool
    emb, failed = embed_references(flat, PixelBatcher(data.registry(), model.preprocess), pool, model=model,
                                   device=model.device, batch_size=batch_size, num_workers=num_workers)
    for ref, why in failed:
        data.report.add("unreadable images", why, key=ref)
    data.report.warn()
    dim = next(iter(emb.values())).shape[-1] if emb else model.embed_dim
    arrays = []
    for k in range(4):
        arr = np.full((len(rows), dim), np.nan)
        for i, row in enumerate(refs):
            if row[k] is not None and row[k] in emb:
                arr[i] = emb[row[k]]
        arrays.append(arr)
    o1, o2 = mtg_oracles(data, rows)
    return mtg_metrics(arrays[0], arrays[1], arrays[2], arrays[3], o1, o2)


def _rate(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.2f}"


def write_reports(output_dir: str | Path, results: dict[str, Any]) -> dict[str, Path]:
    """Write ``metrics.json``, ``metrics.csv`` and ``metrics.md`` (one row per setting, pooled, MTG)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    write_json_atomic(out / "metrics.json", results)
    rows = [{"setting": s, **{k: m[k] for k in TABLE_KEYS}} for s, m in results["settings"].items()]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["setting", *TABLE_KEYS, "m_o", "m_opair"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    mtg = results.get("mtg")
    if mtg:
        writer.writerow({"setting": "mtg", **{k: mtg[k] for k in MTG_KEYS}})
    write_text_atomic(out / "metrics.csv", buf.getvalue())
    lines = [f"Model: `{results['model']}` (pooling: {results['pooling']})", "",
             "| setting | SSR | PA | PA pairwise | samples | PA trials |", "|---|---|---|---|---|---|"]
    for row in rows:
        name = f"**{row['setting']}**" if row["setting"] == "pooled" else row["setting"]
        lines.append(f"| {name} | {_rate(row['ssr'])} | {_rate(row['pa'])} | {_rate(row['pa_pairwise'])} | "
                     f"{int(row['n_samples'])} | {int(row['pa_trials'])} |")
    if mtg:
        lines += ["", "| MTG | M-O | M-Opair | SSR | PA | samples |", "|---|---|---|---|---|---|",
                  f"| mtg | {mtg['m_o']:.3f} | {mtg['m_opair']:.3f} | {_rate(mtg['ssr'])} | {_rate(mtg['pa'])} | "
                  f"{int(mtg['n_samples'])} |"]
    write_text_atomic(out / "metrics.md", "\n".join(lines) + "\n")
    return {"json": out / "metrics.json", "csv": out / "metrics.csv", "md": out / "metrics.md"}


class DeviceName(str):
    """A ``--device`` value: a torch device string checked, when parsed, to exist on this machine.

    As the flag's argparse type it makes a bad value argparse's own usage error (``argument --device: ...``).
    """

    def __new__(cls, value: str) -> DeviceName:
        torch_device(str(value))  # argparse.ArgumentTypeError saying what is wrong
        return super().__new__(cls, value)


@dataclass
class EvalOptions:
    """The ``nearid-eval`` flags (each field is ``--<name>``; its help is in the metadata)."""

    model: str = field(metadata={"help": "head-only / release checkpoint, or a SigLIP folder (baseline)"})
    output_dir: str = field(metadata={"help": "where metrics.json, metrics.csv and metrics.md are written"})
    data: str | None = field(default=None, metadata={
        "help": "positives table (NearID schema), a folder-format root, or a .jsonl manifest"})
    distractors: list[str] = field(default_factory=list, metadata={
        "help": "distractor tables, one per setting"})
    data_format: Literal["auto", "nearid", "folder", "manifest"] = field(default="auto", metadata={
        "help": "format of --data (auto: detected from the path)"})
    view_prefix: Literal["images", "img"] | None = field(default=None, metadata={
        "help": "view column prefix of the positives table (default: auto-detect)"})
    indices: str | None = field(default=None, metadata={
        "help": "index file of the rows to evaluate (e.g. splits/test.json)"})
    mtg_data: str | None = field(default=None, metadata={"help": "MTG pairs (image_1_original, ..., masks)"})
    mtg_split: str = field(default="test", metadata={"help": "preferred split files of --mtg_data"})
    mtg_indices: str | None = field(default=None, metadata={"help": "index file of the MTG rows to evaluate"})
    pooling: Literal["head", "mean"] = field(default="head", metadata={
        "help": "head: the checkpoint's pooling head; mean: mean of the backbone tokens (a baseline)"})
    batch_size: int = field(default=64, metadata={"help": "images per batch"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    device: DeviceName = field(default=DeviceName("cpu"), metadata={"help": "torch device, e.g. cpu or cuda:1"})
    dtype: str = field(default="float32", metadata={
        "help": "backbone dtype: float32, bfloat16, float16 (or fp32, bf16, fp16); the head stays float32"})
    data_cache_dir: str | None = field(default=None, metadata={"help": "`datasets` cache folder"})
    strict: bool = field(default=False, metadata={"help": "raise on bad data instead of skipping it"})

    def __post_init__(self) -> None:
        if not self.data and not self.mtg_data:
            raise ValueError("pass --data (with --distractors) and/or --mtg_data")
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"--num_workers must be >= 0, got {self.num_workers}")
        parse_device(self.device, name="--device")
        parse_dtype(self.dtype, name="--dtype")


def build_parser() -> Any:
    """The ``nearid-eval`` parser (an ``HfArgumentParser`` over :class:`EvalOptions`, with ``--debug``)."""
    return build_dataclass_parser(EvalOptions, prog=PROG, description=DESCRIPTION)


@entry_point(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    (args,) = parse_arguments(EvalOptions, argv, prog=PROG, description=DESCRIPTION)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    model = NearIDModel.from_pretrained(args.model, torch_dtype=parse_dtype(args.dtype, name="--dtype"),
                                        head_dtype=torch.float32)
    model.to(parse_device(args.device, name="--device"))
    results: dict[str, Any] = {"model": str(args.model), "pooling": args.pooling, "settings": {}}
    if args.data:
        data = load_data(args.data, args.distractors, data_format=args.data_format, view_prefix=args.view_prefix,
                         strict=args.strict, cache_dir=args.data_cache_dir, name="eval")
        rows = read_index_file(args.indices, num_rows=len(data)) if args.indices else data.rows.tolist()
        if not data.settings:
            raise SystemExit(f"nearid-eval: {args.data} has no distractors; pass --distractors")
        vset = ValidationSet.build(data, rows)
        results["settings"] = evaluate_model(model, vset, pooling=args.pooling, batch_size=args.batch_size,
                                             num_workers=args.num_workers)
        results["rows"] = len(vset.rows)
        results["bad_data"] = data.report.to_dict()
    if args.mtg_data:
        mtg = load_mtg(args.mtg_data, split=args.mtg_split, strict=args.strict, cache_dir=args.data_cache_dir)
        mrows = read_index_file(args.mtg_indices, num_rows=len(mtg)) if args.mtg_indices else mtg.rows.tolist()
        results["mtg"] = evaluate_mtg(model, mtg, mrows, pooling=args.pooling, batch_size=args.batch_size,
                                      num_workers=args.num_workers)
    results["seconds"] = round(time.perf_counter() - started, 3)
    paths = write_reports(args.output_dir, results)
    print(paths["md"].read_text(encoding="utf-8"), end="")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
