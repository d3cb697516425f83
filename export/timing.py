"""Latency of a runner: warm up, then time calls with the clock that fits its device.

Per call, the time of `runner(x)` on a batch already on the device: no host-to-device copy, no pre- or
post-processing. Warm-up calls for `warmup_seconds` (at least 2), then timed calls until `min_iters`
calls are done or `min_seconds` have passed, whichever comes first (at least 5 calls). On CPU each call
is timed with `time.perf_counter`; on CUDA with a pair of CUDA events around each call, recorded after
a synchronise.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitfold.export.runners import Runner

MIN_WARMUP_CALLS, MIN_TIMED_CALLS = 2, 5


@dataclass(frozen=True)
class Timing:
    """When to stop warming up and timing one (runner, input)."""

    min_iters: int = 50
    min_seconds: float = 3.0
    warmup_seconds: float = 0.2

    def measure(self, runner: Runner, x: torch.Tensor) -> list[float]:
        """Per-call latencies (ms) of `runner(x)` after warm-up, with the clock that fits its device."""
        self._warm_up(runner, x)
        return (_cuda_times if runner.device.type == "cuda" else _cpu_times)(runner, x, self.more)

    def _warm_up(self, runner: Runner, x: torch.Tensor) -> None:
        started, calls = time.perf_counter(), 0
        while calls < MIN_WARMUP_CALLS or time.perf_counter() - started < self.warmup_seconds:
            runner(x)
            calls += 1
        runner.synchronize()

    def more(self, calls: int, started: float) -> bool:
        """Go on until `min_iters` calls or `min_seconds`, whichever comes first, and at least 5 calls."""
        done = calls >= self.min_iters or time.perf_counter() - started >= self.min_seconds
        return calls < MIN_TIMED_CALLS or not done


def _cpu_times(runner: Runner, x: torch.Tensor, more: Callable[[int, float], bool]) -> list[float]:
    times: list[float] = []
    started = time.perf_counter()
    while more(len(times), started):
        t0 = time.perf_counter()
        runner(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _cuda_times(runner: Runner, x: torch.Tensor, more: Callable[[int, float], bool]) -> list[float]:
    """Each call between two CUDA events on the current stream, the device idle before it; read at the end."""
    pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    stream = torch.cuda.current_stream(runner.device)
    started = time.perf_counter()
    while more(len(pairs), started):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        runner.synchronize()
        start.record(stream)
        runner(x)
        end.record(stream)
        pairs.append((start, end))
    runner.synchronize()
    return [start.elapsed_time(end) for start, end in pairs]


def latency_stats(times_ms: list[float]) -> dict[str, float]:
    """mean and p50/p90/p99 (ms) of per-call latencies."""
    times = np.asarray(times_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    return {"mean_ms": float(times.mean()), "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99)}


def cpu_name() -> str:
    """The CPU model, as /proc/cpuinfo names it (else what `platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on: CPU model, logical CPUs, platform, and the GPU on CUDA."""
    found: dict[str, Any] = {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "platform": platform.platform()}
    if torch.device(device).type == "cuda":
        found["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return found


def interleaved_rounds(
    variants: dict[str, Callable[[], object]], *, warmup: int = 2, iters: int = 3, rounds: int = 5, device: str = "cpu"
) -> dict[str, list[float]]:
    """Per variant, the mean ms per call of each round. Rounds alternate the variants (so drift on a busy
    machine hits all alike): compare them as ratios of medians within one call, with the spread."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            sync()
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) * 1e3 / iters)
    return samples
