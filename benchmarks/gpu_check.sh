#!/usr/bin/env bash
# On a machine with a GPU (the device tool's lent machine): the device-dependent tests on CUDA and the CPU, then the
# device speed ratios; everything printed is saved to benchmarks/results/gpu_check.txt. Needs the test install.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
out=benchmarks/results/gpu_check.txt
mkdir -p benchmarks/results
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo 'nvidia-smi: not found'
  "$python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
  timeout 300 "$python" -m pytest -q -rs tests/test_devices.py; echo "device tests: exit $?"
  timeout 120 "$python" benchmarks/bench_device.py --device cuda --rounds 10; echo "bench: exit $?"
} 2>&1 | tee "$out"
