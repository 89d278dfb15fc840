#!/usr/bin/env bash
# The accuracy study of docs/results.md: seq-norm ViT against softmax ViT (several seeds each), the
# seqnorm_qk and SimA variants and MONAI DenseNet121 (one seed each) on a demo task, paired
# non-inferiority check included. Set-up as in demo.sh; arguments go to compare.py, e.g.
#   ./scripts/compare.sh --task lesion --epochs 30 --seeds 3
#   ./scripts/compare.sh --task regions --epochs 30 --seeds 3
# Runs train one at a time; finished runs in runs/compare/<task>/ are reused, interrupted ones resumed,
# and docs/results.md is rewritten after every run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec python scripts/compare.py "$@"
