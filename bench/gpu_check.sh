#!/usr/bin/env bash
# The device check, for a session lent a GPU (run it once through the device tool, < 8 minutes):
# installs the project, runs the CUDA-marked tests, then one training step on the GPU, released
# computation vs ours (width 1.0, batch 2, crop 321). Record its figures in bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PYTHON" -m pip install -q -r requirements.txt
"$PYTHON" -m pip install -q -e .
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
timeout 300 "$PYTHON" -m pytest tests -m cuda -rs -q
timeout 240 "$PYTHON" bench/bench_train_step.py --device cuda --repeats 3 --modes released,ours,ours_bf16
