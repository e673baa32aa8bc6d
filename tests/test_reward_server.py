"""``nearid-reward-server`` on 127.0.0.1 (a free port) with the tiny NearID, and its Flow-GRPO-shaped client.

Rewards over HTTP are compared with ``IdentityReward`` in this process: exactly (to float tolerance) on the images the
PNGs carry (8-bit), and within PNG rounding on the float originals.
"""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import io
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from integrations import reward_server
from integrations.per_sample_reward import PerSampleReward
from integrations.reward_client import encode_images, nearid_remote_scorer, png_bytes
from integrations.reward_server import Limits, RequestError, RewardService, build_app, is_loopback, serve_in_thread
from nearid_reward import IdentityReward, NearIDModel, RewardConfig
from nearid_reward.testing import random_images, write_random_images

ROOT = Path(__file__).resolve().parents[1]
LIMITS = Limits(max_request_bytes=2_000_000, max_image_pixels=128 * 128, max_batch=8, max_references=8)
TOKEN = "s3cret-token"


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def refs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("server_refs")
    write_random_images(folder, 3, 48, seed=21)
    return folder


@pytest.fixture(scope="module")
def other_refs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_random_images(tmp_path_factory.mktemp("server_other_refs"), 2, 48, seed=22)


@pytest.fixture(scope="module")
def model(tiny_head: Path) -> NearIDModel:
    return NearIDModel.from_pretrained(tiny_head)


@pytest.fixture(scope="module")
def server(tiny_head: Path, refs_dir: Path) -> Iterator[str]:
    service = RewardService(PerSampleReward(str(tiny_head), refs_dir), limits=LIMITS)
    with serve_in_thread(build_app(service)) as running:
        yield running.url


@pytest.fixture(scope="module")
def secured(tiny_head: Path, refs_dir: Path) -> Iterator[str]:
    service = RewardService(PerSampleReward(str(tiny_head), refs_dir), limits=LIMITS, token=TOKEN)
    with serve_in_thread(build_app(service)) as running:
        yield running.url


def _request(url: str, path: str, body: bytes | None = None, *, method: str | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url + path, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def _post(url: str, payload: Any, **kw: Any) -> tuple[int, dict[str, Any]]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return _request(url, "/compute", body, method="POST", **kw)


def _healthy(url: str, headers: dict[str, str] | None = None) -> bool:
    status, body = _request(url, "/health", headers=headers)
    return status == 200 and body["status"] == "ok"


def _quantised(images: torch.Tensor) -> torch.Tensor:
    """What a PNG of ``images`` holds, back in [0, 1]."""
    return images.clamp(0, 1).mul(255).round().div(255)


def _png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# ---------------------------------------------------------------------------------------------- server
def test_health(server: str) -> None:
    status, body = _request(server, "/health")
    assert status == 200 and body["status"] == "ok"
    assert body["references"] == 3 and body["aggregate"] == "mean" and body["limits"]["max_batch"] == 8


def test_compute_equals_the_in_process_reward_within_png_rounding(server: str, model: NearIDModel,
                                                                 refs_dir: Path) -> None:
    images = random_images(4, 64, seed=31)
    payload = {"prompt": ["a photo of sks dog"] * 4, "image": encode_images(images), "condition_images": None,
               "extra": None}
    status, body = _post(server, payload)
    assert status == 200, body
    rewards = torch.tensor(body["rewards"])
    reference = IdentityReward(model, refs_dir)
    torch.testing.assert_close(rewards, reference(_quantised(images)), rtol=0, atol=1e-5)  # same pixels
    torch.testing.assert_close(rewards, reference(images), rtol=0, atol=5e-3)  # PNG rounding only
    # Flow-Factory's own client: extra arguments under `kwargs`, the unused fields as null
    flow_factory_shape = {"prompt": payload["prompt"], "image": payload["image"], "video": None,
                          "condition_images": None, "condition_videos": None, "kwargs": {"metadata": "{}"}}
    status, body = _post(server, flow_factory_shape)
    assert status == 200 and body["rewards"] == rewards.tolist()


def test_per_sample_condition_images(server: str, model: NearIDModel, refs_dir: Path, other_refs: list[Path]) -> None:
    images = random_images(2, 64, seed=32)
    own = [base64.b64encode(p.read_bytes()).decode() for p in other_refs]
    status, body = _post(server, {"prompt": ["p", "p"], "image": encode_images(images),
                                  "condition_images": [own, None]})
    assert status == 200, body
    pixels = _quantised(images)
    expected = torch.cat([IdentityReward(model, other_refs)(pixels[:1]), IdentityReward(model, refs_dir)(pixels[1:])])
    torch.testing.assert_close(torch.tensor(body["rewards"]), expected, rtol=0, atol=1e-5)


def test_two_concurrent_requests_both_succeed(server: str, model: NearIDModel, refs_dir: Path) -> None:
    batches = [random_images(3, 64, seed=33), random_images(5, 96, seed=34)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(_post, server, {"image": encode_images(b)}) for b in batches]
        replies = [f.result(timeout=120) for f in futures]
    reference = IdentityReward(model, refs_dir)
    for (status, body), batch in zip(replies, batches):
        assert status == 200, body
        torch.testing.assert_close(torch.tensor(body["rewards"]), reference(_quantised(batch)), rtol=0, atol=1e-5)


def test_health_answers_while_a_batch_is_being_scored(tiny_head: Path, refs_dir: Path) -> None:
    """Scoring runs in a worker thread: with the model held by one request, /health still answers and a second
    request waits for the lock instead of failing (on the event loop, /health would hang until the release)."""
    scorer = PerSampleReward(str(tiny_head), refs_dir)
    entered, release = threading.Event(), threading.Event()
    score = scorer.score

    def held(*args: Any, **kwargs: Any) -> torch.Tensor:
        entered.set()
        assert release.wait(timeout=120)
        return score(*args, **kwargs)

    scorer.score = held  # type: ignore[method-assign]
    payload = {"image": [_png(32, 32)]}
    with serve_in_thread(build_app(RewardService(scorer, limits=LIMITS))) as running, \
            concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(_post, running.url, payload)
        assert entered.wait(timeout=120)
        second = pool.submit(_post, running.url, payload)
        assert _healthy(running.url) and not first.done()
        release.set()
        assert first.result(timeout=120)[0] == 200 and second.result(timeout=120)[0] == 200


MALFORMED: list[tuple[str, Any, str]] = [
    ("not JSON", b"{not json", r"not valid JSON"),
    ("not an object", b"[1, 2]", r"must be a JSON object with an `image` list, got list"),
    ("image not a list", {"image": "abc"}, r"`image` must be a list or null, got str"),
    ("no image", {"prompt": ["p"]}, r"`image` is required"),
    ("image not a string", {"image": [5]}, r"`image\[0\]` must be a base64-encoded PNG string, got int"),
    ("bad base64", {"image": ["@@@@"]}, r"`image\[0\]` is not valid base64"),
    ("not an image", {"image": [base64.b64encode(b"hello, world").decode()]}, r"`image\[0\]` is not an image"),
    ("prompt length", {"image": ["PNG"], "prompt": ["a", "b"]}, r"`prompt` must have one entry per image \(1\)"),
    ("conditions type", {"image": ["PNG"], "condition_images": "x"}, r"`condition_images` must be a list or null"),
    ("condition entry", {"image": ["PNG"], "condition_images": [5]}, r"`condition_images\[0\]` must be a list"),
    ("condition length", {"image": ["PNG"], "condition_images": [None, None]}, r"one entry per image \(1\), got 2"),
    ("bad reference", {"image": ["PNG"], "condition_images": [["%%"]]}, r"`condition_images\[0\]\[0\]` is not valid"),
    ("video", {"image": ["PNG"], "video": [["PNG"]]}, r"`video` is not supported"),
    ("extra type", {"image": ["PNG"], "extra": 3}, r"`extra` must be an object or null, got int"),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_requests_get_a_json_error_naming_the_field(server: str, case: tuple[str, Any, str]) -> None:
    _, payload, message = case
    if isinstance(payload, dict):  # "PNG" stands for a valid image
        payload = json.loads(json.dumps(payload).replace('"PNG"', json.dumps(_png(16, 16))))
    status, body = _post(server, payload)
    assert status == 400 and list(body) == ["error"]
    assert re.search(message, body["error"]), body["error"]
    assert _healthy(server)


def test_damaged_images_and_unknown_routes_get_json_errors(server: str) -> None:
    raw = base64.b64decode(_png(64, 64))
    status, body = _post(server, {"image": [base64.b64encode(raw[: len(raw) // 2]).decode()]})
    assert status == 400 and "`image[0]` is a damaged image" in body["error"]
    status, body = _request(server, "/compute")  # GET
    assert status == 405 and "POST /compute" in body["error"]
    status, body = _request(server, "/score", b"{}", method="POST")
    assert status == 404 and "GET /health" in body["error"]
    assert _healthy(server)


def test_limits_are_refused_naming_the_limit_and_the_value(server: str) -> None:
    status, body = _post(server, {"image": ["A" * 2_100_000]})
    assert status == 413 and "is 2100015 bytes, over this server's --max_request_bytes 2000000" in body["error"]
    status, body = _post(server, {"image": [_png(200, 100)]})
    assert status == 413 and "`image[0]` is 200x100 = 20000 pixels, over this server's --max_image_pixels 16384" \
        in body["error"]
    status, body = _post(server, {"image": [_png(8, 8)] * 9})
    assert status == 413 and "`image` holds 9 images, over this server's --max_batch 8" in body["error"]
    status, body = _post(server, {"image": [_png(8, 8)] * 2, "condition_images": [[_png(8, 8)] * 5] * 2})
    assert status == 413 and "holds 10 images, over this server's --max_references 8" in body["error"]
    # a chunked body (no Content-Length) is cut off at the limit too
    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("POST", "/compute", body=iter([b"x" * 1_000_000] * 3), encode_chunked=True)
        reply = connection.getresponse()
        assert reply.status == 413 and "--max_request_bytes 2000000" in json.loads(reply.read())["error"]
    finally:
        connection.close()
    assert _healthy(server)


def test_with_a_token_every_request_must_carry_it(secured: str) -> None:
    payload = {"image": [_png(32, 32)]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for status, body in (_request(secured, "/health", headers=headers), _post(secured, payload, headers=headers)):
            assert status == 401 and "Authorization: Bearer <token>" in body["error"]
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert _healthy(secured, good)
    status, body = _post(secured, payload, headers=good)
    assert status == 200 and len(body["rewards"]) == 1


def test_an_unexpected_scoring_error_is_a_json_500_and_the_server_keeps_serving(
        tiny_head: Path, refs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scorer = PerSampleReward(str(tiny_head), refs_dir)
    service = RewardService(scorer, limits=LIMITS)
    with serve_in_thread(build_app(service)) as running:
        payload = {"image": [_png(32, 32)]}
        with monkeypatch.context() as patch:
            patch.setattr(scorer, "score", lambda *a: (_ for _ in ()).throw(RuntimeError("device lost")))
            status, body = _post(running.url, payload)
        assert status == 500 and body == {"error": "scoring failed: RuntimeError: device lost"}
        assert _healthy(running.url)
        status, body = _post(running.url, payload)  # the lock was released: the next batch is scored
        assert status == 200 and len(body["rewards"]) == 1


@pytest.mark.parametrize("shared", [True, False])
def test_per_sample_rewards_follow_the_configured_pooling(model: NearIDModel, shared: bool) -> None:
    config = RewardConfig(pooling="mean")
    images, own = random_images(2, 64, seed=51), [random_images(2, 48, seed=52), random_images(3, 48, seed=53)]
    scorer = PerSampleReward(model, random_images(3, 48, seed=54) if shared else None, config=config)
    expected = torch.cat([IdentityReward(model, refs, config=config)(images[i : i + 1]) for i, refs in enumerate(own)])
    torch.testing.assert_close(scorer.score(images, own), expected, rtol=0, atol=1e-5)


def test_scoring_errors_become_400_without_a_reference_set(tiny_head: Path) -> None:
    service = RewardService(PerSampleReward(str(tiny_head), None), limits=LIMITS)
    body = json.dumps({"image": [_png(32, 32)]}).encode()
    with pytest.raises(RequestError, match=r"no references for sample\(s\) \[0\]") as raised:
        service.compute(body)
    assert raised.value.status == 400
    with_own = json.dumps({"image": [_png(32, 32)], "condition_images": [[_png(40, 40)]]}).encode()
    assert len(service.compute(with_own)) == 1


def test_non_loopback_addresses_need_a_token(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv(reward_server.TOKEN_ENV, raising=False)
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.org"))
    with pytest.raises(SystemExit) as raised:
        reward_server.main(["--nearid_model", "m", "--host", "0.0.0.0"])
    assert str(raised.value).splitlines()[0] == (
        "nearid-reward-server: --host 0.0.0.0 is reachable from other machines: set --token (or "
        "$NEARID_REWARD_TOKEN), or listen on 127.0.0.1")
    assert reward_server.parse_args(["--nearid_model", "m", "--host", "0.0.0.0", "--token", "t"]).token == "t"
    monkeypatch.setenv(reward_server.TOKEN_ENV, "from-env")
    assert reward_server.parse_args(["--nearid_model", "m", "--host", "0.0.0.0"]).token == "from-env"
    with pytest.raises(ValueError, match="--max_batch must be >= 1, got 0"):
        reward_server.parse_args(["--nearid_model", "m", "--max_batch", "0"])


def test_the_console_script_serves_until_interrupted(tiny_head: Path, refs_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop(reward_server.TOKEN_ENV, None)
    process = subprocess.Popen(
        [sys.executable, "-m", "integrations.reward_server", "--nearid_model", str(tiny_head),
         "--nearid_reference_dir", str(refs_dir), "--port", "0", "--log_level", "warning"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "serving" not in line and time.monotonic() < deadline and process.poll() is None:
            line = process.stderr.readline()  # type: ignore[union-attr]
        assert "serving 3 reference(s) at http://127.0.0.1:" in line, line
        url = line.split(" at ")[1].split(" ")[0]
        assert _healthy(url)
        process.send_signal(signal.SIGINT)  # uvicorn shuts down, then the command ends as every Ctrl-C does
        assert process.wait(timeout=60) == 130
        assert process.stderr.read().strip().endswith("nearid-reward-server: interrupted")  # type: ignore[union-attr]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        process.stderr.close()  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------- client
def test_the_client_in_an_executor_thread_matches_in_process(server: str, model: NearIDModel, refs_dir: Path,
                                                             other_refs: list[Path]) -> None:
    score = nearid_remote_scorer(server)
    images = random_images(4, 64, seed=41)  # what the pipeline returns: [B, 3, H, W] in [0, 1]
    metadata = [{}, {"reference": [str(p) for p in other_refs]}, {"reference": None}, {}]
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as executor:  # as Flow-GRPO calls its scorers
        scores, info = executor.submit(score, images, ["p"] * 4, metadata).result(timeout=120)
    assert info == {} and len(scores) == 4 and all(isinstance(s, float) for s in scores)
    pixels = _quantised(images)
    shared = IdentityReward(model, refs_dir)(pixels)
    own = IdentityReward(model, other_refs)(pixels[1:2])
    torch.testing.assert_close(torch.tensor(scores), torch.cat([shared[:1], own, shared[2:]]), rtol=0, atol=1e-5)
    # the other image forms give the same scores
    uint8 = (pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    for other in (uint8, [Image.fromarray(a) for a in uint8], images.numpy()):
        again, _ = score(other, ["p"] * 4, metadata)
        assert again == pytest.approx(scores, abs=1e-6)


def test_the_client_never_raises(secured: str, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{probe.getsockname()[1]}"
    images = random_images(3, 32, seed=42)
    with caplog.at_level(logging.WARNING, logger="integrations.reward_client"):
        with concurrent.futures.ThreadPoolExecutor() as executor:
            result = executor.submit(nearid_remote_scorer(down, timeout=10), images, ["p"] * 3, None).result(60)
        assert result == ([0.0, 0.0, 0.0], {})
        scores, _ = nearid_remote_scorer(down, timeout=10, fallback=float("nan"))(images, ["p"] * 3, None)
        assert len(scores) == 3 and all(math.isnan(s) for s in scores)
        assert nearid_remote_scorer(secured)(images, ["p"] * 3, None) == ([0.0] * 3, {})  # no token: HTTP 401
        assert nearid_remote_scorer(secured, "wrong")(None, ["p", "q"], None) == ([0.0] * 2, {})  # bad images
    assert "Connection refused" in caplog.text or "URLError" in caplog.text
    assert "HTTP 401" in caplog.text and "Authorization: Bearer" in caplog.text
    scores, _ = nearid_remote_scorer(secured, TOKEN)(images, ["p"] * 3, None)
    assert len(scores) == 3 and scores != [0.0] * 3


@pytest.mark.parametrize("reply", [b'{"rewards": [0.5, 0.5]}', b'{"rewards": [0.5, 0.5, 0.5, 0.5]}', b"<html>",
                                   b'{"error": "x"}'])
def test_the_client_falls_back_on_a_malformed_reply(reply: bytes, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A reply with the wrong number of rewards, or no rewards at all, is a failure: the fallback, never a raise."""
    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout: io.BytesIO(reply))
    with caplog.at_level(logging.WARNING, logger="integrations.reward_client"):
        result = nearid_remote_scorer("http://127.0.0.1:1")(random_images(3, 32, seed=43), ["p"] * 3, None)
    assert result == ([0.0, 0.0, 0.0], {})
    assert "returning 0.0 for 3 sample(s)" in caplog.text


@pytest.mark.parametrize("level", [0, 6])
def test_the_clients_png_writer_round_trips_through_pillow(level: int) -> None:
    array = np.random.default_rng(level).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)  # odd sizes, noise
    with Image.open(io.BytesIO(png_bytes(array, level))) as image:
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (7, 5)
        assert np.array_equal(np.asarray(image), array)


def test_the_client_imports_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "from integrations.reward_client import nearid_remote_scorer, encode_images\n"
            "import numpy as np\n"
            "print(len(encode_images(np.zeros((2, 8, 8, 3), np.uint8))))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and out.stdout.strip() == "2", out.stderr
