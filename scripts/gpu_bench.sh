#!/usr/bin/env bash
# The GPU measurement, volumetric-bench --gpu, on a machine that has CUDA, PyTorch and Triton but
# not this package (a lent GPU machine, a cluster node), without a network there:
#
#   ./scripts/gpu_bench.sh --prepare     here, once, with a network: MONAI's and NiBabel's wheels
#                                        (all the GPU plan needs beyond PyTorch, NumPy, SciPy,
#                                        scikit-learn, Matplotlib and PyYAML) into .whl/
#   ./scripts/gpu_bench.sh [REPORT.md]   there: installs .whl/ into a temporary folder if MONAI is
#                                        missing, then runs the plan; REPORT.md (default
#                                        docs/benchmarks.md) gets a "GPU run" section and
#                                        REPORT-gpu.jsonl every result, both as each case lands
#
# The plan takes about 8 minutes on one H100; a run cut short keeps the cases it finished, the
# most important first (volumetric/bench/gpu.py).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(monai==1.6.1 nibabel==5.4.2)

if [[ "${1:-}" == "--prepare" ]]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d .whl "${WHEELS[@]}"
    ls .whl
    exit 0
fi

report="${1:-docs/benchmarks.md}"
if ! python3 -c "import monai, nibabel" 2>/dev/null; then
    site="$(mktemp -d)"
    python3 -m pip install --quiet --no-index --no-deps --no-compile --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
exec python3 -m volumetric bench --gpu --output "$report"
