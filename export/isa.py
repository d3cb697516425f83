"""What the CPU can compute fast: its vector instruction sets, read from /proc/cpuinfo's flags.

A CPU result depends on them (AVX-512 VNNI for INT8, AVX512_BF16 or AMX for BF16), so bench records
them and export refuses a BF16 CPU artifact on a CPU without native BF16.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

# cpuinfo flag -> the name people know, in the order of the table in docs/benchmarks.md
ISA_FLAGS = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX512_VNNI",
    "avx512_bf16": "AVX512_BF16",
    "amx_bf16": "AMX_BF16",
    "amx_int8": "AMX_INT8",
}
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@cache
def cpu_flags() -> frozenset[str]:
    """The flags of the first CPU in /proc/cpuinfo (empty where there is no such file)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_isa() -> list[str]:
    """The vector instruction sets of ISA_FLAGS this CPU has, e.g. ["AVX2", "AVX-512", "AVX512_VNNI"]."""
    flags = cpu_flags()
    return [name for flag, name in ISA_FLAGS.items() if flag in flags]


def cpu_has_bf16() -> bool:
    """Native BF16 arithmetic (AVX512_BF16 or AMX): without it torch emulates BF16, slower than FP32."""
    return bool(cpu_flags() & set(BF16_FLAGS))
