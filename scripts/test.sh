#!/usr/bin/env bash
# Run ruff (lint + format check) and mypy (types), then the test suite:
# ./scripts/test.sh [pytest arguments].
# Creates .venv and installs on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
# lint and formatting first: a style slip fails in seconds, not after the whole suite
ruff check --quiet .
ruff format --check --quiet .
mypy  # settings and files in pyproject.toml: volumetric/, transforms/ and scripts/
exec python -m pytest "$@"
