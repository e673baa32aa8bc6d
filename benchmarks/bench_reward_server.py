"""Reward server cost: ``/compute`` through the Flow-GRPO-shaped client against scoring in process.

Measured side by side in one run, on randomly initialised NearID models built from configs (no download), with a
batch of ``--batch`` images of ``--input-size`` px (default 16 x 512 x 512, as a trainer's decoded samples):

* ``in process``: ``IdentityReward(images)`` under ``torch.no_grad`` (what a trainer sharing our environment pays);
* ``server``: ``nearid_remote_scorer(url)(images, prompts, metadata)``: PNG + base64 + JSON in the client, HTTP on
  127.0.0.1, decoding in a server worker thread, the same scoring, the JSON reply. The server runs in this process
  (uvicorn in a thread), so both variants share the same cores.

The terms of the overhead are timed apart on the same batch: ``client encode``
(``request_body``: 8-bit pixels, PNG, base64, JSON) and ``server decode`` (``parse_request``: JSON, base64, PNG,
float tensors); the rest is HTTP and the reply.

Encoders (``--encoders``; default ``tiny small``): ``tiny`` (the test model: SigLIP-shaped, 2 layers of width 32 at
32 px; scoring costs almost nothing, so its ratio is the protocol's cost alone), ``small`` (6 layers of width 384 at
224 px, as ``bench_reward.py``'s CPU default) and ``base`` (12 layers of width 768 at 224 px, the size of the smallest
SigLIP). The released encoder (27 layers of width 1152 at 384 px) costs far more than ``base``, so its ratio is lower
still: the overhead per batch does not depend on the encoder.

Time: medians over ``--repeats`` round-robin repeats after ``--warmup``; the overhead is the median of the per-repeat
ratios ``server / in process - 1`` (paired, so a shared machine's drift hits both alike).

Reproduce: ``python benchmarks/bench_reward_server.py`` (about a minute on 2 CPU cores; ``--encoders base``: minutes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import environment  # noqa: E402

from integrations.per_sample_reward import PerSampleReward  # noqa: E402
from integrations.reward_client import nearid_remote_scorer, request_body  # noqa: E402
from integrations.reward_server import Limits, RewardService, build_app, parse_request, serve_in_thread  # noqa: E402
from nearid_reward import IdentityReward, NearIDModel  # noqa: E402
from nearid_reward.testing import random_images, save_tiny_nearid  # noqa: E402

ENCODERS = {
    "tiny": {},
    "small": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6, image_size=224,
                  patch_size=16),
    "base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
                 patch_size=16),
}


def measure(name: str, folder: Path, args: argparse.Namespace) -> dict[str, float]:
    path = save_tiny_nearid(folder / name, format="head", **ENCODERS[name])
    references = random_images(4, args.input_size, seed=1)
    reward = IdentityReward(NearIDModel.from_pretrained(path), references)
    service = RewardService(PerSampleReward(str(path), references), limits=Limits(max_request_bytes=256 * 2**20,
                                                                                    max_image_pixels=4096 * 4096))
    images = random_images(args.batch, args.input_size, seed=2)
    prompts = ["a photo of sks dog"] * args.batch

    def in_process() -> list[float]:
        with torch.no_grad():
            return reward(images).tolist()

    def encode() -> bytes:
        return request_body(images, prompts, None, compress_level=args.compress_level)

    body = encode()
    times: dict[str, list[float]] = {k: [] for k in ("in process", "server", "client encode", "server decode")}
    with serve_in_thread(build_app(service)) as running:
        score = nearid_remote_scorer(running.url, compress_level=args.compress_level)
        variants = {"in process": in_process, "server": lambda: score(images, prompts, None)[0],
                    "client encode": encode, "server decode": lambda: parse_request(body, service.limits)}
        remote = score(images, prompts, None)[0]
        assert max(abs(a - b) for a, b in zip(remote, in_process())) < 5e-3, "the server disagrees with in-process"
        for _ in range(args.warmup):
            for fn in variants.values():
                fn()
        for _ in range(args.repeats):
            for key, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    overhead = [s / p - 1 for s, p in zip(times["server"], times["in process"])]
    result = {f"{k} ms": 1000 * statistics.median(v) for k, v in times.items()}
    result["overhead %"] = 100 * statistics.median(overhead)
    result["body MB"] = len(body) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--input-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--compress-level", type=int, default=0, help="PNG compression level of the client (0-9)")
    parser.add_argument("--encoders", nargs="+", default=["tiny", "small"], choices=list(ENCODERS))
    args = parser.parse_args()
    print(environment())
    print(f"batch {args.batch} x {args.input_size}x{args.input_size} px, PNG compress_level {args.compress_level}, "
          f"{args.repeats} repeats")
    with tempfile.TemporaryDirectory() as tmp:
        rows = {name: measure(name, Path(tmp), args) for name in args.encoders}
    keys = list(next(iter(rows.values())))
    print(f"{'encoder':<8} " + " ".join(f"{k:>16}" for k in keys))
    for name, row in rows.items():
        print(f"{name:<8} " + " ".join(f"{row[k]:>16.1f}" for k in keys))
    print(json.dumps({"bench_reward_server": rows}))


if __name__ == "__main__":
    main()
