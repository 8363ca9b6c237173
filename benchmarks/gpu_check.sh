#!/usr/bin/env bash
# One pass on a machine with one NVIDIA GPU, in under 8 minutes: install, the CUDA tests, the GPU benchmark.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; prints the tests' summary and one table per
#                                           # precision (SAN10/19 against resnet26/50 and the unfold arithmetic)
#
# Uses the python3 on PATH in a fresh .venv-gpu (the pinned set of constraints.txt, whose torch is a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
if [ ! -x .venv-gpu/bin/python ]; then
  python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install -q -c constraints.txt -e '.[test]'
fi
echo "== installed in $(( $(date +%s) - start )) s"
# the Triton kernels on the GPU, and the dispatch's CUDA paths
.venv-gpu/bin/python -m pytest -q -p no:cacheprovider tests/test_ops_triton.py tests/test_dispatch.py \
  tests/test_attention_kernels.py -k "cuda or triton or fused or bf16" 2>&1 | tail -15
echo "== tests done at $(( $(date +%s) - start )) s"
.venv-gpu/bin/python benchmarks/gpu_bench.py --rounds 3
echo "== done in $(( $(date +%s) - start )) s"
