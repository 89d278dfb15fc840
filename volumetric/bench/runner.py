"""Runs benchmark cases, each in its own subprocess, with time and memory caps.

A case past a cap is recorded with its reason, never left out: predicted over the memory cap
(skipped before it runs), over the time cap (killed), or predicted over the time cap from the
previous size of the same series (skipped).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Result:
    spec: dict[str, Any]
    median_s: float | None = None
    peak_bytes: float | None = None
    flops_per_s: float | None = None
    reps: int = 0
    status: str = "ok"  # ok, or why there is no measurement
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run_case(spec: dict[str, Any], *, timeout_s: float, threads: int | None = None) -> Result:
    """Run ``spec`` in ``python -m volumetric.bench.worker``; a crash or timeout becomes the status."""
    spec = dict(spec, **({"threads": threads} if threads else {}))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "volumetric.bench.worker", json.dumps(spec)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return Result(spec, status=f"over time cap ({timeout_s:.0f} s)")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        killed = done.returncode < 0 or "out of memory" in done.stderr.lower()
        return Result(spec, status=("out of memory" if killed else "failed") + f": {last[:120]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return Result(
        spec,
        median_s=out["median_s"],
        peak_bytes=out["peak_bytes"],
        flops_per_s=out["flops_per_s"],
        reps=out["reps"],
        extra={"warmup_s": out["warmup_s"], "flops": out["flops"]},
    )


def run_series(
    specs: list[dict[str, Any]],
    *,
    timeout_s: float,
    memory_cap_bytes: float,
    predicted_bytes,
    growth,
    threads: int | None = None,
) -> list[Result]:
    """Run specs of one series in increasing size; predict and skip what cannot fit the caps.

    ``predicted_bytes(spec)`` estimates peak memory before running; ``growth(prev, spec)`` is the
    factor by which time grows from the previous spec (N² for softmax, N for linear attention).
    """
    results: list[Result] = []
    previous: Result | None = None
    for spec in specs:
        need = predicted_bytes(spec)
        if need > memory_cap_bytes:
            result = Result(
                spec,
                status=f"skipped: needs ~{need / 2**30:.0f} GiB > cap {memory_cap_bytes / 2**30:.0f} GiB",
            )
        elif previous is not None and not previous.ok:
            result = Result(spec, status="skipped: a smaller size already hit a cap")
        elif previous is not None and previous.median_s * growth(previous.spec, spec) > timeout_s:
            guess = previous.median_s * growth(previous.spec, spec)
            result = Result(
                spec, status=f"skipped: predicted {guess:.0f} s > cap {timeout_s:.0f} s"
            )
        else:
            # the worker does a warm-up and at least one timed repetition: allow for both
            result = run_case(spec, timeout_s=timeout_s * 3, threads=threads)
        log.info(
            "%s  %s",
            json.dumps(spec),
            result.status if not result.ok else f"{result.median_s:.4f} s",
        )
        results.append(result)
        previous = result
    return results
