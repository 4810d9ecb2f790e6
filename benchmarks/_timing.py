"""The one timer every benchmark uses (STYLE.md practice 12).

Warm-up calls are excluded; the repeat count comes from a target duration; the median is
reported. On CUDA, per-iteration events; on CPU, perf_counter with the thread count recorded.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median_s: float
    min_s: float
    repeats: int
    threads: int
    device: str

    def __str__(self) -> str:
        return f"{self.median_s * 1e3:.3f} ms (min {self.min_s * 1e3:.3f}, n={self.repeats}, {self.device}, threads={self.threads})"


def bench(fn: Callable[[], object], *, device: str = "cpu", warmup: int = 2,
          target_s: float = 1.0, min_repeats: int = 3, max_repeats: int = 1000) -> Timing:
    """Median wall time of fn() after warm-up; fn is called repeatedly with no arguments."""
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    # one timed probe decides the repeat count
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    probe = max(time.perf_counter() - t0, 1e-7)
    repeats = int(min(max_repeats, max(min_repeats, target_s / probe)))
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), min(times), repeats, torch.get_num_threads(), device)


def read_bandwidth_gbs(device: str = "cpu", nbytes: int = 512 << 20) -> float:
    """Plain streaming-read bandwidth of this machine, measured now (a large sum)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    t = bench(lambda: x.sum(), device=device, target_s=0.5)
    return nbytes / t.median_s / 1e9
