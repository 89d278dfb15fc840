"""Training under torchrun: two CPU processes (gloo) must give one run folder, a plain checkpoint, whole-set
validation metrics, agreed stops on a signal or a NaN, and exact resumption; the sampler shards an epoch."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_dataset

from volumetric.checkpoint import load_checkpoint
from volumetric.cli import infer_main, train_main
from volumetric.data.loading import LoadingOptions
from volumetric.data.sampler import EpochSampler, strided_shard
from volumetric.engine.distributed import (
    all_gather,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    distributed_session,
)
from volumetric.evaluation.evaluate import evaluate_checkpoint

CONFIG = {
    "model": {"patch_size": 4, "embed_dim": 24, "depth": 2, "num_heads": 2},
    "data": {"spacing": 1.5, "target_shape": [16, 16, 16]},
    "augment": [{"RandomFlip": {"axes": [0]}}],
    # per process: 8 of the 15 training scans (one repeated to fill the shard) in 4 batches, 2 optimizer steps
    "train": {"epochs": 2, "batch_size": 2, "grad_accum_steps": 2, "device": "cpu"},
}
TIMEOUT = 240  # a run takes about 15 s; a deadlock would hang until this

# train_main, after making the loss of one process NaN, or sending it SIGTERM, at its n-th training batch
FAULTY_TRAIN = """
import os, signal, sys
import torch
from volumetric.cli import train_main

fault, rank, call = os.environ["FAULT"].split(":")
if os.environ["RANK"] == rank:
    forward, calls = torch.nn.CrossEntropyLoss.forward, []

    def faulty(self, *args):
        calls.append(1)
        loss = forward(self, *args)
        if len(calls) == int(call):
            if fault == "nan":
                return loss * float("nan")
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    torch.nn.CrossEntropyLoss.forward = faulty
raise SystemExit(train_main(sys.argv[1:]))
"""


REPO = Path(__file__).resolve().parents[2]


def torchrun(*args: str, cwd: Path, fault: str = "") -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` (a free port is picked by the rendezvous)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "FAULT": fault}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *args,
    ]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )


def train_args(data: dict[str, Path], run: Path, *extra: str) -> list[str]:
    return [
        str(data["train"]),
        "--val",
        str(data["val"]),
        "--output-dir",
        str(run),
        "--no-progress",
        *extra,
    ]


def metric_rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """15 training scans and 5 validation scans (neither a multiple of the 2 processes), and the config."""
    root = tmp_path_factory.mktemp("ddp")
    tiny = make_tiny_dataset(root / "tiny")
    for label, n_val in (("healthy", 2), ("lesion", 3)):
        for i, scan in enumerate(sorted((tiny / label).iterdir())):
            target = root / ("val" if i < n_val else "train") / label
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(scan, target / scan.name)
    (root / "tiny.yaml").write_text(yaml.safe_dump(CONFIG))
    return {
        "root": root,
        "train": root / "train",
        "val": root / "val",
        "config": root / "tiny.yaml",
    }


@pytest.fixture(scope="module")
def ddp_run(data: dict[str, Path]) -> tuple[Path, subprocess.CompletedProcess]:
    """One finished 2-epoch run on 2 processes, launched as a module: ``torchrun -m volumetric train``."""
    run = data["root"] / "run"
    done = torchrun(
        "-m",
        "volumetric",
        "train",
        *train_args(data, run, "--config", str(data["config"])),
        cwd=data["root"],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return run, done


# ------------------------------------------------------------------------------------------------ no processes


@pytest.mark.parametrize("n", [1, 3, 15, 16])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_are_disjoint_and_cover_the_permutation(n, world):
    samplers = [EpochSampler(n, seed=5, num_replicas=world, rank=r) for r in range(world)]
    for sampler in samplers:
        sampler.epoch = 3
    order = samplers[0].order()
    shards = [s.shard() for s in samplers]
    assert all(
        len(shard) == len(s) == -(-n // world) for shard, s in zip(shards, samplers)
    )  # equal sizes
    interleaved = [shards[r][k] for k in range(len(shards[0])) for r in range(world)]
    assert (
        interleaved[:n] == order
    )  # rank::world of the permutation: together every item once, in order
    padding = interleaved[n:]
    assert len(padding) == -n % world and all(
        i in order for i in padding
    )  # only to even out the shards
    if n >= world:
        assert len(set(padding)) == len(padding)


def test_one_process_is_the_plain_permutation():
    sampler = EpochSampler(15, seed=0)
    sampler.epoch, sampler.start = 2, 6
    assert list(sampler) == sampler.order()[6:] and len(sampler) == 9


@pytest.mark.parametrize("world", [1, 2, 3])
def test_mid_epoch_start_continues_every_shard(world):
    """start = items done over all processes: each rank goes on from its own k-th item."""
    for k in range(6):
        for rank in range(world):
            fresh = EpochSampler(15, seed=1, num_replicas=world, rank=rank)
            resumed = EpochSampler(15, seed=1, num_replicas=world, rank=rank)
            resumed.start = k * world
            assert list(resumed) == list(fresh)[k:]


def test_strided_validation_shards_count_each_scan_once():
    for n, world in [(5, 2), (1, 3), (0, 2), (16, 4)]:
        shards = [strided_shard(n, r, world) for r in range(world)]
        assert sorted(i for shard in shards for i in shard) == list(range(n))


def test_helpers_without_torchrun_change_nothing(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with distributed_session("cpu") as (world, device):
        assert (world.size, world.rank, world.is_main, device.type) == (1, 0, True, "cpu")
        barrier()
        assert all_reduce_sum([1.5, 2]).tolist() == [1.5, 2.0]
        assert all_reduce_max([3]).tolist() == [3.0]
        rows = torch.arange(6).reshape(3, 2)
        assert len(all_gather(rows)) == 1 and torch.equal(all_gather(rows)[0], rows)


# ------------------------------------------------------------------------------------------------ two processes


@pytest.mark.slow  # `ddp_run`: a two-process torchrun run
def test_two_processes_write_one_run_folder(ddp_run):
    run, done = ddp_run
    names = {p.name for p in run.iterdir()}
    assert {"best.pt", "last.pt", "metrics.csv", "config.yaml", "report.html"} <= names
    assert not any(name.endswith(".tmp") for name in names)
    rows = metric_rows(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2]  # one row per epoch: written by rank 0 alone
    assert [int(r["step"]) for r in rows] == [
        2,
        4,
    ]  # 4 batches of 2 per process and epoch, 2 accumulated per step
    assert done.stdout.count("best epoch") == 1  # only rank 0 reports
    state = load_checkpoint(run / "last.pt")
    assert (
        state.epoch == 2 and state.training["world_size"] == 2 and state.training["partial"] is None
    )


@pytest.mark.slow  # `ddp_run`: a two-process torchrun run
def test_checkpoint_is_plain_and_infers(ddp_run, data, tmp_path):
    run, _ = ddp_run
    for name in ("best.pt", "last.pt"):
        state = load_checkpoint(run / name)
        assert not [
            k for k in state.weights if k.startswith("module.")
        ]  # the unwrapped model was saved
    output = tmp_path / "predictions.csv"
    assert (
        infer_main(
            [str(run / "best.pt"), str(data["val"]), "--output", str(output), "--no-progress"]
        )
        == 0
    )
    assert len(output.read_text().strip().splitlines()) == 1 + 5


@pytest.mark.slow  # `ddp_run`: a two-process torchrun run
def test_validation_covers_the_whole_set_once(ddp_run, data, tmp_path):
    """The epoch-2 validation metrics, gathered from the two shards (3 + 2 scans), equal volumetric.evaluation.evaluate
    on the validation folder with the weights saved after epoch 2: a scan counted twice, or missed, would show."""
    run, _ = ddp_run
    metrics = evaluate_checkpoint(
        run / "last.pt",
        data["val"],
        tmp_path / "eval",
        device="cpu",
        loading=LoadingOptions(progress=False),
    )
    assert metrics["num_scans"] == 5
    last = metric_rows(run)[-1]
    assert float(last["val_loss"]) == pytest.approx(metrics["loss"], abs=1e-5)
    for key in ("accuracy", "balanced_accuracy", "auroc"):
        assert float(last[f"val_{key}"]) == pytest.approx(metrics[key], abs=1e-6), key


@pytest.mark.slow  # `ddp_run`: a two-process torchrun run
def test_signal_to_one_process_stops_both_and_resume_is_exact(ddp_run, data, tmp_path):
    """SIGTERM reaches rank 1 alone, in epoch 2: both processes stop after the same optimizer step, rank 0 saves
    a mid-epoch last.pt, and resuming on 2 processes (the console script given to torchrun as a path) reaches
    the weights and losses of the run that was never stopped."""
    reference, _ = ddp_run
    script, run = tmp_path / "faulty_train.py", tmp_path / "run"
    script.write_text(FAULTY_TRAIN)
    # rank 1, epoch 2, batch 2: the optimizer step after it leaves 2 batches of the epoch to go
    stopped = torchrun(
        str(script),
        *train_args(data, run, "--config", str(data["config"])),
        cwd=tmp_path,
        fault="sigterm:1:6",
    )
    assert stopped.returncode != 0
    # rank 0 alone reports (at most once: torchrun may end it before it prints, once rank 1 has exited)
    assert stopped.stderr.count("stopped by signal 15 in epoch 2 after 2 batches") <= 1, (
        stopped.stderr[-3000:]
    )
    state = load_checkpoint(run / "last.pt")
    assert (
        state.epoch == 1
        and state.training["partial"]["batch"] == 2
        and len(state.training["partial"]["rngs"]) == 2
    )
    script_path = shutil.which("volumetric-train", path=str(Path(sys.executable).parent))
    launcher = [script_path] if script_path else ["-m", "volumetric", "train"]
    resumed = torchrun(*launcher, *train_args(data, run, "--resume"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final, expected = (
        load_checkpoint(run / "last.pt").weights,
        load_checkpoint(reference / "last.pt").weights,
    )
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert [r["train_loss"] for r in metric_rows(run)] == [
        r["train_loss"] for r in metric_rows(reference)
    ]


@pytest.mark.slow
def test_nan_on_one_process_stops_both(data, tmp_path):
    script = tmp_path / "faulty_train.py"
    script.write_text(FAULTY_TRAIN)
    done = torchrun(
        str(script),
        *train_args(data, tmp_path / "run", "--config", str(data["config"])),
        cwd=tmp_path,
        fault="nan:1:5",
    )  # rank 1, first batch of epoch 2
    assert done.returncode != 0  # and it returned at all: rank 0 did not wait forever for rank 1
    assert "training loss became nan at epoch 2, step 2" in done.stderr, done.stderr[-3000:]
    assert load_checkpoint(tmp_path / "run" / "last.pt").epoch == 1  # the last good state


@pytest.mark.slow  # `ddp_run`: a two-process torchrun run
def test_resume_on_one_process(ddp_run, data, tmp_path):
    """A 2-process run continues in a single process: one more epoch, schedule placed by the share done."""
    run = tmp_path / "run"
    shutil.copytree(ddp_run[0], run)
    assert train_main(train_args(data, run, "--resume", "--train.epochs=3")) == 0
    rows = metric_rows(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert int(rows[2]["step"]) == 4 + 4  # one process: 15 scans in 8 batches of 2, 2 per step
    assert float(rows[2]["lr"]) == pytest.approx(
        0.0, abs=1e-12
    )  # the cosine ends with the last epoch
    assert load_checkpoint(run / "last.pt").training["world_size"] == 1


@pytest.mark.slow  # two torchrun runs of two folds each
def test_folds_under_two_processes(data, tmp_path):
    """--folds under torchrun: every fold trained by both processes, one summary written and
    printed by rank 0; run again, the finished folds are skipped by both (no deadlock)."""
    run = tmp_path / "cv"
    argv = [
        "-m",
        "volumetric",
        "train",
        str(data["train"]),
        "--config",
        str(data["config"]),
        "--folds",
        "2",
        "--output-dir",
        str(run),
        "--no-progress",
        "--no-report",
    ]
    done = torchrun(*argv, cwd=data["root"])
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "folds.json").read_text())
    assert summary["folds"] == 2
    for fold in ("fold-1", "fold-2"):
        assert len(metric_rows(run / fold)) == 2  # both epochs, as one distributed run
        assert load_checkpoint(run / fold / "best.pt").epoch in (1, 2)
    reported = [line for line in done.stdout.splitlines() if line.startswith("accuracy over")]
    assert len(reported) == 1  # rank 0 alone reports
    again = torchrun(*argv, cwd=data["root"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("done earlier") == 2  # rank 0 logs each skipped fold once
