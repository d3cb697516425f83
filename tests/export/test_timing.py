"""The timing library on injected numbers: statistics over rounds (p99 only from 100 calls, the rounds'
spread and the unstable flag against numpy computed here), interleaved rounds, the calls-and-seconds
minimum, and the instruction sets read from /proc/cpuinfo."""

from __future__ import annotations

import gc
import itertools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vitfold.export import timing as timing_module
from vitfold.export.isa import cpu_isa
from vitfold.export.runners import Runner
from vitfold.export.timing import (
    Timing,
    interleaved_rounds,
    latency_stats,
    machine_drift,
    malloc_settings,
    own_spread,
)

rng = np.random.default_rng(0)
QUIET = [list(1.0 + 0.01 * rng.standard_normal(12)) for _ in range(10)]  # ~1 ms, 1% jitter, same every round
BURSTY = [list(np.full(12, 1.0 if i % 2 else 2.5) + 0.01 * rng.standard_normal(12)) for i in range(10)]


def _spread(rounds: list[list[float]]) -> float:
    means = [sum(r) / len(r) for r in rounds]
    q25, q50, q75 = np.percentile(means, [25, 50, 75])
    return (q75 - q25) / q50


# The machine's speed per round (shared by every backend of the round: a VM's host taking its cores), and three
# backends of distinct speeds; the third also has its own scatter, which the drift does not explain.
DRIFT = np.array([1.0, 1.6, 1.0, 1.3, 0.9, 1.0, 1.8, 1.0, 1.1, 1.0])
OWN = np.array([1.0, 1.0, 1.3, 1.0, 0.7, 1.0, 1.0, 1.4, 1.0, 0.8])


def _medians() -> dict[str, np.ndarray]:
    return {"a": 2.0 * DRIFT, "b": 5.0 * DRIFT, "c": 0.5 * DRIFT * OWN}


def _rel_iqr(values) -> float:
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    return (q75 - q25) / q50


def test_the_machine_drift_is_the_speed_every_backend_of_a_round_shares():
    drift = machine_drift(_medians())
    assert drift == pytest.approx(DRIFT / np.median(DRIFT))  # a and b carry the drift alone; c's own part is outvoted
    assert _rel_iqr(DRIFT) >= 0.2  # each row's raw spread is the machine's: all three would be unstable at 10 %
    assert own_spread(_medians()["a"], drift) == pytest.approx(0.0, abs=1e-12)
    assert own_spread(_medians()["c"], drift) == pytest.approx(_rel_iqr(OWN))  # what is the backend's own stays


def test_two_backends_cannot_tell_the_machine_from_a_backend():
    assert machine_drift({k: v for k, v in _medians().items() if k != "c"}) is None


@pytest.mark.parametrize("rounds", [QUIET, BURSTY], ids=["quiet", "bursty"])
def test_statistics_over_rounds_match_numpy(rounds):
    stats = latency_stats(rounds, unstable_above=0.1)
    calls = [t for r in rounds for t in r]
    assert stats["iterations"] == 120 and stats["rounds"] == 10
    assert stats["mean_ms"] == pytest.approx(sum(calls) / len(calls))
    assert [stats["p50_ms"], stats["p90_ms"], stats["p99_ms"]] == pytest.approx(np.percentile(calls, [50, 90, 99]))
    assert stats["rel_iqr"] == pytest.approx(_spread(rounds))


def test_a_quiet_row_is_stable_and_a_bursty_one_is_not():
    quiet, bursty = latency_stats(QUIET, 0.1), latency_stats(BURSTY, 0.1)
    assert _spread(QUIET) < 0.01 and quiet["unstable"] is False
    assert _spread(BURSTY) > 0.5 and bursty["unstable"] is True
    assert latency_stats(BURSTY, unstable_above=2 * _spread(BURSTY))["unstable"] is False  # the threshold decides


def test_no_p99_from_fewer_than_100_calls():
    assert latency_stats([[1.0] * 33] * 3, 0.1)["p99_ms"] is None  # 99 calls
    hundred = [[float(i) for i in range(50)], [float(i) for i in range(50, 100)]]
    assert latency_stats(hundred, 0.1)["p99_ms"] == pytest.approx(np.percentile(range(100), 99))


class CountingRunner(Runner):
    """A CPU runner that records its name in a shared log at each call."""

    def __init__(self, name: str, log: list[str], seconds: float = 0.0) -> None:
        super().__init__("cpu")
        self.name, self.log, self.seconds = name, log, seconds

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(self.name)
        time.sleep(self.seconds)
        return x


def test_rounds_alternate_the_runners_after_warming_each_up():
    log: list[str] = []
    x = torch.zeros(1)
    cases = {name: (CountingRunner(name, log), x) for name in "ABC"}
    times = Timing(min_iters=12, min_seconds=0.0, warmup_seconds=0.0, rounds=4).measure(cases)
    blocks = [(name, len(list(calls))) for name, calls in itertools.groupby(log)]
    # warm-up, then rounds: each runner's round starts with one untimed call (the switch), then its 3 timed calls
    assert blocks == [("A", 2), ("B", 2), ("C", 2)] + [("A", 4), ("B", 4), ("C", 4)] * 4
    assert {name: [len(r) for r in rounds] for name, rounds in times.items()} == {n: [3] * 4 for n in "ABC"}


def test_timing_needs_both_its_calls_and_its_seconds():
    log: list[str] = []
    runner = CountingRunner("A", log, seconds=0.002)
    started = time.perf_counter()
    times = Timing(min_iters=4, min_seconds=0.2, warmup_seconds=0.0, rounds=2).measure({"A": (runner, torch.zeros(1))})
    assert time.perf_counter() - started >= 0.2 and all(sum(r) >= 90 for r in times["A"])  # 0.1 s per round
    assert sum(len(r) for r in times["A"]) > 4  # the seconds, not the 4 calls, ended it
    times = Timing(min_iters=40, min_seconds=0.0, warmup_seconds=0.0, rounds=2).measure({"A": (runner, torch.zeros(1))})
    assert [len(r) for r in times["A"]] == [20, 20]  # the calls, not the 0 seconds, ended it


@pytest.mark.parametrize("pause", [True, False])
def test_the_garbage_collector_is_off_while_rounds_run_and_back_after(pause):
    seen: list[bool] = []

    class Probe(CountingRunner):
        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(gc.isenabled())
            return super().__call__(x)

    assert gc.isenabled()
    Timing(min_iters=4, min_seconds=0.0, warmup_seconds=0.0, rounds=2, gc_paused=pause).measure(
        {"A": (Probe("A", []), torch.zeros(1))}
    )
    assert set(seen) == {not pause} and gc.isenabled()  # warm-up and rounds; back on after
    interleaved_rounds({"A": lambda: seen.append(gc.isenabled())}, warmup=0, iters=1, rounds=1)
    assert seen[-1] is False and gc.isenabled()


FAULTS_PER_CALL = """
import ctypes, json, resource, sys
import torch
from vitfold.export.runners import Runner
from vitfold.export.timing import Timing


class AllocatingRunner(Runner):
    # allocates, fills and frees 8 MiB per call, as eager torch does its intermediates; page faults per call
    # read from the kernel (getrusage), apart from the timing code
    def __init__(self):
        super().__init__("cpu")
        self.faults = []

    def __call__(self, x):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(2 << 20)
        self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return x


# glibc's static defaults (malloc.h: M_MMAP_THRESHOLD -3, M_TRIM_THRESHOLD -1, 128 KiB each): every freed
# block over 128 KiB goes back to the kernel
libc = ctypes.CDLL("libc.so.6")
assert libc.mallopt(-3, 128 << 10) == libc.mallopt(-1, 128 << 10) == 1
runner = AllocatingRunner()
kept = sys.argv[1] == "kept"
timing = Timing(min_iters=12, min_seconds=0.0, warmup_seconds=0.0, rounds=2, malloc_kept=kept)
timing.measure({"A": (runner, torch.zeros(1))})
print(json.dumps(runner.faults))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc settings are glibc's (mallopt)")
@pytest.mark.parametrize("kept", [True, False])
def test_freed_memory_is_kept_while_timing_so_calls_take_no_page_faults(kept):
    """An 8 MiB buffer is over glibc's 128 KiB mmap threshold: by default each call maps fresh pages (about
    2,048 faults of 4 KiB); with the memory kept, once the heap has grown the calls reuse it and take almost
    none. In a fresh process: a long-lived one's heap can hold the buffer's pages whatever the settings."""
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_CALL, "kept" if kept else "default"],
        capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    faults = json.loads(out.stdout.strip().splitlines()[-1])
    last_round = faults[-6:]  # the second round's 6 timed calls (the heap needs a few calls to grow first)
    if kept:
        assert np.median(last_round) < 200
        assert malloc_settings(True) == {"M_MMAP_THRESHOLD": 32 << 20, "M_TRIM_THRESHOLD": 1 << 30}
    else:
        assert np.median(faults) > 1000 and malloc_settings(False) is None


def test_glibcs_defaults_are_set_again_and_the_heap_trimmed_after_timing(monkeypatch):
    """The calls timing makes into the C library, recorded by a stand-in for it: the kept values before the
    warm-up, glibc's static defaults and a trim after the rounds (or nothing at all when not asked)."""
    calls: list[tuple] = []

    class Libc:
        def mallopt(self, code: int, value: int) -> int:
            calls.append(("mallopt", code, value))
            return 1

        def malloc_trim(self, pad: int) -> int:
            calls.append(("malloc_trim", pad))
            return 1

    monkeypatch.setattr(timing_module, "_glibc", Libc)
    runner = CountingRunner("A", [])
    Timing(min_iters=2, min_seconds=0.0, warmup_seconds=0.0, rounds=1, malloc_kept=False).measure(
        {"A": (runner, torch.zeros(1))}
    )
    assert calls == []
    Timing(min_iters=2, min_seconds=0.0, warmup_seconds=0.0, rounds=1).measure({"A": (runner, torch.zeros(1))})
    mib, kib = 1 << 20, 1 << 10
    assert calls == [
        ("mallopt", -3, 32 * mib), ("mallopt", -1, 1024 * mib),  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD kept
        ("mallopt", -3, 128 * kib), ("mallopt", -1, 128 * kib), ("malloc_trim", 0),  # defaults, then trim
    ]  # fmt: skip


def test_interleaved_rounds_leave_each_turns_first_call_untimed_when_asked():
    """A variant whose first call after another variant's turn is slow (20 ms against 1 ms): timed with
    `round_warmup=1` its rounds show the 1 ms calls; without, the switch's 20 ms sits in every round."""
    log: list[str] = []

    def variant(name: str):
        def call() -> None:
            switched = bool(log) and log[-1] != name
            log.append(name)
            time.sleep(0.020 if switched else 0.001)

        return call

    variants = {name: variant(name) for name in "AB"}
    kept = interleaved_rounds(variants, warmup=1, iters=4, rounds=3, round_warmup=1)
    blocks = [(name, len(list(calls))) for name, calls in itertools.groupby(log)]
    assert blocks == [("A", 1), ("B", 1)] + [("A", 5), ("B", 5)] * 3
    assert all(1.0 <= ms < 4.0 for rounds in kept.values() for ms in rounds)  # ~1 ms a call
    log.clear()
    mixed = interleaved_rounds(variants, warmup=1, iters=4, rounds=3)
    assert all(ms >= (20 + 3 * 1) / 4 for rounds in mixed.values() for ms in rounds)  # the switch in every mean


def test_cpu_isa_reads_the_flags_of_proc_cpuinfo(tmp_path: Path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 amx_tile\n")
    assert cpu_isa(info) == ["AVX2", "FMA", "AVX-512", "AVX512_BF16", "AMX"]
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx\n")
    assert cpu_isa(info) == []
    assert cpu_isa(tmp_path / "missing") == []
