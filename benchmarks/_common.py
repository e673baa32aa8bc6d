"""Helpers shared by the benchmark scripts: medians over repeats, peak memory of a call, environment line."""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch


def median_time(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs (after ``warmup`` runs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _RssSampler:
    def __init__(self, interval: float = 0.002) -> None:
        import psutil

        self._proc = psutil.Process(os.getpid())
        self._interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> _RssSampler:
        self.base = self._proc.memory_info().rss
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def peak_memory_mib(fn: Callable[[], Any]) -> tuple[float, str]:
    """Peak memory of one call of ``fn``: CUDA allocator peak on GPU, else sampled RSS growth (approximate)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20, "CUDA peak allocated above baseline"
    import gc

    gc.collect()
    with _RssSampler() as sampler:
        fn()
    return (sampler.peak - sampler.base) / 2**20, "sampled RSS growth"


def saved_for_backward_mib(fn: Callable[[], Any]) -> float:
    """MiB of distinct tensor storages autograd keeps for the backward pass while ``fn()`` runs its forward.

    Counted with ``torch.autograd.graph.saved_tensors_hooks``: exact, independent of the allocator and of other
    processes; what activation memory (and gradient checkpointing's saving) is about.
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values()) / 2**20


def environment_info(device: torch.device | str | None = None) -> dict[str, str]:
    """Date, device and library versions of this run, for benchmark reports."""
    import transformers

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("diffusers", "peft", "accelerate", "safetensors"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = "not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"
        info["cuda"] = str(torch.version.cuda)
    else:
        info["device"] = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return info


def environment() -> str:
    """One line: date, device, torch (threads), transformers, python."""
    info = environment_info()
    return (f"{info['date']} | {info['device']} | torch {info['torch']} threads={torch.get_num_threads()} | "
            f"transformers {info['transformers']} | python {info['python']}")
