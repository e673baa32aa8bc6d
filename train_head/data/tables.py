"""Image tables: every image is addressed by a reference ``(table, row, column)`` and read as its encoded bytes, so
the feature cache can key it by content hash and decoding happens in DataLoader workers. Tables read ``datasets``
(arrow) columns or files on disk; :class:`BadDataReport` counts what could not be used.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["ImageRef", "BadDataReport", "decode_image", "ImageTable", "ArrowImageTable", "PathImageTable",
           "TableRegistry", "describe_ref"]

# (table key, row, column): where an image lives.
ImageRef = tuple[str, int, str]


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
