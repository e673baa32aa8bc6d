"""NearID data: the NearID dataset schema, a folder format and a JSONL manifest for users' own data, MTG pairs,
held-out splits by identity, and the per-epoch training samples (anchor shuffle, per-slot distractor sources).

Every image is addressed by a reference ``(table, row, column)`` and read as its encoded bytes, so the feature cache
can key it by content hash and decoding happens in DataLoader workers.

Formats read (see docs/formats.md):

* **NearID schema** (spec §6): a positives table (``id``, views in ``images1..3`` or ``img1..3``) and any number of
  distractor tables (``id``, ``nimg1..3``), aligned by row position; each is a local folder of parquet files (as
  downloaded from the hub), a ``save_to_disk`` folder or a parquet/arrow file, read with ``datasets``.
* **Folder format**: ``root/<identity>/<view>.png`` (the views) and ``root/<identity>/distractors/<view>.png`` (the
  near-identity distractor on the same background as the view of the same file stem), or
  ``root/<identity>/distractors/<setting>/<view>.png`` for several distractor settings.
* **JSONL manifest**: one identity per line, ``{"id": ..., "views": [paths], "distractors": {setting: [paths or
  null, aligned with views]}}`` (or ``"distractors": [...]`` for one setting); paths relative to the manifest.
* **MTG** part-edit pairs (spec §4.3) as an optional second source (2 views, 2 part-edited distractors).

Bad data (missing or unreadable images, tables of different length, mismatched ids, identities with fewer than 2
views) is counted and skipped with one warning, or raises ``ValueError`` with ``strict=True``. Distractor rows are
never shifted: a row whose id does not match is dropped for that source.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from nearid_reward.files import write_json_atomic
from nearid_reward.images import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

__all__ = [
    "ImageRef",
    "BadDataReport",
    "ImageTable",
    "ArrowImageTable",
    "PathImageTable",
    "NearIDData",
    "load_table",
    "load_nearid",
    "load_folder",
    "load_manifest",
    "load_mtg",
    "load_data",
    "mtg_oracles",
    "split_by_identity",
    "write_index_file",
    "read_index_file",
    "decode_image",
    "NearIDTrainDataset",
    "EpochShuffleSampler",
    "TableRegistry",
    "describe_ref",
]

# (table key, row, column): where an image lives.
ImageRef = tuple[str, int, str]
MTG_VIEW_COLUMNS = ("image_1_original", "image_2_original")
MTG_EDIT_COLUMNS = ("image_1_inpainted", "image_2_inpainted")
MTG_OBJECT_MASKS = ("image_1_object_mask", "image_2_object_mask")
MTG_PART_MASKS = ("image_1_part_mask", "image_2_part_mask")
DISTRACTOR_PREFIX = "nimg"


class BadDataReport:
    """Counts bad data by reason; raises at the first problem when ``strict``; warns once when asked.

    Args:
        strict: raise ``ValueError`` on the first problem instead of counting it.
        where: a label for messages (e.g. the dataset path).
    """

    def __init__(self, *, strict: bool = False, where: str = "data") -> None:
        self.strict = strict
        self.where = where
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}
        self._warned: set[str] = set()
        self._seen: dict[str, set[Any]] = {}

    def add(self, reason: str, detail: str, count: int = 1, *, key: Any = None) -> None:
        """Count ``count`` cases of ``reason`` (``detail`` names one of them).

        ``key`` identifies the bad item (e.g. an image reference): an item already counted for this reason is not
        counted again, so an unreadable image met in every epoch counts once.
        """
        if count <= 0:
            return
        if key is not None:
            seen = self._seen.setdefault(reason, set())
            if key in seen:
                return
            seen.add(key)
        if self.strict:
            raise ValueError(f"{self.where}: {reason}: {detail} (run without --strict to skip such data)")
        self.counts[reason] = self.counts.get(reason, 0) + count
        examples = self.examples.setdefault(reason, [])
        if len(examples) < 3:
            examples.append(detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        parts = [f"{n} x {reason} (e.g. {'; '.join(self.examples[reason])})" for reason, n in self.counts.items()]
        return f"{self.where}: skipped bad data: " + ", ".join(parts)

    def warn(self) -> None:
        """Log one warning for the kinds of bad data not reported yet (later cases of a kind are only counted)."""
        new = [reason for reason in self.counts if reason not in self._warned]
        if new:
            parts = [f"{self.counts[r]} x {r} (e.g. {'; '.join(self.examples[r])})" for r in new]
            logger.warning("%s: skipped bad data: %s; further cases are counted (see the run summary)",
                           self.where, ", ".join(parts))
            self._warned.update(new)

    def to_dict(self) -> dict[str, int]:
        return dict(self.counts)


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes fully (raises ``ValueError`` for unreadable data)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.copy()
    except Exception as exc:  # PIL raises many types for corrupt files
        raise ValueError(f"unreadable image ({len(data)} bytes): {exc}") from exc


# ------------------------------------------------------------------------------------------------ tables
class ImageTable:
    """A table of image columns addressed by ``(row, column)``; subclasses read arrow tables or files.

    Attributes:
        key: unique name used in :data:`ImageRef`.
        columns: all column names.
        ids: the ``id`` column (or None when the table has none).
    """

    key: str
    columns: list[str]
    ids: list[Any] | None

    def __len__(self) -> int:
        raise NotImplementedError

    def present(self, column: str) -> np.ndarray:
        """``[len]`` bool: rows whose ``column`` holds an image (cheap; does not decode)."""
        raise NotImplementedError

    def read(self, row: int, column: str) -> bytes | None:
        """The encoded bytes of one image, or None when the cell is empty or the file is missing."""
        raise NotImplementedError

    def describe(self, row: int, column: str) -> str:
        """How messages name one image: its file path when it has one, else its table, row, id and column."""
        ident = f" (id {self.ids[row]!r})" if self.ids is not None and 0 <= row < len(self.ids) else ""
        return f"table {self.key!r} row {row}{ident} column {column!r}"


class ArrowImageTable(ImageTable):
    """An image table backed by a ``datasets.Dataset`` (memory-mapped arrow; images as ``{bytes, path}``).

    Args:
        dataset: the dataset; image columns may be ``datasets.Image`` features, ``{bytes, path}`` structs,
            binary or path strings.
        key: unique table name.
        root: folder against which relative image paths are resolved.
    """

    def __init__(self, dataset: Any, key: str, root: Path | None = None) -> None:
        import datasets

        if getattr(dataset, "_indices", None) is not None:
            dataset = dataset.flatten_indices()
        for name, feature in dataset.features.items():
            if isinstance(feature, datasets.Image) and feature.decode:
                dataset = dataset.cast_column(name, datasets.Image(decode=False))
        self.dataset = dataset
        self.key = key
        self.root = root
        self.columns = list(dataset.column_names)
        self.ids = list(dataset["id"]) if "id" in self.columns else None
        self._arrays: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_arrays"] = {}  # re-extracted lazily in each worker (the dataset pickles by reference)
        return state

    def __len__(self) -> int:
        return len(self.dataset)

    def _array(self, column: str) -> Any:
        if column not in self._arrays:
            if column not in self.columns:
                raise KeyError(f"table {self.key!r} has no column {column!r}; columns: {self.columns}")
            self._arrays[column] = self.dataset.data.column(column)
        return self._arrays[column]

    def present(self, column: str) -> np.ndarray:
        import pyarrow as pa
        import pyarrow.compute as pc

        array = self._array(column)
        valid = pc.is_valid(array)
        if pa.types.is_struct(array.type):
            names = [array.type.field(i).name for i in range(array.type.num_fields)]
            parts = [pc.is_valid(pc.struct_field(array, name)) for name in ("bytes", "path") if name in names]
            if parts:
                inner = parts[0] if len(parts) == 1 else pc.or_(parts[0], parts[1])
                valid = pc.and_(valid, inner)
        return np.asarray(valid.to_numpy(zero_copy_only=False), dtype=bool)

    def _path(self, value: Any) -> Path:
        path = Path(str(value))
        return self.root / path if not path.is_absolute() and self.root is not None else path

    def describe(self, row: int, column: str) -> str:
        value = self._array(column)[row].as_py()
        if isinstance(value, dict) and value.get("bytes") is None and value.get("path") is not None:
            return str(self._path(value["path"]))
        if isinstance(value, str):
            return str(self._path(value))
        return super().describe(row, column)

    def read(self, row: int, column: str) -> bytes | None:
        value = self._array(column)[row].as_py()
        if value is None:
            return None
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                return bytes(value["bytes"])
            value = value.get("path")
            if value is None:
                return None
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        try:
            return self._path(value).read_bytes()
        except OSError:
            return None


class PathImageTable(ImageTable):
    """An image table of file paths (folder format and JSONL manifests).

    Args:
        key: unique table name.
        columns: column name -> one path (or None) per row.
        ids: one id per row.
    """

    def __init__(self, key: str, columns: Mapping[str, Sequence[Path | None]], ids: Sequence[Any]) -> None:
        self.key = key
        self._paths = {name: list(values) for name, values in columns.items()}
        self.columns = list(self._paths)
        self.ids = list(ids)
        for name, values in self._paths.items():
            if len(values) != len(self.ids):
                raise ValueError(f"column {name!r} of {key!r} has {len(values)} rows, expected {len(self.ids)}")

    def __len__(self) -> int:
        return len(self.ids or [])

    def present(self, column: str) -> np.ndarray:
        return np.array([p is not None for p in self._paths[column]], dtype=bool)

    def path(self, row: int, column: str) -> Path | None:
        return self._paths[column][row]

    def describe(self, row: int, column: str) -> str:
        path = self._paths[column][row]
        return str(path) if path is not None else super().describe(row, column)

    def read(self, row: int, column: str) -> bytes | None:
        path = self._paths[column][row]
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError:
            return None


TableRegistry = dict[str, ImageTable]


def describe_ref(registry: TableRegistry, ref: ImageRef) -> str:
    """How messages name the image at ``ref``: its file path when it has one (see :meth:`ImageTable.describe`)."""
    table = registry.get(ref[0])
    return table.describe(ref[1], ref[2]) if table is not None else str(ref)


# ------------------------------------------------------------------------------------------------ NearIDData
@dataclass
class NearIDData:
    """Identities with their views and slot-aligned near-identity distractors from one or more settings.

    Attributes:
        name: a label (used in table keys and messages).
        positives: the table of views.
        view_columns: the view columns in slot order (slot ``j`` of every distractor setting shares view ``j``'s
            background).
        distractors: setting name -> distractor table.
        distractor_columns: setting name -> columns in slot order (same length as ``view_columns``).
        view_ok: ``[N, V]`` bool, views present.
        distractor_ok: setting -> ``[N, V]`` bool, distractors present *and* row-aligned (ids match).
        rows: the usable rows (at least 2 views), ascending.
        report: what was skipped and why.
    """

    name: str
    positives: ImageTable
    view_columns: list[str]
    distractors: dict[str, ImageTable]
    distractor_columns: dict[str, list[str]]
    view_ok: np.ndarray
    distractor_ok: dict[str, np.ndarray]
    rows: np.ndarray
    report: BadDataReport = field(default_factory=BadDataReport)

    @property
    def num_views(self) -> int:
        return len(self.view_columns)

    @property
    def settings(self) -> list[str]:
        return list(self.distractors)

    @property
    def ids(self) -> list[Any]:
        if self.positives.ids is not None:
            return list(self.positives.ids)
        return list(range(len(self.positives)))

    def __len__(self) -> int:
        return len(self.positives)

    def registry(self) -> TableRegistry:
        out: TableRegistry = {self.positives.key: self.positives}
        for table in self.distractors.values():
            out[table.key] = table
        return out

    def view_ref(self, row: int, slot: int) -> ImageRef | None:
        if not self.view_ok[row, slot]:
            return None
        return (self.positives.key, int(row), self.view_columns[slot])

    def distractor_ref(self, setting: str, row: int, slot: int) -> ImageRef | None:
        if not self.distractor_ok[setting][row, slot]:
            return None
        return (self.distractors[setting].key, int(row), self.distractor_columns[setting][slot])

    def all_refs(self, rows: Iterable[int], settings: Sequence[str] | None = None) -> list[ImageRef]:
        """Every view and distractor reference of ``rows`` (each once)."""
        settings = self.settings if settings is None else list(settings)
        out: list[ImageRef] = []
        for r in rows:
            for j in range(self.num_views):
                for ref in [self.view_ref(r, j)] + [self.distractor_ref(s, r, j) for s in settings]:
                    if ref is not None:
                        out.append(ref)
        return list(dict.fromkeys(out))

    def eval_refs(
        self, rows: Sequence[int], settings: Sequence[str] | None = None
    ) -> tuple[list[list[ImageRef | None]], dict[str, list[list[ImageRef | None]]]]:
        """Slot-aligned references for evaluation: views ``[N][V]`` and, per setting, distractors ``[N][V]``."""
        settings = self.settings if settings is None else list(settings)
        views = [[self.view_ref(r, j) for j in range(self.num_views)] for r in rows]
        negs = {s: [[self.distractor_ref(s, r, j) for j in range(self.num_views)] for r in rows] for s in settings}
        return views, negs


def _check_alignment(
    positives: ImageTable, table: ImageTable, setting: str, report: BadDataReport
) -> np.ndarray:
    """``[N]`` bool: rows of ``table`` aligned with the positives (same position, same id)."""
    n, m = len(positives), len(table)
    aligned = np.zeros(n, dtype=bool)
    aligned[: min(n, m)] = True
    if n != m:
        if positives.ids is None or table.ids is None:
            raise ValueError(
                f"distractor table {setting!r} has {m} rows but the positives have {n}, and without `id` columns the "
                "row alignment cannot be verified; fix the tables (rows are aligned by position)"
            )
        report.add("tables of different length",
                   f"distractor table {setting!r} has {m} rows, positives {n}; rows without a counterpart are "
                   "used without this distractor")
    if positives.ids is not None and table.ids is not None:
        ours = np.asarray(positives.ids[: min(n, m)], dtype=object)
        theirs = np.asarray(table.ids[: min(n, m)], dtype=object)
        mismatch = np.flatnonzero(ours != theirs)
        if mismatch.size:
            r = int(mismatch[0])
            report.add("mismatched ids",
                       f"distractor table {setting!r} row {r} has id {theirs[r]!r}, positives row {r} has id "
                       f"{ours[r]!r}; such rows are used without this distractor", count=int(mismatch.size))
            aligned[mismatch] = False
    return aligned


def _assemble(
    name: str,
    positives: ImageTable,
    view_columns: Sequence[str],
    distractors: Mapping[str, tuple[ImageTable, Sequence[str]]],
    report: BadDataReport,
    *,
    min_views: int = 2,
) -> NearIDData:
    n = len(positives)
    view_ok = np.stack([positives.present(c) for c in view_columns], axis=1) if n else np.zeros((0, len(view_columns)),
                                                                                                 dtype=bool)
    distractor_ok: dict[str, np.ndarray] = {}
    for setting, (table, cols) in distractors.items():
        if len(cols) != len(view_columns):
            raise ValueError(
                f"distractor setting {setting!r} has {len(cols)} columns {list(cols)} but there are "
                f"{len(view_columns)} view columns {list(view_columns)}"
            )
        aligned = _check_alignment(positives, table, setting, report)
        ok = np.zeros((n, len(cols)), dtype=bool)
        m = min(n, len(table))
        for j, col in enumerate(cols):
            ok[:m, j] = table.present(col)[:m]
        ok &= aligned[:, None] & view_ok  # a distractor without its view is useless
        distractor_ok[setting] = ok
    n_views = view_ok.sum(1)
    too_few = np.flatnonzero(n_views < min_views)
    if too_few.size:
        r = int(too_few[0])
        ident = positives.ids[r] if positives.ids is not None else r
        report.add("identities with fewer than 2 views",
                   f"row {r} (id {ident!r}) has {int(n_views[r])} view(s)", count=int(too_few.size))
    rows = np.flatnonzero(n_views >= min_views)
    return NearIDData(
        name=name,
        positives=positives,
        view_columns=list(view_columns),
        distractors={s: t for s, (t, _) in distractors.items()},
        distractor_columns={s: list(c) for s, (_, c) in distractors.items()},
        view_ok=view_ok,
        distractor_ok=distractor_ok,
        rows=rows,
        report=report,
    )


# ------------------------------------------------------------------------------------------------ loaders
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
    return _assemble(name, pos_table, view_columns, tables, report)


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
    return _assemble(name, positives, list(view_cols), tables, report)


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
    return _assemble(name, positives, list(view_cols), tables, report)


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
    return _assemble(name, table, list(MTG_VIEW_COLUMNS), {"mtg": (table, list(MTG_EDIT_COLUMNS))}, report)


def mtg_oracles(data: NearIDData, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Oracle similarities ``1 - |part| / |object|`` of both MTG views for ``rows`` (0 when a mask is missing)."""
    from .metrics import mtg_oracle

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


# ------------------------------------------------------------------------------------------------ splits
def split_by_identity(
    ids: Sequence[Any], rows: Sequence[int], *, val_fraction: float = 0.0, test_fraction: float = 0.0, seed: int = 0
) -> dict[str, list[int]]:
    """Seeded split of ``rows`` into train / val / test such that all rows of one identity land in one split.

    Args:
        ids: the id of every row of the table.
        rows: the rows to split.
        val_fraction, test_fraction: fractions of *identities* held out.
        seed: split seed.

    Returns:
        ``{"train": rows, "val": rows, "test": rows}`` (sorted).
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction and test_fraction must be in [0, 1) with a sum < 1, got {val_fraction}, "
                         f"{test_fraction}")
    groups: dict[Any, list[int]] = {}
    for r in rows:
        groups.setdefault(ids[int(r)], []).append(int(r))
    keys = list(groups)
    order = np.random.default_rng([seed, 77]).permutation(len(keys))
    n_val = int(round(len(keys) * val_fraction))
    n_test = int(round(len(keys) * test_fraction))
    parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
    return {name: sorted(r for k in idx for r in groups[keys[int(k)]]) for name, idx in parts.items()}


def write_index_file(path: str | os.PathLike[str], indices: Sequence[int], **meta: Any) -> None:
    """Write row indices as ``{"indices": [...], ...meta}`` (atomic; readable by the official evaluation)."""
    write_json_atomic(path, {"indices": [int(i) for i in indices], **meta})


def read_index_file(path: str | os.PathLike[str], *, num_rows: int | None = None) -> list[int]:
    """Read a row-index file: a JSON list or ``{"indices": [...]}``; duplicates and out-of-range rows raise."""
    file = Path(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"could not read index file {file}: {exc}") from exc
    values = data.get("indices") if isinstance(data, dict) else data
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{file} must hold a list of integer row indices or {{\"indices\": [...]}}")
    if len(set(values)) != len(values):
        raise ValueError(f"{file} lists duplicate row indices")
    if num_rows is not None and any(not 0 <= v < num_rows for v in values):
        bad = next(v for v in values if not 0 <= v < num_rows)
        raise ValueError(f"{file} has row index {bad} outside the table's {num_rows} rows")
    return [int(v) for v in values]


# ------------------------------------------------------------------------------------------------ training samples
class NearIDTrainDataset(torch.utils.data.Dataset):
    """Per-epoch training samples over one or more sources (NearID data, MTG pairs repeated, ...).

    Item ``i`` of epoch ``e`` is an identity row with (deterministically, from ``(seed, e, i)``):

    * its valid views shuffled (anchor = slot 0 after the shuffle; missing slots at the end);
    * for each view slot, one distractor drawn from the settings that have one for that slot, with a generator
      keyed by ``(seed, e, i, slot)``; the distractors follow the views' permutation, so distractor slot 0 shares
      the anchor's background.

    Items are dicts ``{"refs": 2V references (V views then V distractors; None = empty slot), "index", "epoch"}``;
    the collate functions of :mod:`train_head.cache` turn them into pixels or cached tokens.

    Args:
        sources: ``(data, rows)`` pairs; a source listed twice is repeated.
        seed: data seed.
        num_views: slots V per item (default: the most views of any source).
        settings: per source, the distractor settings to draw from (default: all of that source's settings).
        shuffle_anchor: shuffle the views (off: slot order).
    """

    def __init__(
        self,
        sources: Sequence[tuple[NearIDData, Sequence[int]]],
        *,
        seed: int = 0,
        num_views: int | None = None,
        settings: Sequence[Sequence[str] | None] | None = None,
        shuffle_anchor: bool = True,
    ) -> None:
        if not sources:
            raise ValueError("`sources` is empty: pass at least one (data, rows) pair")
        self.sources = [data for data, _ in sources]
        self.items: list[tuple[int, int]] = [(k, int(r)) for k, (_, rows) in enumerate(sources) for r in rows]
        if not self.items:
            raise ValueError("the training sources have no usable rows")
        self.num_views = num_views or max(d.num_views for d in self.sources)
        for d in self.sources:
            if d.num_views > self.num_views:
                raise ValueError(f"source {d.name!r} has {d.num_views} views, more than num_views={self.num_views}")
        self.settings = [
            list(d.settings) if settings is None or settings[k] is None else list(settings[k])  # type: ignore[arg-type]
            for k, d in enumerate(self.sources)
        ]
        for k, d in enumerate(self.sources):
            unknown = [s for s in self.settings[k] if s not in d.distractors]
            if unknown:
                raise ValueError(f"source {d.name!r} has no distractor settings {unknown}; it has {d.settings}")
        self.seed = int(seed)
        self.shuffle_anchor = shuffle_anchor
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def registry(self) -> TableRegistry:
        out: TableRegistry = {}
        for d in self.sources:
            out.update(d.registry())
        return out

    def sample(self, index: int, epoch: int) -> dict[str, Any]:
        k, row = self.items[index]
        data = self.sources[k]
        valid = [j for j in range(data.num_views) if data.view_ok[row, j]]
        if self.shuffle_anchor:
            perm = np.random.default_rng([self.seed, epoch, index, 424242]).permutation(len(valid))
            valid = [valid[int(p)] for p in perm]
        negs: dict[int, ImageRef | None] = {}
        for j in range(data.num_views):
            choices = [s for s in self.settings[k] if data.distractor_ok[s][row, j]]
            if not choices:
                negs[j] = None
                continue
            pick = choices[int(np.random.default_rng([self.seed, epoch, index, 200003, j]).integers(len(choices)))]
            negs[j] = data.distractor_ref(pick, row, j)
        pad = self.num_views - len(valid)
        views: list[ImageRef | None] = [data.view_ref(row, j) for j in valid] + [None] * pad
        distractors = [negs[j] for j in valid] + [None] * pad
        return {"refs": views + distractors, "index": index, "epoch": epoch}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.sample(index, self.epoch)

    def all_refs(self) -> list[ImageRef]:
        """Every image any epoch can use (all views and all distractors of the chosen settings)."""
        out: list[ImageRef] = []
        for k, data in enumerate(self.sources):
            rows = sorted({r for kk, r in self.items if kk == k})
            out.extend(data.all_refs(rows, self.settings[k]))
        return list(dict.fromkeys(out))


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A permutation of ``range(n)`` drawn from ``(seed, epoch)``: identical on every process and on resume."""

    def __init__(self, n: int, *, seed: int = 0, shuffle: bool = True) -> None:
        self.n = int(n)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):  # type: ignore[no-untyped-def]
        if not self.shuffle:
            return iter(range(self.n))
        return iter(np.random.default_rng([self.seed, self.epoch, 99]).permutation(self.n).tolist())
