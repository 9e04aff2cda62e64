"""The machine a benchmark ran on: CPU model, the ISA features that matter for inference, core count and
load average. Every timing a benchmark prints carries this line (a figure without its machine and load is
not comparable)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["ISA_FEATURES", "cpu_model", "isa_features", "load_average", "machine_info", "machine_line"]

# /proc/cpuinfo flags worth naming beside a timing (vector widths, dot-product and matrix units)
ISA_FEATURES = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def _cpuinfo(path: Path = Path("/proc/cpuinfo")) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def cpu_model(text: str | None = None) -> str:
    """'model name' of the first CPU (Linux), else platform.processor(), else 'unknown CPU'."""
    for line in (_cpuinfo() if text is None else text).splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware") and value.strip():
            return value.strip()
    return platform.processor() or "unknown CPU"


def isa_features(text: str | None = None) -> list[str]:
    """The ISA_FEATURES this CPU has, in ISA_FEATURES order (empty when unknown)."""
    flags: set[str] = set()
    for line in (_cpuinfo() if text is None else text).splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            break
    return [f for f in ISA_FEATURES if f in flags]


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def machine_info() -> dict:
    """CPU model, ISA features, logical CPUs, load average (1, 5, 15 min) now."""
    return {"cpu": cpu_model(), "isa": isa_features(), "cpus": os.cpu_count(), "load_average": load_average()}


def machine_line(info: dict | None = None) -> str:
    info = machine_info() if info is None else info
    load = info.get("load_average")
    load_text = "unknown" if load is None else " / ".join(f"{v:.2f}" for v in load)
    return (f"machine: {info['cpu']}, {info['cpus']} logical CPUs, ISA {' '.join(info['isa']) or 'unknown'}; "
            f"load average (1/5/15 min) {load_text}")
