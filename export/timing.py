"""Latency of runners: warm up, then time calls in rounds that interleave the runners, with the clock that
fits their device.

Per call, the time of `runner(x)` on a batch already on the device: no host-to-device copy, no pre- or
post-processing. Each runner is warmed up for `warmup_seconds` (at least 2 calls); then `rounds` rounds,
in each of which every runner in turn makes its share of the calls: at least `min_iters / rounds` calls
*and* `min_seconds / rounds` seconds, after `round_warmup` untimed calls. So in all at least `min_iters` calls
and `min_seconds` seconds per runner, and drift on a busy machine hits every runner alike. The untimed
calls at the start of each round absorb what the switch from the previous runner costs the first call
(its thread pool waking up, its weights back into the caches), which is not the runner's latency. Python's
cyclic garbage collector is paused while the runners warm up and the rounds run (after one collection), as
`timeit` does: a full
collection walks the whole process's heap, and in a bench process that holds torch, timm and every
backend it took about 0.1 s, landing on whichever call happened to allocate at that moment (seven of them
in one demo bench on a 2-core VM, 2026-12-04). And glibc's malloc is told to keep freed memory for reuse
while they run (`freed_memory_kept`): by default it returns every freed block over 128 KiB to the kernel
and takes fresh zeroed pages for the next one, so eager torch, which allocates its intermediate tensors
anew in each call, paid 26,880 page faults per call on ViT-S/16 at batch 1 (105 MB of pages zeroed by the
kernel) and ran at 93 ms instead of 51 ms, with a spread that depended on the kernel's state, not the
model's. ONNX Runtime and OpenVINO keep their own arenas and were not affected. On
CPU each call is timed with `time.perf_counter`; on CUDA with a pair of CUDA events around each call,
recorded after a synchronise.

`latency_stats` turns the rounds into the numbers a reader can trust: mean, p50, p90, p99 (only from
100 calls or more), and the spread of the per-round means (their IQR over their median), which flags a
row as unstable when it is above a threshold.

On a shared or virtual machine most of that spread is the machine's, not the backend's: every backend of a
round slows down together (a 2-core VM measured 2026-12-04 drifted by up to 1.8x within 20 s, all backends
alike, while a fixed matmul loop held within 3 % in most 100 ms windows). `machine_drift` estimates that
shared factor per round from three or more backends, and `own_spread` is a backend's spread with it divided
out: what a ratio between two rows of the same rounds carries.
"""

from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from vitfold.export.isa import cpu_isa, cpu_name
from vitfold.export.runners import Runner

MIN_WARMUP_CALLS, MIN_TIMED_CALLS = 2, 5
MIN_CALLS_FOR_P99 = 100
MIN_BACKENDS_FOR_DRIFT = 3  # a round's machine speed is the median over at least this many backends
Key = TypeVar("Key", bound=Hashable)


@dataclass(frozen=True)
class Timing:
    """How long to warm up and time each (runner, input), and in how many interleaved rounds."""

    min_iters: int = 50
    min_seconds: float = 3.0
    warmup_seconds: float = 0.2
    rounds: int = 10
    round_warmup: int = 1  # untimed calls at the start of each round (the switch from the previous runner)
    gc_paused: bool = True  # Python's garbage collector off while warming up and timing
    malloc_kept: bool = True  # glibc's malloc keeps freed memory for reuse while timing (`freed_memory_kept`)

    def measure(self, cases: Mapping[Key, tuple[Runner, torch.Tensor]]) -> dict[Key, list[list[float]]]:
        """Per case, the per-call latencies (ms) of each round: every runner warmed up, then rounds in which
        each runner in turn makes its calls (A B C, A B C, ...)."""
        times: dict[Key, list[list[float]]] = {key: [] for key in cases}
        with freed_memory_kept(self.malloc_kept), gc_paused(self.gc_paused):
            for runner, x in cases.values():
                self._warm_up(runner, x)
            for _ in range(self.rounds):
                for key, (runner, x) in cases.items():
                    for _ in range(self.round_warmup):
                        runner(x)
                    runner.synchronize()
                    timed = _cuda_times if runner.device.type == "cuda" else _cpu_times
                    times[key].append(timed(runner, x, self.more))
        return times

    def _warm_up(self, runner: Runner, x: torch.Tensor) -> None:
        started, calls = time.perf_counter(), 0
        while calls < MIN_WARMUP_CALLS or time.perf_counter() - started < self.warmup_seconds:
            runner(x)
            calls += 1
        runner.synchronize()

    def more(self, calls: int, started: float) -> bool:
        """Within one round: go on until both this round's share of `min_iters` calls and of `min_seconds`
        are done (and the rounds together make at least 5 calls)."""
        least_calls = max(math.ceil(self.min_iters / self.rounds), math.ceil(MIN_TIMED_CALLS / self.rounds))
        return calls < least_calls or time.perf_counter() - started < self.min_seconds / self.rounds


# glibc's mallopt parameters, and their values while timing and after (glibc's static defaults)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_KEPT = {"M_MMAP_THRESHOLD": 32 << 20, "M_TRIM_THRESHOLD": 1 << 30}  # 32 MiB is glibc's largest
MALLOC_DEFAULTS = {"M_MMAP_THRESHOLD": 128 << 10, "M_TRIM_THRESHOLD": 128 << 10}


def _glibc() -> Any | None:
    """The C library when it is glibc (it has mallopt and malloc_trim), else None."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _mallopt(libc: Any, values: Mapping[str, int]) -> None:
    codes = {"M_MMAP_THRESHOLD": M_MMAP_THRESHOLD, "M_TRIM_THRESHOLD": M_TRIM_THRESHOLD}
    for name, value in values.items():
        if libc.mallopt(codes[name], value) != 1:
            raise OSError(f"mallopt({name}, {value}) refused")


def malloc_settings(kept: bool = True) -> dict[str, int] | None:
    """What `freed_memory_kept(kept)` sets while timing here: MALLOC_KEPT on glibc, else None (nothing)."""
    return dict(MALLOC_KEPT) if kept and _glibc() is not None else None


@contextmanager
def freed_memory_kept(keep: bool = True) -> Iterator[None]:
    """glibc's malloc keeps freed memory inside the block: no block under 32 MiB from mmap (so none is
    unmapped when freed) and the heap's free top kept up to 1 GiB, then glibc's static defaults (128 KiB
    each) and `malloc_trim(0)` after. Nothing on other C libraries."""
    libc = _glibc() if keep else None
    if libc is None:
        yield
        return
    _mallopt(libc, MALLOC_KEPT)
    try:
        yield
    finally:
        _mallopt(libc, MALLOC_DEFAULTS)
        libc.malloc_trim(0)


@contextmanager
def gc_paused(pause: bool = True) -> Iterator[None]:
    """Python's cyclic garbage collector collected once, then off inside the block (as it was after)."""
    was_enabled = gc.isenabled()
    if pause:
        gc.collect()
        gc.disable()
    try:
        yield
    finally:
        if pause and was_enabled:
            gc.enable()


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


def latency_stats(
    round_times_ms: list[list[float]], unstable_above: float, drift: np.ndarray | None = None
) -> dict[str, Any]:
    """Over all calls of all rounds: mean and p50/p90 (ms), p99 only from 100 calls on (None below), and
    `iterations` (the calls). Over the rounds: `rounds`, `rel_iqr` (the IQR of the per-round means over their median),
    `own_rel_iqr` (with the machine's `drift` of those rounds: the `own_spread` of the per-round medians; without
    one: `rel_iqr`) and `unstable` (own_rel_iqr above `unstable_above`)."""
    times = np.concatenate([np.asarray(r, dtype=np.float64) for r in round_times_ms])
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    spread = round_spread(round_times_ms)
    own = spread if drift is None else own_spread(round_medians(round_times_ms), drift)
    return {
        "iterations": int(times.size),
        "mean_ms": float(times.mean()),
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99) if times.size >= MIN_CALLS_FOR_P99 else None,
        "rounds": len(round_times_ms),
        "rel_iqr": spread,
        "own_rel_iqr": own,
        "unstable": bool(own > unstable_above),
    }


def round_medians(round_times_ms: list[list[float]]) -> np.ndarray:
    """The median latency of each round."""
    return np.array([np.median(r) for r in round_times_ms], dtype=np.float64)


def round_means(round_times_ms: list[list[float]]) -> np.ndarray:
    """The mean latency of each round: what the machine gave the runner during that round (a round in which
    other processes took the CPU is slower on average, even where most of its calls were not)."""
    return np.array([np.mean(r) for r in round_times_ms], dtype=np.float64)


def round_spread(round_times_ms: list[list[float]]) -> float:
    """How much the rounds disagree: (q75 - q25) / q50 of the per-round means (0 with a single round)."""
    return rel_iqr(round_means(round_times_ms))


def rel_iqr(values: np.ndarray) -> float:
    """(q75 - q25) / q50 of `values`."""
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    return float((q75 - q25) / q50)


def machine_drift(medians: Mapping[Key, np.ndarray]) -> np.ndarray | None:
    """The machine's own speed in each round, which every backend of the round shares: per round, the
    median over the backends of (the backend's median that round / its median over all rounds); 1 is the
    usual speed, 1.3 a round in which the machine ran everything 30 % slower. None with fewer than
    `MIN_BACKENDS_FOR_DRIFT` backends, which cannot tell the machine from one backend."""
    rows = list(medians.values())
    if len(rows) < MIN_BACKENDS_FOR_DRIFT or len({len(r) for r in rows}) != 1:
        return None
    relative = np.stack([r / np.median(r) for r in rows])  # (backends, rounds)
    return np.median(relative, axis=0)


def own_spread(medians: np.ndarray, drift: np.ndarray) -> float:
    """How much a backend's per-round medians disagree once each round's machine drift is divided out:
    the rel IQR of medians / drift."""
    return rel_iqr(medians / drift)


def machine(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on: CPU model and instruction sets, logical CPUs, platform, and the GPU
    on CUDA."""
    found: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_isa": cpu_isa(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
    }
    if torch.device(device).type == "cuda":
        found["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return found


def interleaved_rounds(
    variants: dict[str, Callable[[], object]],
    *,
    warmup: int = 2,
    iters: int = 3,
    rounds: int = 5,
    round_warmup: int = 0,
    device: str = "cpu",
) -> dict[str, list[float]]:
    """Per variant, the mean ms per call of each round. Rounds alternate the variants (so drift on a busy
    machine hits all alike), each variant's turn starting with `round_warmup` untimed calls (what the switch
    from the previous variant costs its first call), the garbage collector paused: compare them as ratios of
    medians within one call, with the spread."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    with gc_paused():
        for _ in range(rounds):
            for name, fn in variants.items():
                for _ in range(round_warmup):
                    fn()
                sync()
                start = time.perf_counter()
                for _ in range(iters):
                    fn()
                sync()
                samples[name].append((time.perf_counter() - start) * 1e3 / iters)
    return samples
