"""Training's data path end to end: the disk cache is filled before the first step and read after
it, workers change nothing in the weights, pre-flight finds bad scans first, a run killed while
writing the cache leaves nothing that breaks the next one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    assert_one_line_error,
    assert_same_weights,
    read_csv,
    train,
    train_stopped_in_epoch_2,
    weights,
    write_config,
    write_scan,
)

import volumetric.data.dataset as dataset_module
from volumetric.checkpoint import load_checkpoint
from volumetric.data.cache import summarize


def count_reads(monkeypatch, log: Path) -> None:
    """Record every scan read from its file, in this process and in forked DataLoader workers."""
    original = dataset_module.load_subject

    def recording(path, *args, **kwargs):
        with log.open("a") as handle:
            handle.write(f"{path}\n")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(dataset_module, "load_subject", recording)


@pytest.mark.slow
def test_disk_cache_with_workers_reads_each_scan_once(tiny_dataset, tmp_path, monkeypatch, capsys):
    """Pre-flight reads every scan once into the cache; the two epochs, in 2 workers, read none
    (and a second run with another config of the same preprocessing reads none either)."""
    cache, log = tmp_path / "cache", tmp_path / "reads.log"
    count_reads(monkeypatch, log)
    config = write_config(tmp_path / "tiny.yaml")
    flags = ["--train.num_workers=2", "--cache-dir", str(cache)]
    assert train(tiny_dataset, tmp_path / "run", config, *flags) == 0
    reads = log.read_text().splitlines()
    assert len(reads) == len(set(reads)) == 20  # every scan, once: in the pre-flight
    assert summarize(cache).entries == 20
    log.unlink()
    assert train(tiny_dataset, tmp_path / "again", config, *flags, "--train.lr=1e-4") == 0
    assert not log.exists()  # everything came from the cache
    summary = json.loads((tmp_path / "run" / "dataset_summary.json").read_text())
    assert summary["usable"] == 20 and summary["per_class"]["lesion"] == {
        "train": 8,
        "validation": 2,
    }
    assert summary["preprocessed_shape"] == {"min": [1, 16, 16, 16], "max": [1, 16, 16, 16]}


def test_another_spacing_builds_another_cache(tiny_dataset, tmp_path):
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "tiny.yaml")
    flags = ["--train.epochs=1", "--train.num_workers=0", "--cache-dir", str(cache)]
    assert train(tiny_dataset, tmp_path / "a", config, *flags) == 0
    assert summarize(cache).entries == 20
    assert train(tiny_dataset, tmp_path / "b", config, *flags, "--data.spacing=2.0") == 0
    assert summarize(cache).entries == 40  # rebuilt for the new spacing, the old ones untouched


@pytest.mark.slow
def test_same_seed_same_weights_with_and_without_workers(tiny_dataset_shared, tmp_path):
    config = write_config(tmp_path / "tiny.yaml")
    for workers in (0, 2):
        flags = [f"--train.num_workers={workers}", "--train.cache=memory"]
        assert train(tiny_dataset_shared, tmp_path / f"w{workers}", config, *flags) == 0
    assert_same_weights(weights(tmp_path / "w0" / "last.pt"), weights(tmp_path / "w2" / "last.pt"))


@pytest.mark.slow
def test_resume_with_workers_reaches_the_uninterrupted_weights(
    tiny_dataset_shared, tmp_path, monkeypatch, capsys
):
    config = write_config(tmp_path / "tiny.yaml")
    flags = ["--train.num_workers=2"]
    assert train(tiny_dataset_shared, tmp_path / "reference", config, *flags) == 0
    run = tmp_path / "run"
    stopped = train_stopped_in_epoch_2(monkeypatch, tiny_dataset_shared, run, config, *flags)
    assert stopped == 130
    assert load_checkpoint(run / "last.pt").epoch == 1
    assert train(tiny_dataset_shared, run, None, "--resume") == 0
    _, rows = read_csv(run / "metrics.csv")
    _, expected = read_csv(tmp_path / "reference" / "metrics.csv")
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in expected]
    assert_same_weights(weights(run / "last.pt"), weights(tmp_path / "reference" / "last.pt"))


def add_broken(data: Path, name: str = "broken.nii.gz") -> Path:
    bad = data / "lesion" / name
    values = np.ones((20, 18, 16), dtype=np.float32)
    values[3, 4, 5] = np.nan
    return write_scan(bad, values)


def test_a_bad_scan_stops_the_run_before_the_first_step(tiny_dataset, tmp_path, capsys):
    bad = add_broken(tiny_dataset)
    run = tmp_path / "run"
    assert train(tiny_dataset, run, write_config(tmp_path / "tiny.yaml")) == 2
    assert_one_line_error(capsys, "volumetric-train", str(bad), "NaN")
    assert not run.exists()  # nothing trained, nothing written


def test_several_bad_scans_are_all_listed(tiny_dataset, tmp_path, capsys, caplog):
    bad = [add_broken(tiny_dataset, f"broken{i}.nii.gz") for i in range(2)]
    (tiny_dataset / "healthy" / "text.nii").write_text("not a scan")
    assert train(tiny_dataset, tmp_path / "run", write_config(tmp_path / "tiny.yaml")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[-1]] and err[-1].startswith(
        "volumetric-train: error: 3 of 23 scans cannot be used"
    )
    listed = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]  # one line each
    expected = sorted(map(str, [tiny_dataset / "healthy" / "text.nii", *bad]))
    assert [line.split(": ")[0] for line in listed] == expected


def test_skip_leaves_bad_scans_out_and_lists_them(tiny_dataset, tmp_path):
    bad = add_broken(tiny_dataset)
    run = tmp_path / "run"
    config = write_config(tmp_path / "tiny.yaml")
    assert train(tiny_dataset, run, config, "--data.on_bad_scan=skip", "--train.epochs=1") == 0
    _, rows = read_csv(run / "skipped_scans.csv")
    assert [r["path"] for r in rows] == [str(bad)] and "NaN" in rows[0]["problem"]
    summary = json.loads((run / "dataset_summary.json").read_text())
    assert summary["scans"] == 21 and summary["usable"] == 20 and str(bad) in summary["unusable"]


def test_skip_still_refuses_a_class_without_scans(tmp_path, capsys):
    data = tmp_path / "data"
    for i in range(3):
        write_scan(
            data / "healthy" / f"h{i}.nii.gz", np.random.default_rng(i).normal(size=(20, 18, 16))
        )
    add_broken(data, "only.nii.gz")
    args = ["--data.on_bad_scan=skip", "--train.val_fraction=0"]
    assert train(data, tmp_path / "run", write_config(tmp_path / "tiny.yaml"), *args) == 2
    assert_one_line_error(capsys, "volumetric-train", "no usable training scan", "lesion")


KILL_WHILE_WRITING = """
import os, signal, sys
import numpy as np
calls = []
real_save = np.save
def save_then_die(handle, array, *args, **kwargs):
    calls.append(1)
    if len(calls) == 3:  # the third entry: half written, then the process dies
        handle.write(b"\\x93NUMPY half an entry")
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(handle, array, *args, **kwargs)
np.save = save_then_die
from volumetric.cli import train_main
sys.exit(train_main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_run_killed_while_writing_the_cache_leaves_it_usable(tiny_dataset, tmp_path):
    cache = tmp_path / "cache"
    config = write_config(tmp_path / "tiny.yaml")
    args = [str(tiny_dataset), "--output-dir", str(tmp_path / "killed"), "--config", str(config),
            "--cache-dir", str(cache), "--train.num_workers=0", "--no-progress"]  # fmt: skip
    killed = subprocess.run([sys.executable, "-c", KILL_WHILE_WRITING, *args], capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()
    assert summarize(cache).entries == 2  # two complete entries; the third never appeared
    assert list(cache.glob("volumes/*/.*.tmp"))  # its half-written temporary file is left
    assert train(tiny_dataset, tmp_path / "next", config, "--cache-dir", str(cache)) == 0
    assert summarize(cache).entries == 20


def test_a_cache_that_would_not_fit_is_refused_before_writing(
    tiny_dataset, tmp_path, monkeypatch, capsys
):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 5000, 5000))
    cache = tmp_path / "cache"
    args = ["--cache-dir", str(cache)]
    assert train(tiny_dataset, tmp_path / "run", write_config(tmp_path / "tiny.yaml"), *args) == 2
    # 20 scans of 16³ float16 voxels: 8 KiB each and a header
    assert_one_line_error(capsys, "volumetric-train", "the disk cache needs about", "20 scans")
    assert summarize(cache).entries == 0 and not (tmp_path / "run").exists()


def test_a_worker_failure_is_the_main_process_line(trained_run, tiny_dataset, tmp_path, capsys):
    """volumetric-evaluate has no pre-flight: a NaN scan fails inside a DataLoader worker and must
    still be one line, not PyTorch's 'Caught ... in DataLoader worker process' traceback."""
    from volumetric.cli import evaluate_main

    bad = add_broken(tiny_dataset)
    args = [str(trained_run / "best.pt"), str(tiny_dataset), "--output-dir", str(tmp_path / "e")]
    assert evaluate_main([*args, "--num-workers", "2", "--no-progress"]) == 2
    line = assert_one_line_error(capsys, "volumetric-evaluate", str(bad), "NaN")
    assert "Caught" not in line and "DataLoader" not in line
