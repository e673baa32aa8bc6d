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

Modules: :mod:`~train_head.data.tables` (image references, tables, the bad-data report),
:mod:`~train_head.data.identities` (identities with aligned distractors), :mod:`~train_head.data.formats` (the
loaders), :mod:`~train_head.data.splits` (identity splits, index files), :mod:`~train_head.data.sampling` (training
samples and sampler). Their public names are re-exported here.
"""

from __future__ import annotations

from .formats import (
    DISTRACTOR_PREFIX,
    MTG_EDIT_COLUMNS,
    MTG_OBJECT_MASKS,
    MTG_PART_MASKS,
    MTG_VIEW_COLUMNS,
    load_data,
    load_folder,
    load_manifest,
    load_mtg,
    load_nearid,
    load_table,
    mtg_oracles,
    setting_name,
)
from .identities import NearIDData
from .sampling import EpochShuffleSampler, NearIDTrainDataset
from .splits import read_index_file, split_by_identity, write_index_file
from .tables import (
    ArrowImageTable,
    BadDataReport,
    ImageRef,
    ImageTable,
    PathImageTable,
    TableRegistry,
    decode_image,
    describe_ref,
)

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
    "setting_name",
    "DISTRACTOR_PREFIX",
    "MTG_VIEW_COLUMNS",
    "MTG_EDIT_COLUMNS",
    "MTG_OBJECT_MASKS",
    "MTG_PART_MASKS",
]
