"""A feature cache for head training: the backbone is frozen, so every image is encoded once and its final patch
tokens are stored (fp16, memory-mapped numpy shards keyed by the image's content hash); later epochs train the head
from the cache.

Layout::

    <cache_dir>/<fingerprint>/cache_config.json           backbone, preprocessing and encoding dtype it belongs to
    <cache_dir>/<fingerprint>/tokens-r<rank>-<id>.npy     [n, N, D] float16 (np.load(..., mmap_mode="r"))
    <cache_dir>/<fingerprint>/tokens-r<rank>-<id>.json    {"keys": [...], "lengths": [...], "shape": [...]}

The fingerprint hashes the backbone weights, its config, the preprocessing and the encoding dtype, so a cache is
never reused for another backbone. A shard counts once its ``.json`` exists (written after the ``.npy``, both
atomically), so an interrupted build leaves no torn entry and a rerun encodes only what is missing. Under several
processes each rank encodes its own share of the images (``accelerate``'s ``split_between_processes``) and then
every rank reads the whole cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nearid_reward.files import atomic_write, remove_stale_temporaries, write_json_atomic
from nearid_reward.preprocess import PixelInputs, preprocess_pil

from .data import BadDataReport, ImageRef, TableRegistry, decode_image, describe_ref

if TYPE_CHECKING:
    from nearid_reward import NearIDModel

logger = logging.getLogger(__name__)

__all__ = ["FeatureStore", "content_key", "model_fingerprint", "build_feature_cache"]

CACHE_CONFIG_NAME = "cache_config.json"


def content_key(data: bytes) -> str:
    """The cache key of an encoded image: a 128-bit BLAKE2b hex digest of its bytes."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def model_fingerprint(model: NearIDModel, encode_dtype: torch.dtype) -> str:
    """Hash of everything that determines the tokens: backbone weights and config, preprocessing, encoding dtype."""
    h = hashlib.blake2b(digest_size=16)
    h.update(model.backbone_type.encode())
    h.update(model.vision_config.to_json_string(use_diff=False).encode())
    h.update(json.dumps(model.preprocess.to_dict(), sort_keys=True).encode())
    h.update(str(encode_dtype).encode())
    for name, tensor in sorted(model.backbone.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureStore:
    """Final backbone tokens keyed by image content hash, in fp16 memory-mapped shards.

    Args:
        folder: the cache folder of one backbone fingerprint.
        rank: process rank, used in shard names.
        shard_size: images buffered before a shard is written.

    Use :meth:`open` to create or reopen the folder for a model.
    """

    def __init__(self, folder: str | os.PathLike[str], *, rank: int = 0, shard_size: int = 4096) -> None:
        self.folder = Path(folder)
        self.rank = rank
        self.shard_size = shard_size
        self._index: dict[str, tuple[str, int, int]] = {}  # key -> (shard, row, length)
        self._maps: dict[str, np.ndarray] = {}
        self._buffer: list[tuple[str, np.ndarray]] = []
        self.reload()

    @classmethod
    def open(
        cls, cache_dir: str | os.PathLike[str], fingerprint: str, meta: dict[str, Any], *, rank: int = 0
    ) -> FeatureStore:
        """The store of ``fingerprint`` under ``cache_dir`` (created with ``meta`` in its config if new).

        Rank 0 first removes the shards that killed builds left half-written (``.tokens-*.npy.tmp-*``; see
        :func:`nearid_reward.files.remove_stale_temporaries`), so open it on rank 0 before the other ranks.
        """
        folder = Path(cache_dir) / fingerprint[:24]
        folder.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            remove_stale_temporaries(folder)
        config = folder / CACHE_CONFIG_NAME
        if not config.is_file() and rank == 0:
            write_json_atomic(config, {"fingerprint": fingerprint, **meta})
        elif config.is_file():
            stored = json.loads(config.read_text(encoding="utf-8")).get("fingerprint")
            if stored != fingerprint:
                raise ValueError(f"{config} belongs to backbone fingerprint {stored}, not {fingerprint}")
        return cls(folder, rank=rank)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = {}  # memory maps are reopened in each worker
        state["_buffer"] = []
        return state

    def reload(self) -> None:
        """Re-read the shard indexes on disk (after other processes wrote shards)."""
        self._index = {}
        if not self.folder.is_dir():
            return
        for meta_file in sorted(self.folder.glob("tokens-*.json")):
            try:
                meta = json.loads(meta_file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                logger.warning("ignoring unreadable cache shard index %s", meta_file)
                continue
            shard = meta_file.with_suffix(".npy").name
            if not (self.folder / shard).is_file():
                continue
            for row, (key, length) in enumerate(zip(meta["keys"], meta["lengths"])):
                self._index.setdefault(key, (shard, row, int(length)))

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def keys(self) -> set[str]:
        return set(self._index)

    def add(self, keys: Sequence[str], tokens: torch.Tensor, lengths: Sequence[int] | None = None) -> None:
        """Buffer tokens ``[n, N, D]`` of ``n`` images (stored as fp16); ``lengths`` = real tokens per image."""
        arr = tokens.detach().to("cpu", torch.float16).numpy()
        lengths = [arr.shape[1]] * len(keys) if lengths is None else list(lengths)
        for i, key in enumerate(keys):
            self._buffer.append((key, arr[i, : lengths[i]]))
        if len(self._buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write buffered tokens as one shard (``.npy`` then its ``.json``, both atomically)."""
        if not self._buffer:
            return
        longest = max(t.shape[0] for _, t in self._buffer)
        width = self._buffer[0][1].shape[1]
        arr = np.zeros((len(self._buffer), longest, width), dtype=np.float16)
        for i, (_, t) in enumerate(self._buffer):
            arr[i, : t.shape[0]] = t
        name = f"tokens-r{self.rank:03d}-{uuid.uuid4().hex[:12]}"
        with atomic_write(self.folder / f"{name}.npy", "wb") as handle:
            np.save(handle, arr)
        write_json_atomic(self.folder / f"{name}.json", {
            "keys": [k for k, _ in self._buffer],
            "lengths": [int(t.shape[0]) for _, t in self._buffer],
            "shape": list(arr.shape),
        })
        for row, (key, t) in enumerate(self._buffer):
            self._index.setdefault(key, (f"{name}.npy", row, int(t.shape[0])))
        self._buffer = []

    def _map(self, shard: str) -> np.ndarray:
        if shard not in self._maps:
            self._maps[shard] = np.load(self.folder / shard, mmap_mode="r")
        return self._maps[shard]

    def get(self, keys: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens ``[n, N, D]`` (float16) of ``keys`` and a token mask ``[n, N]`` when lengths differ (else None)."""
        entries = []
        for key in keys:
            try:
                entries.append(self._index[key])
            except KeyError as exc:
                raise KeyError(f"image {key} is not in the feature cache {self.folder}") from exc
        longest = max(e[2] for e in entries)
        by_shard: dict[str, list[int]] = {}
        for i, (shard, _, _) in enumerate(entries):
            by_shard.setdefault(shard, []).append(i)
        width = self._map(entries[0][0]).shape[2]
        out: np.ndarray | None = None
        for shard, positions in by_shard.items():
            rows = np.array([entries[i][1] for i in positions])
            block = self._map(shard)[rows]  # [k, N_shard, D], a copy read from the memory map
            lengths = [entries[i][2] for i in positions]
            unpadded = all(n == block.shape[1] for n in lengths)
            if unpadded and len(by_shard) == 1 and block.shape[1] == longest:
                return torch.from_numpy(block), None  # fixed resolution, one shard: the gathered block is the answer
            if out is None:
                out = np.zeros((len(keys), longest, width), dtype=np.float16)
            if unpadded:
                out[np.array(positions), : block.shape[1]] = block
                continue
            for local, i in enumerate(positions):
                out[i, : lengths[local]] = block[local, : lengths[local]]
        assert out is not None  # keys is non-empty, so some shard was read
        lengths = np.array([e[2] for e in entries])
        mask = None
        if (lengths != longest).any():
            mask = torch.from_numpy(np.arange(longest)[None, :] < lengths[:, None])
        return torch.from_numpy(out), mask

    def size_bytes(self) -> int:
        """Bytes on disk of all shards."""
        return sum(p.stat().st_size for p in self.folder.glob("tokens-*.npy"))


class _ScanCollate:
    """Read bytes, hash them, and decode + preprocess the images the cache does not hold yet (runs in workers)."""

    def __init__(self, refs: list[ImageRef], registry: TableRegistry, preprocess: Any, known: set[str]) -> None:
        self.refs = refs
        self.registry = registry
        self.preprocess = preprocess
        self.known = known

    def __call__(self, positions: list[int]) -> dict[str, Any]:
        keys: list[str | None] = []
        failed: list[tuple[ImageRef, str]] = []
        todo_keys: list[str] = []
        parts = []
        seen: set[str] = set()
        for i in positions:
            ref = self.refs[i]
            raw = self.registry[ref[0]].read(ref[1], ref[2])
            if raw is None:
                keys.append(None)
                failed.append((ref, f"{describe_ref(self.registry, ref)}: missing image"))
                continue
            key = content_key(raw)
            if key in self.known or key in seen:
                keys.append(key)
                continue
            try:
                image = decode_image(raw)
            except ValueError as exc:
                keys.append(None)
                failed.append((ref, f"{describe_ref(self.registry, ref)}: {exc}"))
                continue
            keys.append(key)
            seen.add(key)
            todo_keys.append(key)
            parts.append(preprocess_pil([image], self.preprocess))
        out: dict[str, Any] = {"refs": [self.refs[i] for i in positions], "keys": keys, "failed": failed,
                               "todo": todo_keys}
        if parts:
            inputs = PixelInputs.concat(parts)
            out.update(pixel_values=inputs.pixel_values, pixel_attention_mask=inputs.pixel_attention_mask,
                       spatial_shapes=inputs.spatial_shapes)
        return out


def build_feature_cache(
    store: FeatureStore,
    model: NearIDModel,
    refs: Sequence[ImageRef],
    registry: TableRegistry,
    *,
    accelerator: Any = None,
    batch_size: int = 64,
    num_workers: int = 0,
    report: BadDataReport | None = None,
    progress: bool = True,
) -> dict[ImageRef, str]:
    """Encode every referenced image not cached yet and return the key of every readable reference.

    Under ``accelerator`` with several processes, each rank hashes and encodes its share of ``refs``; the
    reference -> key maps (and unreadable images) are then exchanged so every rank has the whole picture, and every
    rank re-reads the shard indexes.

    Args:
        store: the cache to fill.
        model: the model whose frozen backbone encodes the images (on its device and dtype).
        refs: the images needed (train and validation).
        registry: table key -> table.
        accelerator: an ``accelerate.Accelerator`` (or None for one process).
        batch_size, num_workers: encoding DataLoader settings.
        report: where unreadable images are counted (strict reports raise on every rank).
        progress: show a tqdm bar on the main process.

    Returns:
        reference -> content key, for every readable reference.
    """
    from tqdm.auto import tqdm

    refs = list(refs)
    distributed = accelerator is not None and accelerator.num_processes > 1
    if distributed:
        with accelerator.split_between_processes(refs) as part:
            mine = list(part)
    else:
        mine = refs
    loader = torch.utils.data.DataLoader(
        range(len(mine)), batch_size=batch_size, num_workers=num_workers,
        collate_fn=_ScanCollate(mine, registry, model.preprocess, store.keys()),
    )
    keys: dict[ImageRef, str] = {}
    failed: list[tuple[ImageRef, str]] = []
    device = model.device
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    encoded = 0
    added: set[str] = set()  # encoded in this build (not yet visible through the store's index)
    for batch in tqdm(loader, desc="feature cache", disable=not show, leave=False):
        failed.extend(batch["failed"])
        for ref, key in zip(batch["refs"], batch["keys"]):
            if key is not None:
                keys[ref] = key
        if not batch["todo"]:
            continue
        inputs = PixelInputs(batch["pixel_values"], batch["pixel_attention_mask"], batch["spatial_shapes"]).to(device)
        with torch.no_grad():
            tokens, mask = model.encode_tokens(inputs)  # [n, N, D], [n, N] or None
        lengths = None if mask is None else mask.sum(1).tolist()
        keep = [i for i, k in enumerate(batch["todo"]) if k not in store and k not in added]
        added.update(batch["todo"][i] for i in keep)
        if keep:
            store.add([batch["todo"][i] for i in keep], tokens[keep],
                      None if lengths is None else [lengths[i] for i in keep])
            encoded += len(keep)
    store.flush()
    if distributed:
        from accelerate.utils import gather_object

        merged: dict[ImageRef, str] = {}
        for part in gather_object([keys]):
            merged.update(part)
        keys = merged
        failed = list(gather_object(failed))
        accelerator.wait_for_everyone()
    store.reload()
    if report is not None:
        for ref, why in failed:
            report.add("unreadable images", why, key=ref)
    logger.info("feature cache %s: %d images encoded now, %d cached in total (%.1f MiB)", store.folder, encoded,
                len(store), store.size_bytes() / 2**20)
    return keys
