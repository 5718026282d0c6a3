#!/usr/bin/env bash
# On a machine with a GPU (the device tool's lent machine): the device-dependent tests on CUDA and the CPU, then the
# device speed ratios; everything printed is saved to benchmarks/results/gpu_check.txt (and copied into $OUT when the
# device tool sets it). Needs the test install, or the package on PYTHONPATH: docs/performance.md, "On a GPU".
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
out=benchmarks/results/gpu_check.txt
mkdir -p benchmarks/results
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo 'nvidia-smi: not found'
  "$PYTHON" -c 'import torch, timm, huggingface_hub as h; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "| timm", timm.__version__, "| huggingface_hub", h.__version__)'
  timeout 300 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_devices.py; echo "device tests: exit $?"
  timeout 120 "$PYTHON" benchmarks/bench_device.py --device cuda --rounds 10; echo "bench: exit $?"
} 2>&1 | tee "$out"
if [ -n "${OUT:-}" ]; then cp "$out" "$OUT/"; fi
