#!/usr/bin/env bash
# The device check, for a session lent a GPU (one run through the device tool, < 8 minutes):
# builds the project on the bare machine, runs the CUDA-marked tests, the CRF/lattice bench on the
# GPU, then the training step on the GPU (width 1.0, batch 8, crop 448: mining and dense energy on
# the device vs CPU mining; and the released computation at batch 2). Record its figures in
# bench/RESULTS.md.
#
# The lent machine reaches no package index: what its image lacks (swig, pycocotools wheels and
# the pydensecrf2 sdist with the Cython it builds with, for its Python 3.12) travels in .whl/,
# ignored by git. Fetch them here once
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux_2_12_x86_64 --platform manylinux_2_5_x86_64 -d .whl swig pycocotools Cython==0.29.36
#   python3 -m pip download --no-deps --no-binary :all: -d .whl pydensecrf2
# and call the device tool with carry [".whl"] and the command `bash bench/gpu_check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOG=${OUT:-/tmp}/gpu_check.log
exec > >(tee "$LOG") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
lscpu | grep -E "Model name|^CPU\(s\)" || true
if [ -d .whl ]; then
    SITE=/tmp/site
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" .whl/pydensecrf2-*.tar.gz
else
    "$PYTHON" -m pip install -q -r requirements.txt
fi
# The C++ filter in place (no build isolation there); the repository and the module on the path.
"$PYTHON" setup.py -q build_ext --inplace
export PYTHONPATH="$PWD:$PWD/wrapper/bilateralfilter:$PYTHONPATH"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
timeout 180 "$PYTHON" -m pytest tests -m cuda -rs -q -p no:cacheprovider
timeout 90 "$PYTHON" bench/bench_crf.py --device cuda --repeats 5
timeout 150 "$PYTHON" bench/bench_train_step.py --device cuda --batch 8 --crop 448 --repeats 3 --modes ours,ours_cpu_crf
timeout 60 "$PYTHON" bench/bench_train_step.py --device cuda --repeats 2 --modes released,ours,ours_bf16
