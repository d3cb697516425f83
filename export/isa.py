"""What the CPU is and can compute fast: its model name and vector/matrix instruction sets, read from
/proc/cpuinfo, and the ISA torch's inductor compiles for.

A CPU result depends on them (AVX-512 VNNI for INT8, AVX512_BF16 or AMX for BF16), so bench records
them and export refuses a BF16 CPU artifact on a CPU without native BF16.
"""

from __future__ import annotations

import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# /proc/cpuinfo flag -> the instruction-set name a reader knows, in the order they are listed
ISA_FLAGS = {
    "avx2": "AVX2",
    "fma": "FMA",
    "avx_vnni": "AVX_VNNI",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX512_VNNI",
    "avx512_bf16": "AVX512_BF16",
    "avx512_fp16": "AVX512_FP16",
    "amx_tile": "AMX",
    "amx_bf16": "AMX_BF16",
    "amx_int8": "AMX_INT8",
}
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def _cpuinfo_field(field: str, cpuinfo: Path) -> str | None:
    """The value of the first `field` line of /proc/cpuinfo (None where there is none or no file)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == field), None)


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The first CPU's flags (empty where /proc/cpuinfo cannot be read)."""
    return set((_cpuinfo_field("flags", cpuinfo) or "").split())


def cpu_isa(cpuinfo: Path = CPUINFO) -> list[str]:
    """The vector and matrix instruction sets that decide a CPU result (AVX2, AVX-512, AVX512_VNNI,
    AVX512_BF16, AMX, ...); empty where they cannot be read."""
    flags = cpu_flags(cpuinfo)
    return [name for flag, name in ISA_FLAGS.items() if flag in flags]


def cpu_has_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """Native BF16 arithmetic (AVX512_BF16 or AMX): without it torch emulates BF16, slower than FP32."""
    return bool(cpu_flags(cpuinfo) & set(BF16_FLAGS))


def cpu_has_amx_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """AMX's BF16 tile matmuls (Intel Sapphire Rapids and later): BF16 matmuls several times faster than
    AVX-512 FP32, where AVX512_BF16 alone gives about twice."""
    return "amx_bf16" in cpu_flags(cpuinfo)


def cpu_name(cpuinfo: Path = CPUINFO) -> str:
    """The CPU model, as /proc/cpuinfo names it (else what `platform` knows)."""
    return _cpuinfo_field("model name", cpuinfo) or platform.processor() or platform.machine()


def inductor_vec_isa() -> str:
    """The vector ISA torch's inductor compiles CPU kernels for on this machine (what an AOTInductor
    package exported here was built for), e.g. avx512 or avx2; "none" when it finds none."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return str(pick_vec_isa()) or "none"
