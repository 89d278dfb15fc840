#!/usr/bin/env bash
# Run ruff (lint + format check), then the test suite: ./scripts/test.sh [pytest arguments].
# Creates .venv and installs on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
# lint and formatting first: a style slip fails in seconds, not after the whole suite
ruff check --quiet .
ruff format --check --quiet .
exec python -m pytest "$@"
