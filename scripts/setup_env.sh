#!/usr/bin/env bash
# Sourced by demo.sh and test.sh: create .venv if needed and install the project into it.
# Idempotent: the install runs again only when setup.cfg or pyproject.toml changed.
# torch is pinned to 2.13.0 here (a CPU build lies on the dev machines' disk; a looser pin would pull a
# multi-GB CUDA build); the package itself only asks for torch>=2.4, so GPU users keep their own build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VOLUMETRIC_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
STAMP="$VENV/.volumetric-install"
WANT="$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "[setup] installing torch==2.13.0 and volumetric[dev,demo] into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev,demo]"
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
