#!/usr/bin/env bash
# The accuracy comparison of docs/results.md: seq-norm ViT vs softmax ViT vs MONAI DenseNet121 on the
# demo data, same preprocessing and epoch budget. Set-up as in demo.sh; arguments go to compare.py
# (--epochs N, --models seqnorm softmax densenet121, ...). Finished runs in runs/compare are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec python scripts/compare.py "$@"
