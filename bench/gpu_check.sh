#!/usr/bin/env bash
# The device check, for a session lent a GPU (run it once through the device tool, < 8 minutes):
# installs the project, runs the CUDA-marked tests, the CRF/lattice bench on the GPU, then the
# training step on the GPU (width 1.0, batch 8, crop 448: mining and dense energy on the device vs
# CPU mining, and the released computation at batch 2). Record its figures in bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
lscpu | grep -E "Model name|^CPU\(s\)" || true
"$PYTHON" -m pip install -q -r requirements.txt
"$PYTHON" -m pip install -q -e .
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
timeout 180 "$PYTHON" -m pytest tests -m cuda -rs -q
timeout 90 "$PYTHON" bench/bench_crf.py --device cuda --repeats 5
timeout 150 "$PYTHON" bench/bench_train_step.py --device cuda --batch 8 --crop 448 --repeats 3 --modes ours,ours_cpu_crf
timeout 60 "$PYTHON" bench/bench_train_step.py --device cuda --repeats 2 --modes released,ours,ours_bf16
