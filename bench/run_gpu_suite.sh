#!/usr/bin/env bash
# On a GPU machine: build the extension there (its torch differs from the dev machine's), run the CUDA tests and
# every benchmark, and append the results to bench/RESULTS.md. Budget: < 9 minutes on one H100.
#   OUT=/some/dir bash bench/run_gpu_suite.sh    (copies CSVs and the log to $OUT when set)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
echo "torch $($PY -c 'import torch; print(torch.__version__, torch.version.cuda)')" \
     "triton $($PY -c 'import triton; print(triton.__version__)')" "nvcc: $(nvcc --version | tail -1)"
time $PY setup.py -q build_ext --inplace
$PY -c "import kangaroo_kernels as k; print(k.build_info()); assert k.has_cuda_kernels()"
# Every test: the `device` fixture runs the same bodies on CPU and CUDA; Triton runs compiled on the GPU.
time $PY -m pytest -q -x -ra tests
for f in bench/bench_*.py; do echo "== $f"; timeout 120 $PY "$f" || echo "FAILED: $f"; done
$PY bench/collect_results.py --append bench/RESULTS.md
if [ -n "${OUT:-}" ]; then cp bench/results/*.csv bench/RESULTS.md "$OUT"/ 2>/dev/null || true; fi
