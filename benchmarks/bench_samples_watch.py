"""``nearid-samples --watch`` following a growing sample folder: memory and per-file work at 1k against 10k files.

A writer thread grows an sd-scripts ``sample/`` folder (``<name>_<step:06d>_<prompt:02d>_<ts>_<seed>.png``, tiny
16 px images, ``--per_round`` prompts per round, a checkpoint file every 10 rounds) to ``--files`` files, staying at
most ``--ahead`` files ahead of the watcher, while :func:`nearid_reward.trainer_samples.scoring.follow` polls it
with the tiny random NearID. Every poll is timed; figures are medians over the polls while the watcher had scored
about 1k files (500-1500) and about 10k files (the last 1000):

* ``score_ms_per_file``: (poll time - listing time) / files scored in that poll: loading, embedding, metrics, the
  history line, the winner check;
* ``scan_ms_per_poll``: listing the folder and matching checkpoints (grows with the folder: one ``scandir``);
* ``peak_rss_mib``: the process's peak resident memory up to 1k files, and up to 10k files.

Reproduce: ``python benchmarks/bench_samples_watch.py`` (defaults: 10,000 files, 4 per round); ``--files 2000`` for a
quick look. Prints a table and ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nearid_reward import IdentityValidator, NearIDModel  # noqa: E402
from nearid_reward.testing import random_images, save_tiny_nearid  # noqa: E402
from nearid_reward.trainer_samples.scoring import SamplesConfig, SampleScorer, follow  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment_info  # noqa: E402


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--per_round", type=int, default=4)
    parser.add_argument("--ahead", type=int, default=200, help="how far the writer may run ahead of the watcher")
    parser.add_argument("--poll_interval", type=float, default=0.02)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    process = psutil.Process()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = NearIDModel.from_pretrained(save_tiny_nearid(root / "model", format="head"))
        run = root / "run"
        sample = run / "sample"
        sample.mkdir(parents=True)
        validator = IdentityValidator(model, random_images(3, 32, seed=1),
                                      history_path=run / "out" / "identity_history.jsonl")
        scorer = SampleScorer(validator, SamplesConfig("kohya", sample, run, run / "out", copy_winner=True,
                                                       plot=False))
        polls: list[dict[str, float]] = []
        real_poll, real_scan = scorer.poll, scorer._scan
        scan_time = [0.0]

        def timed_scan() -> None:
            start = time.perf_counter()
            try:
                real_scan()
            finally:
                scan_time[0] = time.perf_counter() - start

        def timed_poll(*, finished: bool = False) -> list:
            before = scorer.loaded_files
            start = time.perf_counter()
            rows = real_poll(finished=finished)
            elapsed = time.perf_counter() - start
            polls.append({"scored_total": scorer.loaded_files, "new": scorer.loaded_files - before,
                          "poll_s": elapsed, "scan_s": scan_time[0], "rss": process.memory_info().rss})
            return rows

        scorer._scan = timed_scan  # type: ignore[method-assign]
        scorer.poll = timed_poll  # type: ignore[method-assign]
        done = run / "DONE"
        rounds = args.files // args.per_round

        def writer() -> None:
            try:
                for r in range(rounds):
                    step = r * 10
                    for p in range(args.per_round):
                        (sample / f"bench_{step:06d}_{p:02d}_20260102030405_{p}.png").write_bytes(_png(r * 97 + p))
                    if r % 10 == 5:
                        (run / f"bench-step{step:08d}.safetensors").write_bytes(
                            b"\x02\x00\x00\x00\x00\x00\x00\x00{}")  # an empty but whole safetensors file
                    while (r + 1) * args.per_round - scorer.loaded_files > args.ahead:
                        time.sleep(0.005)
            finally:
                done.touch()

        thread = threading.Thread(target=writer)
        started = time.perf_counter()
        thread.start()
        follow(scorer, poll_interval=args.poll_interval, until_file=done)
        thread.join()
        total = time.perf_counter() - started

    def window(lo: int, hi: int) -> list[dict[str, float]]:
        return [p for p in polls if lo <= p["scored_total"] <= hi and p["new"] > 0]

    small, large = window(500, 1500), window(args.files - 1000, args.files)
    figures = {
        "files": args.files, "rounds": rounds, "polls": len(polls), "total_s": round(total, 1),
        "score_ms_per_file_1k": statistics.median(1000 * (p["poll_s"] - p["scan_s"]) / p["new"] for p in small),
        "score_ms_per_file_10k": statistics.median(1000 * (p["poll_s"] - p["scan_s"]) / p["new"] for p in large),
        "scan_ms_per_poll_1k": statistics.median(1000 * p["scan_s"] for p in small),
        "scan_ms_per_poll_10k": statistics.median(1000 * p["scan_s"] for p in large),
        "peak_rss_mib_1k": max(p["rss"] for p in polls if p["scored_total"] <= 1500) / 2**20,
        "peak_rss_mib_10k": max(p["rss"] for p in polls) / 2**20,
        "files_scored": scorer.loaded_files,
    }
    figures["score_ratio_10k_over_1k"] = figures["score_ms_per_file_10k"] / figures["score_ms_per_file_1k"]
    figures["rss_growth_mib"] = figures["peak_rss_mib_10k"] - figures["peak_rss_mib_1k"]
    print(json.dumps(environment_info("cpu")))
    for key, value in figures.items():
        print(f"{key:>26}: {value:.3f}" if isinstance(value, float) else f"{key:>26}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
