"""What this CPU offers inference: model name, the ISA features that matter, the ``auto`` precision rule.

Features are read from the ``flags`` line of /proc/cpuinfo (Linux names):
  amx_int8, amx_bf16  Intel AMX tiles (Sapphire Rapids and later): INT8 and BF16 matrix units
  avx512_bf16         AVX512-BF16 dot products (Cooper Lake, Sapphire Rapids, AMD Zen 4+)
  avx512_vnni         AVX-512 VNNI INT8 dot products (Cascade Lake and later, AMD Zen 4+)
  avx_vnni            VEX-encoded VNNI (Alder Lake and later client parts)
  avx512f, avx2       the vector width the FP32 kernels use
On a CPU without VNNI, INT8 dot products go through vpmaddubsw, whose 16-bit pair sums saturate with full
8-bit weights; engines.quantize therefore stores 7-bit weights by default (``reduce_range``).

``choose_precision(flags, carried, supported, verified)`` is the pure rule behind ``precision="auto"``:
  int8  when the bundle carries model.int8.onnx that passed the accuracy guard (files.onnx_int8.guard.ok,
        written by benchmarks/precision_guard.py --record), the backend runs INT8 and the CPU has INT8 dot
        products (AMX-INT8, AVX512-VNNI, AVX-VNNI, or AVX2 without VNNI);
  bf16  else when the backend runs BF16 and the CPU computes BF16 natively (AMX-BF16, AVX512-BF16);
  fp32  otherwise.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from .base import BackendUnavailable

__all__ = ["ISA_FEATURES", "PRECISIONS", "CpuInfo", "read_cpuinfo", "parse_cpuinfo", "int8_isa", "bf16_isa",
           "choose_precision", "resolve_precision"]

# the features printed beside every timing figure, best first
ISA_FEATURES = ("amx_int8", "amx_bf16", "amx_tile", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f",
                "avx2")
PRECISIONS = ("fp32", "bf16", "int8")  # CPU precisions, as engines report them

_INT8_ISA = ("amx_int8", "avx512_vnni", "avx_vnni", "avx2")  # best first
_BF16_ISA = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    flags: frozenset[str]
    cores: int | None = None  # logical CPUs listed

    @property
    def isa(self) -> tuple[str, ...]:
        """The inference-relevant features this CPU has, best first."""
        return tuple(f for f in ISA_FEATURES if f in self.flags)

    def summary(self) -> str:
        """One line for benchmark output: model, cores, ISA features."""
        isa = " ".join(self.isa) or "none of " + "/".join(ISA_FEATURES)
        cores = f"; {self.cores} logical CPUs" if self.cores else ""
        return f"{self.model}{cores}; ISA: {isa}"


def parse_cpuinfo(text: str) -> CpuInfo:
    """Pure: the text of /proc/cpuinfo -> CpuInfo (first processor's model name and flags)."""
    model, flags, cores = "", frozenset(), 0
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "processor":
            cores += 1
        elif key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return CpuInfo(model=model or "unknown CPU", flags=flags, cores=cores or None)


def read_cpuinfo(path: str | Path = "/proc/cpuinfo") -> CpuInfo:
    """This machine's CpuInfo; without /proc/cpuinfo (not Linux) the model from platform and no flags."""
    try:
        return parse_cpuinfo(Path(path).read_text())
    except OSError:
        return CpuInfo(model=platform.processor() or platform.machine() or "unknown CPU", flags=frozenset())


def int8_isa(flags) -> str | None:
    """The best INT8 dot-product feature present, or None."""
    return next((f for f in _INT8_ISA if f in flags), None)


def bf16_isa(flags) -> str | None:
    """The native BF16 feature present, or None (OpenVINO then computes in FP32 even when asked for BF16)."""
    return next((f for f in _BF16_ISA if f in flags), None)


def choose_precision(flags, carried, supported, verified=None) -> tuple[str, str]:
    """Pure rule behind ``auto``: (precision, reason).

    flags: the CPU's feature flags; carried: precisions the bundle carries ("fp32", "int8"); verified: those
    of them that passed the accuracy guard (default: all carried); supported: precisions the backend can run
    ("fp32", "bf16", "int8"). INT8 is picked only when verified."""
    verified = carried if verified is None else verified
    why_not_int8 = ("no INT8 model in the bundle" if "int8" not in carried
                    else "the bundle's INT8 model has not passed the accuracy guard" if "int8" not in verified
                    else "no INT8 dot products")
    if "int8" in supported:
        isa = int8_isa(flags)
        if "int8" in verified and isa is not None:
            return "int8", f"bundle carries a guard-checked INT8 model and the CPU has {isa}"
    if "bf16" in supported:
        isa = bf16_isa(flags)
        if isa is not None:
            return "bf16", f"CPU has {isa}" + (f"; {why_not_int8}" if "int8" in supported else "")
    missing = [why_not_int8] if "int8" in supported else []
    if "bf16" in supported:
        missing.append("no native BF16 (AMX/AVX512-BF16)")
    return "fp32", "; ".join(missing) or "the backend runs fp32 only"


def resolve_precision(requested: str | None, carried, supported, backend: str, flags=None,
                      verified=None) -> tuple[str, str]:
    """The precision a CPU backend runs: None -> fp32, ``auto`` -> ``choose_precision``, else as asked.

    Returns (precision, reason). Asking for a precision the backend cannot run or the bundle does not carry
    raises BackendUnavailable: never a silent change of precision."""
    if requested is None:
        return "fp32", "default"
    if requested == "auto":
        flags = read_cpuinfo().flags if flags is None else flags
        return choose_precision(flags, carried, supported, verified)
    if requested not in supported:
        raise BackendUnavailable(f"{backend} backend on cpu runs {', '.join(supported)} (or auto), "
                                 f"not {requested!r}")
    if requested not in carried and requested != "bf16":  # bf16 is computed from the FP32 graph
        raise BackendUnavailable(f"the bundle carries no {requested} model (it has "
                                 f"{', '.join(sorted(carried))}); make one with: edge-engines quantize "
                                 "--bundle DIR --images DIR")
    return requested, "asked for"
