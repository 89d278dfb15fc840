"""volumetric-bench --gpu: every case of the plan builds and runs (shrunk, on the CPU), results land
one by one in the JSON-lines file and the report, the goals are computed from the measurements
(or say that they were not measured), and without CUDA the command is one line and status 2."""

from __future__ import annotations

import json

import pytest
import torch

from volumetric.bench import gpu
from volumetric.bench.cases import build
from volumetric.bench.runner import Result
from volumetric.cli import bench_main


def shrunk(spec: dict) -> dict:
    """The spec at a size a CPU runs in a moment, on the CPU, its kind and options kept."""
    small = dict(spec, device="cpu")
    if "tokens" in small:
        small["tokens"] = 96
    if small["kind"] == "train_step":
        small.update(volume=64, dim=16, depth=1, heads=2)  # 64³: DenseNet's smallest batch-1 grid
    if "shape" in small:
        small["shape"] = [32, 16, 24]
    return small


@pytest.mark.parametrize("case", gpu.plan(), ids=lambda c: json.dumps(c.spec, sort_keys=True))
def test_every_case_of_the_plan_builds_and_steps(case):
    spec = shrunk(case.spec)
    if spec.get("variant") == "softmax_sdpa":
        spec["sdpa"] = "math"  # flash and memory-efficient SDPA are CUDA kernels
    step, flops = build(spec, torch.device("cpu"))
    step()
    assert flops > 0


def test_the_most_important_cases_come_first():
    cases = gpu.plan()
    first = cases[0].spec
    assert (first["variant"], first["tokens"], first["dtype"]) == ("seqnorm", 65536, "bfloat16")
    sections = [c.section for c in cases]
    assert sections.index("volume") < sections.index("matmul")
    assert max(c.spec.get("tokens", 0) for c in cases) == 1048576
    assert cases[-1].spec["tokens"] == 1048576
    assert all(c.spec["device"] == "cuda" and c.timeout_s > 0 for c in cases)


def measured(spec: dict, seconds: float, peak_gib: float, flops: float = 1e12) -> Result:
    return Result(
        spec, median_s=seconds, peak_bytes=peak_gib * 2**30, flops_per_s=flops / seconds, reps=3
    )


def fake_run(spec: dict, *, timeout_s: float) -> Result:
    """Made-up measurements with known ratios: kernel 1.2× the bare product in bf16, a failure
    for the float32 bare product, the patch-4 step at 40% of the matrix product."""
    if spec["kind"] == "attention":
        if spec["variant"] == "bare_qktv" and spec["dtype"] == "float32":
            return Result(spec, status="out of memory: CUDA out of memory")
        seconds = {"seqnorm": 1.2, "bare_qktv": 1.0}.get(spec["variant"], 2.0)
        return measured(spec, seconds, 1.0)
    if spec["kind"] == "matmul":
        return measured(spec, 1.0, 0.5, flops=500e12)
    seconds = {"densenet121": 0.5, "monai_vit": 2.0}.get(spec["model"], 0.25)
    flops = 100e12 if spec["patch"] == 4 and spec["model"] == "seqnorm" else 1e12
    return measured(spec, seconds, 30.0, flops=flops * seconds)


def test_results_land_one_by_one_and_the_goals_follow_them(tmp_path):
    cases = gpu.plan()
    jsonl = tmp_path / "b-gpu.jsonl"
    seen: list[int] = []
    done = gpu.run_plan(cases, jsonl, lambda so_far: seen.append(len(so_far)), run=fake_run)
    assert seen == list(range(1, len(cases) + 1))
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [line["spec"] for line in lines] == [c.spec for c in cases]
    assert lines[0]["median_s"] == 1.2 and lines[0]["section"] == "attention"

    goals = {what: value for what, value, _ in gpu.goals(done)}
    bf16, fp32, peak, mfu, vs_densenet = goals.values()
    assert bf16 == pytest.approx(1.2)
    assert fp32 is None  # the bare product failed: no ratio is invented
    assert peak == pytest.approx(30.0)
    assert mfu == pytest.approx(100e12 / 500e12)
    assert vs_densenet == pytest.approx(0.5 / 0.25)

    text = gpu.markdown(done, "volumetric-bench --gpu", len(cases))
    assert f"{len(cases)} of {len(cases)} cases measured" in text
    assert "out of memory: CUDA out of memory" in text and "not measured" in text
    assert "| seq-norm ViT | patch 4 | 262,144 | no | train | 4 | 30.00 | 100.0 | 20% |" in text


def test_a_partial_run_reports_what_it_has(tmp_path):
    cases = gpu.plan()[:3]
    done = gpu.run_plan(cases, tmp_path / "p.jsonl", lambda _: None, run=fake_run)
    text = gpu.markdown(done, "volumetric-bench --gpu", 40)
    assert "3 of 40 cases measured" in text
    assert "bf16 matrix product: not measured" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_the_gpu_plan_is_one_line_and_status_2(tmp_path, capsys):
    assert bench_main(["--gpu", "--output", str(tmp_path / "b.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--gpu measures a CUDA device" in err
    assert not (tmp_path / "b.md").exists()
