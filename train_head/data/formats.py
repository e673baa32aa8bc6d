"""Dataset formats read into :class:`~train_head.data.identities.NearIDData`: NearID-schema tables (with
``datasets``), the folder format, JSONL manifests and MTG part-edit pairs; :func:`load_data` picks the format.
See :mod:`train_head.data` for the formats' layouts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nearid_reward.images import IMAGE_SUFFIXES

from .identities import NearIDData, assemble
from .tables import ArrowImageTable, BadDataReport, ImageTable, PathImageTable, decode_image

__all__ = ["DISTRACTOR_PREFIX", "MTG_EDIT_COLUMNS", "MTG_OBJECT_MASKS", "MTG_PART_MASKS", "MTG_VIEW_COLUMNS",
           "load_data", "load_folder", "load_manifest", "load_mtg", "load_nearid", "load_table", "mtg_oracles",
           "setting_name"]

MTG_VIEW_COLUMNS = ("image_1_original", "image_2_original")
MTG_EDIT_COLUMNS = ("image_1_inpainted", "image_2_inpainted")
MTG_OBJECT_MASKS = ("image_1_object_mask", "image_2_object_mask")
MTG_PART_MASKS = ("image_1_part_mask", "image_2_part_mask")
DISTRACTOR_PREFIX = "nimg"


def load_table(path: str | os.PathLike[str], *, split: str = "train", cache_dir: str | None = None) -> Any:
    """Read one table with ``datasets`` from a local folder or file.

    * a ``save_to_disk`` folder (``dataset_info.json`` / ``state.json``): ``datasets.load_from_disk``;
    * a folder of parquet files (e.g. a hub snapshot with ``data/train-*.parquet``), a parquet file, or arrow
      files: ``datasets.load_dataset("parquet" | "arrow", data_files=...)``. Files whose name starts with
      ``{split}-`` (or that live in a folder named ``split``) are preferred when present.

    Returns:
        A ``datasets.Dataset``.
    """
    import datasets

    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"dataset not found: {root}")
    if root.is_dir() and ((root / "state.json").is_file() or (root / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(root))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{root} has splits {list(loaded)}, not {split!r}")
            loaded = loaded[split]
        return loaded
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in (".parquet", ".arrow"))
    files = [f for f in files if not f.name.startswith(".")]
    if not files:
        raise ValueError(f"{root} holds no parquet or arrow files and is not a save_to_disk folder")
    chosen = [f for f in files if f.name.startswith(f"{split}-") or f.parent.name == split]
    files = chosen or files
    kinds = {f.suffix for f in files}
    if len(kinds) > 1:
        raise ValueError(f"{root} mixes parquet and arrow files: {sorted(str(f) for f in files)[:4]}")
    builder = "parquet" if kinds == {".parquet"} else "arrow"
    return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", cache_dir=cache_dir)


def setting_name(path: str | os.PathLike[str]) -> str:
    """The setting label of a distractor table path: its folder name without a leading ``NearID-``, lowercased."""
    name = Path(path).expanduser().resolve().name
    if Path(name).suffix in (".parquet", ".arrow"):
        name = Path(name).stem
    if name.lower().startswith("nearid-"):
        name = name[len("nearid-"):]
    return name.lower()


def _detect_view_columns(columns: Sequence[str], prefix: str | None, where: str) -> list[str]:
    candidates = [prefix] if prefix else ["images", "img"]
    for p in candidates:
        cols = [f"{p}{j}" for j in range(1, 10) if f"{p}{j}" in columns]
        if len(cols) >= 2:
            return cols
    raise ValueError(
        f"{where}: could not find the view columns (looked for {' / '.join(f'{c}1..3' for c in candidates)}); "
        f"columns are {list(columns)}. Pass view_prefix (--view_prefix) to name them."
    )


def load_nearid(
    positives: str | os.PathLike[str],
    distractors: Sequence[str | os.PathLike[str]] | Mapping[str, str | os.PathLike[str]] = (),
    *,
    view_prefix: str | None = None,
    split: str = "train",
    strict: bool = False,
    cache_dir: str | None = None,
    name: str = "nearid",
) -> NearIDData:
    """Load NearID-schema tables (spec §6) from local folders or files.

    Args:
        positives: the positives table (``id``, ``images1..3`` or ``img1..3``).
        distractors: distractor tables (``id``, ``nimg1..3``), as a list (setting = folder name without a leading
            ``NearID-``, lowercased, e.g. ``flux_1024``) or a mapping setting -> path.
        view_prefix: ``"images"`` or ``"img"``; None = auto-detect.
        split: preferred split files.
        strict: raise on bad data instead of skipping it.
        cache_dir: ``datasets`` cache folder.
        name: label of this data.
    """
    report = BadDataReport(strict=strict, where=str(positives))
    pos_ds = load_table(positives, split=split, cache_dir=cache_dir)
    pos_root = Path(positives) if Path(positives).is_dir() else Path(positives).parent
    pos_table = ArrowImageTable(pos_ds, f"{name}:positives", root=pos_root)
    view_columns = _detect_view_columns(pos_table.columns, view_prefix, str(positives))
    items = distractors.items() if isinstance(distractors, Mapping) else [(setting_name(p), p) for p in distractors]
    tables: dict[str, tuple[ImageTable, list[str]]] = {}
    for setting, path in items:
        if setting in tables:
            raise ValueError(f"two distractor tables share the setting name {setting!r}; pass a mapping to rename")
        ds = load_table(path, split=split, cache_dir=cache_dir)
        root = Path(path) if Path(path).is_dir() else Path(path).parent
        table = ArrowImageTable(ds, f"{name}:{setting}", root=root)
        cols = [f"{DISTRACTOR_PREFIX}{j}" for j in range(1, len(view_columns) + 1)]
        missing = [c for c in cols if c not in table.columns]
        if missing:
            raise ValueError(f"distractor table {path} lacks the columns {missing}; columns are {table.columns}")
        tables[setting] = (table, cols)
    return assemble(name, pos_table, view_columns, tables, report)


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_folder(
    root: str | os.PathLike[str], *, max_views: int = 3, strict: bool = False, name: str = "folder"
) -> NearIDData:
    """Load the folder format: ``root/<identity>/<view>.<ext>`` and ``root/<identity>/distractors[/<setting>]/``.

    The distractor of a view is the file with the same stem in the distractors folder (any image extension).
    Views are taken in file-name order, at most ``max_views`` per identity.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"folder dataset not found: {base}")
    report = BadDataReport(strict=strict, where=str(base))
    identities = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not identities:
        raise ValueError(f"{base} has no identity folders (expected {base}/<identity>/<view>.png)")
    per_identity: list[tuple[str, list[Path], dict[str, dict[str, Path]]]] = []
    settings: list[str] = []
    for folder in identities:
        views = _image_files(folder)
        if len(views) > max_views:
            report.add("identities with more views than max_views",
                       f"{folder.name} has {len(views)} views; using the first {max_views} by name")
            views = views[:max_views]
        dist_root = folder / "distractors"
        found: dict[str, dict[str, Path]] = {}
        direct = _image_files(dist_root)
        if direct:
            found["default"] = {p.stem: p for p in direct}
        if dist_root.is_dir():
            for sub in sorted(p for p in dist_root.iterdir() if p.is_dir()):
                found[sub.name] = {p.stem: p for p in _image_files(sub)}
        for setting, files in found.items():
            if setting not in settings:
                settings.append(setting)
            stems = {v.stem for v in views}
            orphans = sorted(set(files) - stems)
            if orphans:
                report.add("distractors without a matching view",
                           f"{folder.name}/distractors: {orphans[:3]} match no view file name")
        per_identity.append((folder.name, views, found))
    width = max(1, min(max_views, max(len(v) for _, v, _ in per_identity)))
    ids = [ident for ident, _, _ in per_identity]
    view_cols = {f"view{j + 1}": [v[j] if j < len(v) else None for _, v, _ in per_identity] for j in range(width)}
    positives = PathImageTable(f"{name}:positives", view_cols, ids)
    tables: dict[str, tuple[ImageTable, list[str]]] = {}
    for setting in settings:
        cols: dict[str, list[Path | None]] = {f"nimg{j + 1}": [] for j in range(width)}
        for _, views, found in per_identity:
            files = found.get(setting, {})
            for j in range(width):
                cols[f"nimg{j + 1}"].append(files.get(views[j].stem) if j < len(views) else None)
        tables[setting] = (PathImageTable(f"{name}:{setting}", cols, ids), list(cols))
    return assemble(name, positives, list(view_cols), tables, report)


def load_manifest(
    path: str | os.PathLike[str], *, max_views: int = 3, strict: bool = False, name: str = "manifest"
) -> NearIDData:
    """Load a JSONL manifest (one identity per line; see the module docstring). Paths are relative to its folder."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"manifest not found: {file}")
    report = BadDataReport(strict=strict, where=str(file))
    records: list[tuple[Any, list[Path | None], dict[str, list[Path | None]]]] = []
    settings: list[str] = []

    def resolve(p: Any) -> Path | None:
        if p is None:
            return None
        q = Path(str(p)).expanduser()
        q = q if q.is_absolute() else file.parent / q
        if not q.is_file():
            report.add("missing image files", str(q))
            return None
        return q

    for lineno, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or "views" not in rec or not isinstance(rec["views"], list):
                raise ValueError('expected an object with a "views" list')
        except ValueError as exc:
            report.add("unreadable manifest lines", f"line {lineno}: {exc}")
            continue
        views = [resolve(p) for p in rec["views"]][:max_views]
        dists = rec.get("distractors") or {}
        if isinstance(dists, list):
            dists = {"default": dists}
        if not isinstance(dists, dict):
            report.add("unreadable manifest lines", f"line {lineno}: 'distractors' must be a list or an object")
            dists = {}
        found: dict[str, list[Path | None]] = {}
        for setting, paths in dists.items():
            if not isinstance(paths, list) or len(paths) > len(rec["views"]):
                report.add("unreadable manifest lines",
                           f"line {lineno}: distractors[{setting!r}] must be a list aligned with the views")
                continue
            found[str(setting)] = [resolve(p) for p in paths][:max_views]
            if str(setting) not in settings:
                settings.append(str(setting))
        records.append((rec.get("id", lineno), views, found))
    if not records:
        raise ValueError(f"{file} holds no usable identities")
    width = max(1, min(max_views, max(len(v) for _, v, _ in records)))
    ids = [r[0] for r in records]
    view_cols = {f"view{j + 1}": [v[j] if j < len(v) else None for _, v, _ in records] for j in range(width)}
    positives = PathImageTable(f"{name}:positives", view_cols, ids)
    tables: dict[str, tuple[ImageTable, list[str]]] = {}
    for setting in settings:
        cols = {f"nimg{j + 1}": [f.get(setting, [])[j] if j < len(f.get(setting, [])) else None
                                 for _, _, f in records] for j in range(width)}
        tables[setting] = (PathImageTable(f"{name}:{setting}", cols, ids), list(cols))
    return assemble(name, positives, list(view_cols), tables, report)


def load_mtg(
    path: str | os.PathLike[str], *, split: str = "train", strict: bool = False, cache_dir: str | None = None,
    name: str = "mtg",
) -> NearIDData:
    """Load MTG part-edit pairs (spec §4.3) as 2 views (the originals) and one ``"mtg"`` distractor setting (each
    original's part-edited version, which shares its background)."""
    report = BadDataReport(strict=strict, where=str(path))
    ds = load_table(path, split=split, cache_dir=cache_dir)
    root = Path(path) if Path(path).is_dir() else Path(path).parent
    table = ArrowImageTable(ds, f"{name}:pairs", root=root)
    missing = [c for c in MTG_VIEW_COLUMNS + MTG_EDIT_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"MTG table {path} lacks the columns {missing}; columns are {table.columns}")
    return assemble(name, table, list(MTG_VIEW_COLUMNS), {"mtg": (table, list(MTG_EDIT_COLUMNS))}, report)


def mtg_oracles(data: NearIDData, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Oracle similarities ``1 - |part| / |object|`` of both MTG views for ``rows`` (0 when a mask is missing)."""
    from ..metrics import mtg_oracle

    table = data.positives
    out = np.zeros((2, len(rows)))
    for k in range(2):
        for i, r in enumerate(rows):
            masks = []
            for col in (MTG_OBJECT_MASKS[k], MTG_PART_MASKS[k]):
                raw = table.read(r, col) if col in table.columns else None
                try:
                    masks.append(None if raw is None else np.asarray(decode_image(raw).convert("L")))
                except ValueError:
                    masks.append(None)
            out[k, i] = mtg_oracle(masks[0], masks[1])
    return out[0], out[1]


def load_data(
    path: str | os.PathLike[str],
    distractors: Sequence[str | os.PathLike[str]] = (),
    *,
    data_format: str = "auto",
    view_prefix: str | None = None,
    max_views: int = 3,
    strict: bool = False,
    cache_dir: str | None = None,
    split: str = "train",
    name: str = "data",
) -> NearIDData:
    """Load any supported format: ``"nearid"`` tables, a ``"folder"`` tree, a ``"manifest"`` (.jsonl) or ``"auto"``.

    ``"auto"``: a ``.jsonl`` file is a manifest; a folder with parquet/arrow files (or a ``save_to_disk`` folder) is
    NearID-schema; a folder of identity folders is the folder format.
    """
    p = Path(path).expanduser()
    fmt = data_format
    if fmt == "auto":
        if p.is_file() and p.suffix == ".jsonl":
            fmt = "manifest"
        elif p.is_file() or (p.is_dir() and ((p / "state.json").is_file() or any(p.rglob("*.parquet"))
                                             or any(p.rglob("*.arrow")))):
            fmt = "nearid"
        elif p.is_dir():
            fmt = "folder"
        else:
            raise FileNotFoundError(f"dataset not found: {p}")
    if fmt == "nearid":
        return load_nearid(p, list(distractors), view_prefix=view_prefix, strict=strict, cache_dir=cache_dir,
                           split=split, name=name)
    if distractors:
        raise ValueError(f"distractor tables are only passed for NearID-schema data; {p} is a {fmt} dataset whose "
                         "distractors live beside the views")
    if fmt == "folder":
        return load_folder(p, max_views=max_views, strict=strict, name=name)
    if fmt == "manifest":
        return load_manifest(p, max_views=max_views, strict=strict, name=name)
    raise ValueError(f"data_format must be 'auto', 'nearid', 'folder' or 'manifest', got {data_format!r}")
