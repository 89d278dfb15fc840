"""scripts/resolution_table.py: timings taken from a row's own training runs and how the table
marks them, on constructed run folders; no training."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import resolution_table  # noqa: E402


def write_run(
    folder: Path, seconds: list[float], peak: float | None, finished: bool = True
) -> None:
    """A run folder as compare.py leaves it: compare.json only once the run has finished."""
    folder.mkdir(parents=True)
    if finished:
        record = {"test": {"accuracy": 0.9, "auroc": 1}, "epoch_seconds": seconds}
        (folder / "compare.json").write_text(json.dumps({**record, "peak_memory_gib": peak}))


def test_timing_of_runs_pools_every_epoch_of_the_finished_runs(tmp_path):
    write_run(tmp_path / "lesion" / "m-s0", [30.0, 10.0, 11.0], peak=1.5)
    write_run(tmp_path / "regions" / "m-s0", [12.0, 13.0], peak=2.5)
    write_run(tmp_path / "regions" / "m-s1", [99.0, 99.0, 99.0], peak=9.0, finished=False)
    timed = resolution_table.timing_of_runs(
        [str(tmp_path / "lesion" / "m-s*"), str(tmp_path / "regions" / "m-s*")]
    )
    # median of 30, 10, 11, 12, 13; the unfinished run's epochs and peak are left out
    assert timed == {"epoch_s": 12.0, "peak_gib": 2.5, "from_runs": True}
    assert resolution_table.timing_of_runs([str(tmp_path / "none-s*")]) is None
    # a run whose peak memory was not measured gives its epochs, and no peak
    write_run(tmp_path / "unmeasured" / "m-s0", [5.0], peak=None)
    alone = resolution_table.timing_of_runs([str(tmp_path / "unmeasured" / "m-s*")])
    assert alone is not None and alone["epoch_s"] == 5.0 and math.isnan(alone["peak_gib"])


def test_section_marks_timings_from_runs():
    results = {"lesion": {"accuracy": [0.9], "auroc": [0.95]}}
    row = {"tokens": 640, "parameters_m": 0.5, "gflops": 1.0, "results": results}
    rows = [
        {**row, "label": "timed", "timing": {"epoch_s": 10.0, "peak_gib": 1.0}},
        {**row, "label": "runs", "timing": {"epoch_s": 20.0, "peak_gib": 2.0, "from_runs": True}},
    ]
    text = resolution_table.section({"plot_name": "p.png"}, rows, "this CPU", "cmd")
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert "10.0 s |" in lines["| timed"] and "‡" not in lines["| timed"]
    assert "20.0 s ‡" in lines["| runs"] and "2.00 GiB ‡" in lines["| runs"]
    assert "‡ not in the timing pass" in text
    unmeasured = {**rows[1], "timing": {**rows[1]["timing"], "peak_gib": math.nan}}
    text = resolution_table.section({"plot_name": "p.png"}, [unmeasured], "this CPU", "cmd")
    assert "| 20.0 s ‡ | – |" in text


def test_section_marks_rows_timed_over_one_epoch():
    results = {"lesion": {"accuracy": [], "auroc": []}}
    row = {"tokens": 5120, "parameters_m": 0.5, "gflops": 40.0, "results": results}
    rows = [
        {**row, "label": "long", "timing": {"epoch_s": 500.0, "peak_gib": 3.0, "epochs": 1}},
        {**row, "label": "short", "timing": {"epoch_s": 10.0, "peak_gib": 1.0, "epochs": 2}},
    ]
    text = resolution_table.section({"plot_name": "p.png"}, rows, "this CPU", "cmd")
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert "500.0 s †" in lines["| long"] and "3.00 GiB †" in lines["| long"]
    assert "†" not in lines["| short"]
    assert "† timed over its second epoch alone" in text
    assert "‡" not in text


def test_time_measures_only_rows_not_yet_timed(tmp_path, monkeypatch):
    rows = {
        "runs_root": str(tmp_path / "runs"),
        "rows": [
            {"label": "kept", "overrides": [], "runs": {"lesion": "a-s*"}},
            {
                "label": "new",
                "overrides": ["model.attention=softmax"],
                "timing_epochs": 2,
                "runs": {"lesion": "b-s*"},
            },
        ],
    }
    spec = tmp_path / "rows.yaml"
    spec.write_text(json.dumps(rows))  # JSON is YAML
    kept = {"epoch_s": 9.0, "peak_gib": 1.0}
    (tmp_path / "timings.json").write_text(json.dumps({"": kept}))
    calls: list[tuple[list[str], int]] = []

    def fake_timing(overrides, epochs):
        calls.append((overrides, epochs))
        return {"epoch_s": 400.0, "peak_gib": 2.0, "epochs": epochs - 1}

    monkeypatch.setattr(resolution_table, "timing", fake_timing)
    out = ["--output", str(tmp_path / "r.md"), "--plot", str(tmp_path / "r.png")]
    assert resolution_table.main([str(spec), "--time", *out]) == 0
    assert calls == [(["model.attention=softmax"], 2)]  # the kept row is not timed again
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert timings[""] == kept and timings["model.attention=softmax"]["epoch_s"] == 400.0
    text = (tmp_path / "r.md").read_text()
    assert "400.0 s †" in text and "9.0 s |" in text
    assert (tmp_path / "r.png").stat().st_size > 0  # a row timed, not trained: a dotted line
    calls.clear()
    assert resolution_table.main([str(spec), "--retime", *out]) == 0
    assert [overrides for overrides, _ in calls] == [[], ["model.attention=softmax"]]
