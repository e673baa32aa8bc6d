"""``nearid-reward-server``: the NearID identity reward over HTTP, for RL frameworks that cannot import this package.

Flow-GRPO, DiffusionNFT and DanceGRPO pin transformers 4.40 / 4.46 and torch 2.6, so they cannot share an
environment with nearid-reward. This server runs in ours and speaks Flow-Factory's remote-reward JSON protocol:

* ``GET /health`` -> ``{"status": "ok", "references": R, ...}``
* ``POST /compute`` with ``{"prompt": [...], "image": [b64 PNG, ...], "condition_images": [[b64, ...] | null, ...] |
  null, "extra": {...} | null}`` -> ``{"rewards": [float, ...]}``. Flow-Factory's own client sends its extra
  arguments under ``kwargs`` and the unused ``video`` / ``condition_videos`` as ``null``: both shapes are accepted.
  Sample ``i`` is scored against ``condition_images[i]`` when it has any, else against the server's reference set.

Errors are JSON ``{"error": "..."}`` naming the field, the limit and the value: 400 for malformed JSON, bad base64, a
non-image or a wrong type; 413 for a body, batch or image over the limits; 401 without the token; the server keeps
serving. It binds to 127.0.0.1 by default; any other address needs ``--token`` (or ``NEARID_REWARD_TOKEN``), which
every request must then carry as ``Authorization: Bearer <token>``. Requests are decoded in worker threads and scored
one batch at a time under a lock around the model, so the event loop never blocks and concurrent requests queue.

Built on starlette and uvicorn (the ``server`` extra: ``pip install "nearid-reward[server]"``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import importlib.util
import io
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from nearid_reward import RewardConfig, __version__
from nearid_reward.cli.arguments import parse_arguments, parse_device, parse_dtype
from nearid_reward.cli.entry_points import entry_point
from nearid_reward.images import to_rgb
from nearid_reward.reward import RewardKind
from nearid_reward.similarity import Aggregate

from .per_sample_reward import PerSampleReward

logger = logging.getLogger(__name__)

__all__ = ["ServerArguments", "Limits", "RequestError", "RewardService", "build_app", "serve_in_thread",
           "is_loopback", "main"]

PROG = "nearid-reward-server"
#: An oversized body is read and dropped up to this many times --max_request_bytes before the 413 (see build_app).
DRAIN_FACTOR = 4
#: Environment variable read when ``--token`` is not given (a token on the command line is visible in ``ps``).
TOKEN_ENV = "NEARID_REWARD_TOKEN"


def is_loopback(host: str) -> bool:
    """True for addresses that only this machine can reach (127.0.0.0/8, ::1, ``localhost``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve to any interface
        return False


@dataclass
class ServerArguments:
    """The options of ``nearid-reward-server`` (one flag per field)."""

    nearid_model: str = field(metadata={"help": "NearID checkpoint folder (release, head-only or SigLIP) or hub id"})
    nearid_reference_dir: str | None = field(default=None, metadata={
        "help": "folder of the subject's reference photos (the default set); without it every request must send "
                "condition_images for each sample"})
    nearid_negative_dir: str | None = field(default=None, metadata={
        "help": "optional folder of near-identity distractors (reward = s - negative_weight * max similarity)"})
    aggregate: Aggregate = field(default="mean", metadata={"help": "how an image's reference similarities combine"})
    kind: RewardKind = field(default="cosine", metadata={
        "help": "cosine: similarity in [-1, 1]; relative: divided by the reference oracle (needs >= 2 references)"})
    negative_weight: float = field(default=1.0, metadata={"help": "weight of the near-identity penalty"})
    host: str = field(default="127.0.0.1", metadata={
        "help": "address to listen on; anything but loopback needs --token"})
    port: int = field(default=8765, metadata={"help": "TCP port (0: any free port, printed at start)"})
    token: str | None = field(default=None, metadata={
        "help": f"shared secret every request must send as 'Authorization: Bearer <token>' (default: ${TOKEN_ENV})"})
    max_request_bytes: int = field(default=256 * 2**20, metadata={"help": "largest request body accepted, in bytes"})
    max_image_pixels: int = field(default=2048 * 2048, metadata={"help": "largest decoded image, width x height"})
    max_batch: int = field(default=64, metadata={"help": "most images per request"})
    max_references: int = field(default=256, metadata={"help": "most condition images per request, all samples"})
    device: str = field(default="cpu", metadata={"help": "torch device of the encoder, e.g. cpu, cuda or cuda:1"})
    dtype: str = field(default="float32", metadata={"help": "backbone dtype (float32, float16/fp16, bfloat16/bf16)"})
    log_level: str = field(default="info", metadata={"help": "uvicorn log level (debug, info, warning, error)"})

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_image_pixels", "max_batch", "max_references"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.token is None:
            self.token = os.environ.get(TOKEN_ENV) or None
        if self.token is not None and not self.token.strip():
            raise ValueError("--token must not be empty")
        if self.token is None and not is_loopback(self.host):
            raise ValueError(f"--host {self.host} is reachable from other machines: set --token (or ${TOKEN_ENV}), "
                             "or listen on 127.0.0.1")
        if self.negative_weight < 0:
            raise ValueError(f"--negative_weight must be >= 0, got {self.negative_weight}")
        parse_device(self.device, name="--device")
        parse_dtype(self.dtype, name="--dtype")

    def limits(self) -> Limits:
        return Limits(self.max_request_bytes, self.max_image_pixels, self.max_batch, self.max_references)

    def reward_config(self) -> RewardConfig:
        return RewardConfig(aggregate=self.aggregate, kind=self.kind, negative_weight=self.negative_weight,
                            backbone_dtype=self.dtype)


@dataclass(frozen=True)
class Limits:
    """What one request may hold: body bytes, pixels per decoded image, images, condition images."""

    max_request_bytes: int = 256 * 2**20
    max_image_pixels: int = 2048 * 2048
    max_batch: int = 64
    max_references: int = 256


class RequestError(Exception):
    """A refused request: ``status`` (400, 401, 413) and a message naming the field, the limit and the value."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------- decoding
def _decode_image(value: Any, where: str, limits: Limits) -> Image.Image:
    """One base64 image -> an RGB PIL image, checked against the pixel limit."""
    if not isinstance(value, str):
        raise RequestError(400, f"`{where}` must be a base64-encoded PNG string, got {type(value).__name__}")
    if value.startswith("data:") and "," in value[:100]:  # a data URL: data:image/png;base64,....
        value = value.split(",", 1)[1]
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(400, f"`{where}` is not valid base64: {exc}") from None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            pixels = img.width * img.height
            if pixels > limits.max_image_pixels:
                raise RequestError(413, f"`{where}` is {img.width}x{img.height} = {pixels} pixels, over this server's "
                                        f"--max_image_pixels {limits.max_image_pixels}")
            img.load()
            return to_rgb(img, name=where)
    except Image.DecompressionBombError as exc:
        raise RequestError(413, f"`{where}`: {exc} (this server's --max_image_pixels is "
                                f"{limits.max_image_pixels})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        kind = "not an image" if isinstance(exc, UnidentifiedImageError) else "a damaged image"
        raise RequestError(400, f"`{where}` is {kind} ({len(raw)} bytes; PNG expected): {exc}") from None


def _as_tensors(images: list[Image.Image]) -> torch.Tensor | list[torch.Tensor]:
    """RGB images as the float tensors in [0, 1] a trainer would have scored in process: one ``[B, 3, H, W]`` batch
    when the sizes agree, else a list of ``(3, H, W)``. Channels move first while the pixels are still 8-bit (a
    quarter of the bytes to copy), and the batch comes out contiguous (no copy when it is stacked or resized)."""
    arrays = [np.asarray(image, dtype=np.uint8) for image in images]  # [H, W, 3] each
    if len({a.shape for a in arrays}) == 1:
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # [B, 3, H, W] uint8
        return batch.float().div_(255.0)
    return [torch.from_numpy(a.copy()).permute(2, 0, 1).contiguous().float().div_(255.0) for a in arrays]


def _optional_list(payload: dict[str, Any], key: str) -> list[Any] | None:
    value = payload.get(key)
    if value is not None and not isinstance(value, list):
        raise RequestError(400, f"`{key}` must be a list or null, got {type(value).__name__}")
    return value


def parse_request(
    body: bytes, limits: Limits
) -> tuple[torch.Tensor | list[torch.Tensor], list[list[Image.Image] | None] | None]:
    """Decode a ``/compute`` body into B images (a ``[B, 3, H, W]`` tensor, or B ``(3, H, W)`` tensors of different
    sizes) and per-sample references (or None).

    Generated images become float tensors in [0, 1] (scored as the trainer's own tensors would be in process);
    references stay PIL images (scored as reference photos read from files are).

    Raises:
        RequestError: 400 for malformed JSON, wrong types, bad base64 or a non-image; 413 over a limit.
    """
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise RequestError(400, f"the request body must be a JSON object with an `image` list, got "
                                f"{type(payload).__name__}")
    for key in ("video", "condition_videos"):
        if payload.get(key) is not None:
            raise RequestError(400, f"`{key}` is not supported: this reward scores images (send `image`)")
    for key in ("extra", "kwargs"):
        if payload.get(key) is not None and not isinstance(payload[key], dict):
            raise RequestError(400, f"`{key}` must be an object or null, got {type(payload[key]).__name__}")
    images = _optional_list(payload, "image")
    if not images:
        raise RequestError(400, "`image` is required: a non-empty list of base64-encoded PNG images")
    if len(images) > limits.max_batch:
        raise RequestError(413, f"`image` holds {len(images)} images, over this server's --max_batch "
                                f"{limits.max_batch}")
    prompts = _optional_list(payload, "prompt")
    if prompts is not None and len(prompts) != len(images):
        raise RequestError(400, f"`prompt` must have one entry per image ({len(images)}), got {len(prompts)}")
    conditions = _optional_list(payload, "condition_images")
    if conditions is not None:
        if len(conditions) != len(images):
            raise RequestError(400, f"`condition_images` must have one entry per image ({len(images)}), "
                                    f"got {len(conditions)}")
        for i, refs in enumerate(conditions):
            if refs is not None and not isinstance(refs, list):
                raise RequestError(400, f"`condition_images[{i}]` must be a list of base64 strings or null, got "
                                        f"{type(refs).__name__}")
        total = sum(len(refs) for refs in conditions if refs)
        if total > limits.max_references:
            raise RequestError(413, f"`condition_images` holds {total} images, over this server's --max_references "
                                    f"{limits.max_references}")
    decoded = _as_tensors([_decode_image(v, f"image[{i}]", limits) for i, v in enumerate(images)])
    references: list[list[Image.Image] | None] | None = None
    if conditions is not None:
        references = [
            [_decode_image(v, f"condition_images[{i}][{j}]", limits) for j, v in enumerate(refs)] if refs else None
            for i, refs in enumerate(conditions)
        ]
    return decoded, references


# ---------------------------------------------------------------------------------------------- service
class RewardService:
    """What the endpoints do, without HTTP: decode a request and score it under the model lock.

    Args:
        scorer: the :class:`~integrations.per_sample_reward.PerSampleReward` (its shared set may be empty).
        limits: the request :class:`Limits`.
        token: the shared secret requests must carry, or None (loopback only).
    """

    def __init__(self, scorer: PerSampleReward, *, limits: Limits | None = None, token: str | None = None) -> None:
        self.scorer = scorer
        self.limits = limits or Limits()
        self.token = token
        self._lock = threading.Lock()
        self.requests = 0

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        return header is not None and hmac.compare_digest(header.encode(), f"Bearer {self.token}".encode())

    def health(self) -> dict[str, Any]:
        config = self.scorer.config
        return {"status": "ok", "version": __version__, "references": self.scorer.num_references,
                "negatives": 0 if self.scorer.negatives is None else int(self.scorer.negatives.shape[0]),
                "aggregate": config.aggregate, "kind": config.kind, "device": str(self.scorer.device),
                "requests": self.requests, "limits": self.limits.__dict__}

    def compute(self, body: bytes) -> list[float]:
        """Rewards of one ``/compute`` body (runs in a worker thread; raises :class:`RequestError`)."""
        images, references = parse_request(body, self.limits)
        try:
            with self._lock:  # one batch on the model at a time; decoding above runs concurrently
                rewards = self.scorer.score(images, references)
                self.requests += 1
        except ValueError as exc:  # e.g. no references for a sample, kind="relative" with one reference
            raise RequestError(400, str(exc)) from None
        return [float(r) for r in rewards.cpu()]


def build_app(service: RewardService) -> Any:
    """The starlette application: ``GET /health``, ``POST /compute``; every error is JSON ``{"error": ...}``."""
    try:
        from starlette.applications import Starlette
        from starlette.concurrency import run_in_threadpool
        from starlette.exceptions import HTTPException
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route
    except ImportError as exc:
        raise ImportError(f'{PROG} needs starlette and uvicorn: pip install "nearid-reward[server]"') from exc

    def error(status: int, message: str) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def refused(request: Request) -> JSONResponse | None:
        if service.authorized(request.headers.get("authorization")):
            return None
        return error(401, "missing or wrong token: send the header 'Authorization: Bearer <token>'")

    async def read_body(request: Request) -> bytes:
        """The body, or a 413 once it passes the limit. An oversized body is still read (and dropped) up to
        ``DRAIN_FACTOR`` times the limit, so that the client, still sending, gets the JSON error instead of a
        broken connection."""
        limit = service.limits.max_request_bytes
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                chunks.clear()
                if size > DRAIN_FACTOR * limit:
                    break
                continue
            chunks.append(chunk)
        if size > limit:
            declared = request.headers.get("content-length", "")
            value = f"{declared} bytes" if declared.isdigit() else f"over {size} bytes"
            raise RequestError(413, f"the request body is {value}, over this server's --max_request_bytes {limit}")
        return b"".join(chunks)

    async def health(request: Request) -> JSONResponse:
        return refused(request) or JSONResponse(service.health())

    async def compute(request: Request) -> JSONResponse:
        denied = refused(request)
        if denied is not None:
            return denied
        try:
            body = await read_body(request)
            rewards = await run_in_threadpool(service.compute, body)
        except RequestError as exc:
            return error(exc.status, str(exc))
        except Exception as exc:  # a bug or a device error: report it, keep serving
            logger.exception("scoring failed")
            return error(500, f"scoring failed: {type(exc).__name__}: {exc}")
        return JSONResponse({"rewards": rewards})

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        status = getattr(exc, "status_code", 500)
        return error(status, f"{request.method} {request.url.path}: {getattr(exc, 'detail', exc)} "
                             "(endpoints: GET /health, POST /compute)")

    routes = [Route("/health", health, methods=["GET"]), Route("/compute", compute, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


# ---------------------------------------------------------------------------------------------- running
def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)  # connections made before uvicorn starts wait in the backlog instead of being refused
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn_server(app: Any, log_level: str) -> Any:
    try:
        import uvicorn
    except ImportError as exc:
        raise ImportError(f'{PROG} needs uvicorn and starlette: pip install "nearid-reward[server]"') from exc
    config = uvicorn.Config(app, lifespan="off", access_log=False, log_level=log_level, timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


@dataclass
class RunningServer:
    """A server running in a background thread (see :func:`serve_in_thread`)."""

    url: str
    server: Any
    thread: threading.Thread


@contextlib.contextmanager
def serve_in_thread(app: Any, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                    startup_timeout: float = 30.0) -> Iterator[RunningServer]:
    """Serve ``app`` on ``host:port`` (0: a free port) in a thread until the block ends (tests, notebooks)."""
    sock = _bind(host, port)
    server = _uvicorn_server(app, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="nearid-reward-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the reward server did not start within {startup_timeout:.0f} s")
        time.sleep(0.01)
    try:
        yield RunningServer(_url(sock), server, thread)
    finally:
        server.should_exit = True
        thread.join(timeout=startup_timeout)
        sock.close()


def parse_args(argv: Sequence[str] | None = None) -> ServerArguments:
    """The options that ``argv`` (``sys.argv[1:]`` when None) gives ``nearid-reward-server``."""
    (args,) = parse_arguments(
        ServerArguments, argv, prog=PROG,
        description="Serve the NearID identity reward over HTTP (Flow-Factory's remote-reward protocol: GET /health, "
                    "POST /compute) for RL frameworks that run in their own environment.",
    )  # fmt: skip
    return args


@entry_point(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [name for name in ("starlette", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:  # before the model loads
        raise ImportError(f'{PROG} needs {" and ".join(missing)}: pip install "nearid-reward[server]"')
    logging.basicConfig(level=args.log_level.upper(), format=f"{PROG}: %(message)s")
    scorer = PerSampleReward(args.nearid_model, args.nearid_reference_dir, negatives=args.nearid_negative_dir,
                             config=args.reward_config()).to(parse_device(args.device))
    service = RewardService(scorer, limits=args.limits(), token=args.token)
    server = _uvicorn_server(build_app(service), args.log_level)
    sock = _bind(args.host, args.port)
    access = "token required" if args.token else "no token: this machine only"
    print(f"{PROG}: serving {scorer.num_references} reference(s) at {_url(sock)} ({access}); Ctrl-C stops",
          file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
