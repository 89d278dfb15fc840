#!/usr/bin/env bash
# Run the test suite: ./scripts/test.sh [pytest arguments]. Creates .venv and installs on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec python -m pytest "$@"
