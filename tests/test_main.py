"""`python -m volumetric COMMAND`: the entry point for launchers, immune to the user's own modules."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoint_v1"


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_a_users_transforms_module_does_not_shadow_the_package(tmp_path):
    """The preprocessing installs as volumetric.transforms: a transforms.py (or a transforms/
    folder) in the working folder, as users of other libraries have, changes nothing."""
    (tmp_path / "transforms.py").write_text("raise ImportError('the user transforms module')\n")
    done = run(
        [
            "-m",
            "volumetric",
            "infer",
            str(FIXTURES / "best.pt"),
            str(FIXTURES / "lesion.nii.gz"),
            "--output",
            "p.csv",
            "--no-progress",
            "--device",
            "cpu",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    with (tmp_path / "p.csv").open(newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["error"] == "" and row["prediction"] in ("healthy", "lesion")
    api = run(
        ["-c", "from volumetric import Predictor, load_model; import volumetric.inference"],
        tmp_path,
    )
    assert api.returncode == 0, api.stderr


def test_no_top_level_transforms_module_is_installed(tmp_path):
    done = run(["-c", "import importlib.util as u; print(u.find_spec('transforms'))"], tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stdout + done.stderr
