"""Runs one benchmark case in a fresh process and prints one JSON line with its measurements.

    python -m volumetric.bench.worker '{"kind": "attention", "variant": "seqnorm", "tokens": 16384, ...}'

A process of its own makes the peak memory real: on CUDA it is ``max_memory_allocated``; on the
CPU it is the resident-set high-water mark (VmHWM, reset after the warm-up through
/proc/self/clear_refs) minus the resident size before the case allocated anything.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from volumetric.bench.cases import build
from volumetric.device import configure_cpu_allocator


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(spec: dict, *, min_reps: int = 3, max_reps: int = 10, budget_s: float = 2.0) -> dict:
    device = torch.device(spec.get("device", "cpu"))
    if "threads" in spec:
        torch.set_num_threads(spec["threads"])
    cuda = device.type == "cuda"
    base_rss = _status_kib("VmRSS") * 1024
    step, flops = build(spec, device)

    def timed() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    # a scale case: one step, first-call costs included; the peak is what matters
    if spec.get("single"):
        reset = _reset_peak_rss()
        seconds = timed()
        peak: float = (
            torch.cuda.max_memory_allocated(device)
            if cuda
            else _status_kib("VmHWM") * 1024 - base_rss
        )
        return {
            "median_s": seconds,
            "reps": 1,
            "warmup_s": 0.0,
            "peak_bytes": peak if cuda or reset else float("nan"),
            "flops": flops,
            "flops_per_s": flops / seconds,
        }
    warmup = timed()  # first call: allocator, kernels, lazy initialisation
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    reset = _reset_peak_rss()
    times: list[float] = []
    reps = min_reps if warmup * min_reps < budget_s else 1
    while len(times) < reps or (sum(times) < budget_s and len(times) < max_reps):
        times.append(timed())
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _status_kib("VmHWM") * 1024 - base_rss if reset else float("nan")
    median = statistics.median(times)
    return {
        "median_s": median,
        "reps": len(times),
        "warmup_s": warmup,
        "peak_bytes": peak,
        "flops": flops,
        "flops_per_s": flops / median,
    }


def main() -> int:
    spec = json.loads(sys.argv[1])
    # as training does: every case runs under the allocator policy a user's run gets
    configure_cpu_allocator(
        memory_saving=spec.get("checkpointing", False) or spec.get("memory_lean", False)
    )
    print(json.dumps(measure(spec)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
