#!/usr/bin/env bash
# One GPU check (docs/gpu.md): CUDA tests, FP16-vs-FP32 parity on real bundles, tiles/s, daemon latency,
# within 8 minutes; writes runs/gpu-check/gpu_check.{json,md}. Runs from a plain checkout (nothing installed
# but PyTorch with CUDA and numpy); sections whose dependencies are missing are skipped and say which.
# Exit codes: 0 every section that ran passed; 1 a section failed; 2 bad arguments; 3 numpy missing;
#             77 no usable NVIDIA GPU (nothing was run). PYTHON=... picks the interpreter (default python3).
set -u
cd "$(dirname "$0")/.." || exit 2
exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
