"""volumetric-bench: cases run and are measured, caps are reported instead of silently dropped, and the
report carries every target."""

from __future__ import annotations

import pytest

from volumetric.bench.cases import attention_flops, model_flops
from volumetric.bench.report import markdown
from volumetric.bench.runner import Result, run_series
from volumetric.bench.suite import ATTENTION_ORDER, SuiteSettings, ratios
from volumetric.bench.worker import measure


@pytest.mark.parametrize("variant", ATTENTION_ORDER)
def test_attention_case_runs_and_counts_flops(variant):
    spec = {"kind": "attention", "variant": variant, "tokens": 128, "heads": 2, "head_dim": 8}
    out = measure(spec, min_reps=2, max_reps=2, budget_s=5.0)
    assert out["median_s"] > 0 and out["reps"] >= 2
    assert out["flops"] == attention_flops(variant, 1, 2, 128, 8)


def test_single_step_case_and_model_flops():
    spec = {
        "kind": "train_step",
        "model": "seqnorm",
        "checkpointing": True,
        "memory_lean": True,
        "single": True,
        "volume": [16, 16, 8],
        "patch": 4,
        "dim": 24,
        "depth": 1,
        "heads": 2,
    }
    out = measure(spec)
    assert out["reps"] == 1 and out["median_s"] > 0
    assert out["flops"] == model_flops(
        tokens=32, dim=24, depth=1, mlp_ratio=4.0, patch_voxels=64, attention="seqnorm", num_heads=2
    )


def test_quadratic_flops_grow_quadratically():
    assert attention_flops("softmax_sdpa", 1, 1, 2048, 8) == 4 * attention_flops(
        "softmax_sdpa", 1, 1, 1024, 8
    )
    assert attention_flops("seqnorm", 1, 1, 2048, 8) == 2 * attention_flops(
        "seqnorm", 1, 1, 1024, 8
    )


def test_series_marks_what_does_not_fit():
    specs = [{"kind": "matmul", "size": n} for n in (32, 64, 4096)]
    results = run_series(
        specs,
        timeout_s=60,
        memory_cap_bytes=1e6,
        predicted_bytes=lambda s: 12 * s["size"] ** 2,
        growth=lambda prev, spec: (spec["size"] / prev["size"]) ** 3,
    )
    assert [r.ok for r in results] == [True, True, False]
    assert results[2].status.startswith("skipped: needs")


def _result(spec, seconds, peak=1.0, flops_per_s=1.0):
    return Result(spec, median_s=seconds, peak_bytes=peak, flops_per_s=flops_per_s, reps=3)


def test_ratios_and_report():
    s = SuiteSettings(quick=True)
    att = [
        _result({"kind": "attention", "variant": v, "tokens": n}, t, peak=p)
        for v, n, t, p in [
            ("seqnorm", 16384, 0.05, 10),
            ("softmax_sdpa", 16384, 4.0, 20),
            ("seqnorm", 65536, 0.3, 11),
            ("bare_qktv", 65536, 0.2, 10),
        ]
    ]
    base = {"kind": "train_step", "patch": 8, "volume": 128}
    steps = [
        _result({**base, "model": "seqnorm", "checkpointing": False}, 1.0, flops_per_s=50.0),
        _result({**base, "model": "monai_vit"}, 30.0),
    ]
    matmul = [_result({"kind": "matmul", "size": 64}, 1.0, flops_per_s=100.0)]
    results = {"matmul": matmul, "attention": att, "train_step": steps}
    values = {name.split(":")[-1].strip(): value for name, value, _ in ratios(results, s)}
    assert values["softmax SDPA time / seqnorm time"] == pytest.approx(80.0)
    assert values["seqnorm time / bare Q(KᵀV) time"] == pytest.approx(1.5)
    assert values["seqnorm peak memory / bare Q(KᵀV) peak memory"] == pytest.approx(1.1)
    assert values["MONAI ViT (SDPA) time / volumetric time"] == pytest.approx(30.0)
    assert values["model FLOP/s / measured fp32 matmul peak"] == pytest.approx(0.5)
    results["attention"] += [
        Result({"kind": "attention", "variant": v, "tokens": n}, status="over time cap (8 s)")
        for v in ATTENTION_ORDER
        for n in s.tokens
        if not any(r.spec["variant"] == v and r.spec["tokens"] == n for r in att)
    ]
    text = markdown(results, ratios(results, s), s, "volumetric-bench --quick")
    assert (
        "over time cap (8 s)" in text and ">= 50" in text and "<= 1.1" in text and ">= 0.60" in text
    )


def test_missing_measurement_is_reported_not_invented():
    s = SuiteSettings(quick=True)
    results = {
        "matmul": [Result({"kind": "matmul"}, status="failed")],
        "attention": [],
        "train_step": [],
    }
    assert all(value is None for _, value, _ in ratios(results, s))
