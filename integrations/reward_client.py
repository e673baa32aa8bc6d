"""A Flow-GRPO-shaped scorer that asks ``nearid-reward-server`` for identity rewards.

Flow-GRPO, DiffusionNFT and DanceGRPO cannot import nearid-reward (their transformers / torch pins), so this file
is meant to be **copied into their code** beside their ``rewards.py``: it needs only the standard library, numpy and
Pillow (torch tensors are accepted without importing torch). ``nearid_remote_scorer(url)`` returns a function with
their scorer signature ``fn(images, prompts, metadata) -> (scores, {})``:

* ``images``: a float tensor ``[B, 3, H, W]`` in [0, 1] (on any device), a uint8 numpy array ``[B, H, W, 3]``, a float
  numpy array ``[B, 3, H, W]`` in [0, 1], or a list of PIL images;
* ``metadata[i]["reference"]`` (optional): sample ``i``'s reference photos (file paths, PIL images or uint8 arrays);
  samples without one are scored against the server's ``--nearid_reference_dir``;
* ``scores``: a list of B floats (cosine identity, higher is better).

It never raises: those frameworks call scorers in a ``ThreadPoolExecutor`` and an exception there ends the run. On
any failure (server down, timeout, an HTTP error, a malformed reply) it logs a warning and returns
``[fallback] * B`` (default ``0.0``: in group-normalised advantages a batch of equal rewards contributes no update;
pass ``fallback=float("nan")`` to make a failure visible instead).

Example (Flow-GRPO ``flow_grpo/rewards.py``, inside ``multi_score``)::

    from flow_grpo.reward_client import nearid_remote_scorer
    score_functions["nearid"] = lambda device: nearid_remote_scorer("http://127.0.0.1:8765")
"""

from __future__ import annotations

import base64
import json
import logging
import os
import struct
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["nearid_remote_scorer", "encode_images", "png_bytes", "request_body"]

Scorer = Callable[[Any, Any, Any], tuple[list[float], dict[str, Any]]]


def _uint8_batch(images: Any) -> list[Any]:
    """``images`` as a list of uint8 ``[H, W, 3]`` arrays or PIL images (torch only through its methods)."""
    if hasattr(images, "detach") and hasattr(images, "cpu"):  # a torch tensor [B, 3, H, W] in [0, 1]
        # to 8 bits before the channel-last copy: that copy then moves 1 byte per value instead of 4
        images = images.detach().float().mul(255).add_(0.5).clamp_(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"images must be [B, 3, H, W] in [0, 1] or uint8 [B, H, W, 3], got shape {images.shape}")
        if images.dtype != np.uint8:  # float [B, 3, H, W] in [0, 1]
            images = np.round(np.clip(images.transpose(0, 2, 3, 1), 0, 1) * 255).astype(np.uint8)
        return list(images)
    return list(images)


def _chunk(kind: bytes, data: bytes) -> list[bytes]:
    """A PNG chunk as parts to join (the CRC is chained over type and data: no copy of the data)."""
    return [struct.pack(">I", len(data)), kind, data, struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))]


def png_bytes(array: np.ndarray, compress_level: int = 0) -> bytes:
    """A uint8 ``[H, W, 3]`` array as an 8-bit RGB PNG without row filters, deflated at ``compress_level``.

    Lossless at every level. Level 0 (stored) skips both the filters and the deflate search that make a general PNG
    encoder (and decoder) slow: several times cheaper at each end, for a body about 1.33 x the raw pixels.
    """
    height, width, _ = array.shape
    rows = np.zeros((height, width * 3 + 1), np.uint8)  # each row: filter type 0 ("none"), then R, G, B, ...
    rows[:, 1:] = array.reshape(height, width * 3)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, deflate, no interlace
    pixels = zlib.compress(rows, compress_level)
    return b"".join([b"\x89PNG\r\n\x1a\n", *_chunk(b"IHDR", header), *_chunk(b"IDAT", pixels), *_chunk(b"IEND", b"")])


def _encode_one(image: Any, compress_level: int) -> bytes:
    if isinstance(image, (str, os.PathLike)):  # a file: sent as it is (the server reads PNG, JPEG, WebP, ...)
        with open(image, "rb") as handle:
            return base64.b64encode(handle.read())
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        kind = f"array {image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise TypeError(f"expected a PIL image, a uint8 [H, W, 3] array or a file path, got {kind}")
    return base64.b64encode(png_bytes(image, compress_level))


def encode_images(images: Any, *, compress_level: int = 0) -> list[str]:
    """Base64 PNG strings of a batch (see the module docstring for the accepted forms and :func:`png_bytes`)."""
    return [_encode_one(image, compress_level).decode("ascii") for image in _uint8_batch(images)]


def _references(metadata: Any, batch: int, compress_level: int) -> list[list[str] | None] | None:
    if not isinstance(metadata, Sequence) or len(metadata) != batch:
        return None
    out: list[list[str] | None] = []
    for item in metadata:
        refs = item.get("reference") if isinstance(item, dict) else None
        if refs is None:
            out.append(None)
            continue
        refs = [refs] if isinstance(refs, (str, os.PathLike, Image.Image)) else refs
        out.append([_encode_one(r, compress_level).decode("ascii") for r in refs])
    return out if any(r is not None for r in out) else None


def request_body(images: Any, prompts: Any = None, metadata: Any = None, *, compress_level: int = 0) -> bytes:
    """The ``/compute`` JSON body of a batch: ``prompt``, ``image`` (base64 PNGs), ``condition_images``, ``extra``.

    Raises:
        TypeError, ValueError: images or references in a form this client does not read.
    """
    encoded = [_encode_one(image, compress_level) for image in _uint8_batch(images)]  # base64 bytes
    head = {"prompt": list(prompts) if prompts is not None else None,
            "condition_images": _references(metadata, len(encoded), compress_level), "extra": None}
    # base64 needs no JSON escaping: joining the strings skips json.dumps' scan of megabytes of pixels
    return json.dumps(head).encode()[:-1] + b', "image": ["' + b'", "'.join(encoded) + b'"]}'


def _batch_size(images: Any, prompts: Any) -> int:
    for candidate in (images, prompts):
        try:
            return len(candidate)
        except Exception:  # no length: try the prompts, then give up (an empty fallback)
            continue
    return 0


def nearid_remote_scorer(url: str, token: str | None = None, *, timeout: float = 120.0, fallback: float = 0.0,
                         compress_level: int = 0) -> Scorer:
    """A scorer ``fn(images, prompts, metadata) -> (scores, {})`` backed by ``nearid-reward-server`` at ``url``.

    Args:
        url: the server, e.g. ``"http://127.0.0.1:8765"``.
        token: the server's ``--token`` (sent as ``Authorization: Bearer <token>``), or None.
        timeout: seconds to wait for one reply.
        fallback: the score of every sample of a batch that could not be scored (the function never raises).
        compress_level: PNG deflate level, 0-9 (lossless at every level; 0, stored, is the cheapest to encode and
            decode; raise it when the link, not the CPU, is the bottleneck). See :func:`png_bytes`.

    Returns:
        The scorer. ``scores`` is a list of B floats and the info dict is always ``{}`` (the frameworks merge it
        into their logs); a failure is logged as a warning with the server's reason.
    """
    endpoint = url.rstrip("/") + "/compute"
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"

    def score(images: Any, prompts: Any = None, metadata: Any = None) -> tuple[list[float], dict[str, Any]]:
        batch = _batch_size(images, prompts)
        try:
            body = request_body(images, prompts, metadata, compress_level=compress_level)
            request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                rewards = json.loads(reply.read())["rewards"]
            if len(rewards) != batch:
                raise ValueError(f"the server returned {len(rewards)} rewards for {batch} images")
            return [float(r) for r in rewards], {}
        except Exception as exc:  # never raise inside the trainer's executor thread
            reason = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, urllib.error.HTTPError):
                try:  # the server's JSON error names the field or the limit
                    reason = f"HTTP {exc.code}: {exc.read()[:500].decode(errors='replace')}"
                except Exception:
                    pass
                finally:
                    exc.close()
            logger.warning("NearID reward server %s failed, returning %s for %d sample(s): %s",
                           endpoint, fallback, batch, reason)
            return [float(fallback)] * batch, {}

    return score
