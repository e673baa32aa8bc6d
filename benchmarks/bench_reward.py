"""Identity reward cost: forward+backward time and memory against a plain (no-grad) forward.

Measured side by side in one run, on a randomly initialised NearID model built from a config (no download):

* ``plain forward``: ``model.embed(images)`` under ``torch.no_grad`` (what scoring/validation costs);
* ``reward fwd+bwd``: ``IdentityReward(images).sum().backward()`` with gradients w.r.t. the images;
* ``reward fwd+bwd + ckpt``: the same with gradient checkpointing of the encoder layers.

Time: median wall time over ``--repeats`` round-robin repeats (each repeat runs every variant once) after
``--warmup`` calls; the ratio to the plain forward is the median of the per-repeat ratios, which stays meaningful
on a shared machine whose speed drifts. Memory, two views:

* ``saved MB``: bytes of the tensors autograd keeps for the backward pass during the forward (counted with
  ``torch.autograd.graph.saved_tensors_hooks``; with checkpointing, what the checkpoints keep). Exact and
  independent of the allocator; 0 for the no-grad forward.
* ``peak MB``: on CUDA, ``torch.cuda.max_memory_allocated`` above the memory held before the call; on CPU, the peak
  growth of the resident set size of a fresh subprocess that runs only that variant (sampled every 0.5 ms after
  the freed heap was returned to the OS; coarse: it includes allocator behaviour and temporary buffers).

Reproduce: ``python benchmarks/bench_reward.py`` (CPU defaults: a SigLIP-shaped backbone with 6 layers of width
384 at 224 px, batch 4). ``--device cuda --layers 27 --width 1152 --image-size 384`` gives the released shape.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nearid_reward import IdentityReward, NearIDModel  # noqa: E402
from nearid_reward.testing import random_images, save_tiny_nearid  # noqa: E402

VARIANTS = ("plain forward", "reward fwd+bwd", "reward fwd+bwd + ckpt")


def build(args: argparse.Namespace, folder: Path) -> Path:
    heads = max(1, args.width // 64)
    return save_tiny_nearid(
        folder, format="head", hidden_size=args.width, intermediate_size=4 * args.width, num_hidden_layers=args.layers,
        num_attention_heads=heads, image_size=args.image_size, patch_size=args.patch_size,
    )  # fmt: skip


def make(args: argparse.Namespace, path: Path, variant: str) -> tuple[IdentityReward, torch.Tensor]:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = NearIDModel.from_pretrained(path, torch_dtype=dtype, head_dtype=torch.float32).to(args.device)
    refs = random_images(4, args.input_size, seed=1).to(args.device)
    reward = IdentityReward(model, refs, gradient_checkpointing=variant.endswith("ckpt"))
    images = random_images(args.batch, args.input_size, seed=2).to(args.device)
    return reward, images


def step(reward: IdentityReward, images: torch.Tensor, variant: str) -> None:
    if variant == "plain forward":
        with torch.no_grad():
            reward.model.embed(images, check_inputs=False)
        return
    x = images.detach().clone().requires_grad_()
    reward(x).sum().backward()


def saved_bytes(reward: IdentityReward, images: torch.Tensor, variant: str) -> int:
    if variant == "plain forward":
        return 0
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = images.detach().clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = reward(x).sum()
    out.backward()
    return sum(seen.values())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_variants(args: argparse.Namespace, path: Path) -> dict[str, dict[str, float]]:
    """Round-robin timing: each repeat runs every variant once, so slow phases of a shared machine hit all alike."""
    setups = {v: make(args, path, v) for v in VARIANTS}
    for variant, (reward, images) in setups.items():
        for _ in range(args.warmup):
            step(reward, images, variant)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeats):
        for variant, (reward, images) in setups.items():
            sync(args.device)
            start = time.perf_counter()
            step(reward, images, variant)
            sync(args.device)
            times[variant].append(time.perf_counter() - start)
    results = {}
    for variant, (reward, images) in setups.items():
        plain = times["plain forward"]
        ratios = [t / p for t, p in zip(times[variant], plain)]  # paired: same repeat, same machine state
        results[variant] = {
            "median_ms": 1000 * statistics.median(times[variant]),
            "paired_ratio": statistics.median(ratios),
            "saved_mb": saved_bytes(reward, images, variant) / 2**20,
        }
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step(reward, images, variant)
            sync(args.device)
            results[variant]["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return results


def peak_rss_subprocess(args: argparse.Namespace, path: Path, variant: str) -> float:
    """Peak RSS growth (MB) while a fresh process runs the variant twice (see ``rss_child``)."""
    argv = [sys.executable, __file__, "--rss-child", variant, "--model-path", str(path), *args.passthrough]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["rss_growth_mb"])


def _current_rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_child(args: argparse.Namespace) -> None:
    """Load and warm up, return freed heap to the OS (glibc ``malloc_trim``), then sample the resident set size
    every 0.5 ms from a thread while the variant runs twice; report the peak growth over the baseline."""
    import ctypes
    import threading

    reward, images = make(args, Path(args.model_path), args.rss_child)
    step(reward, images, args.rss_child)  # warm-up (lazy initialisations)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _current_rss()
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _current_rss())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(2):
        step(reward, images, args.rss_child)
    done.set()
    sampler.join()
    print(json.dumps({"rss_growth_mb": (peak - base) / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--input-size", type=int, default=256, help="generated image size before resizing")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.passthrough = [
        "--device", args.device, "--dtype", args.dtype, "--input-size", str(args.input_size),
        "--batch", str(args.batch),
    ]  # fmt: skip
    if args.rss_child:
        rss_child(args)
        return
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = build(args, Path(tmp) / "nearid")
        threads = torch.get_num_threads()
        tokens = (args.image_size // args.patch_size) ** 2
        print(f"torch {torch.__version__}, device {args.device}, threads {threads}, dtype {args.dtype}")
        print(f"backbone: {args.layers} layers x width {args.width}, {args.image_size} px / patch {args.patch_size} "
              f"({tokens} tokens); batch {args.batch} images of {args.input_size} px; "
              f"median of {args.repeats} round-robin repeats after {args.warmup} warm-up calls")
        rows = time_variants(args, path)
        if not args.device.startswith("cuda"):
            for variant in VARIANTS:
                rows[variant]["peak_mb"] = peak_rss_subprocess(args, path, variant)
        kind = "CUDA allocated" if args.device.startswith("cuda") else "RSS growth"
        print(f"\n| variant | median ms | x plain forward (paired) | saved for backward MB | peak MB ({kind}) |")
        print("|---|---|---|---|---|")
        for variant, r in rows.items():
            print(f"| {variant} | {r['median_ms']:.1f} | {r['paired_ratio']:.2f} | {r['saved_mb']:.1f} | "
                  f"{r['peak_mb']:.1f} |")

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
