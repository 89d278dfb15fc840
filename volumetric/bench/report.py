"""Benchmark output: a Markdown report (tables, machine, command) and a log-log plot."""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path
from typing import cast

import torch

from volumetric.atomic_files import atomic_path, atomic_write_text
from volumetric.bench.cases import tokens_of, volume_shape
from volumetric.bench.runner import Result
from volumetric.bench.suite import ATTENTION_ORDER, SuiteSettings


def machine_description(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return (
            f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
        )
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, float32"


def _time(r: Result) -> str:
    return f"{r.median_s:.4g}" if r.ok else r.status


def _mem(r: Result) -> str:
    peak = cast(float, r.peak_bytes)  # set when r.ok
    return f"{peak / 2**20:.0f}" if r.ok and not math.isnan(peak) else "–"


def format_ratio(value: float | None) -> str:
    if value is None:
        return "not measured"
    return f"{value:,.0f}" if value >= 1000 and float(value).is_integer() else f"{value:.3g}"


def markdown(results: dict[str, list[Result]], ratios, s: SuiteSettings, command: str) -> str:
    peak = results["matmul"][0]
    lines = [
        f"## {'Quick' if s.quick else 'Full'} run on {s.device}",
        "",
        f"- machine: {machine_description(s.device)}",
        f"- command: `{command}`",
        f"- measured float32 matmul peak: {cast(float, peak.flops_per_s) / 1e9:.1f} GFLOP/s"
        if peak.ok
        else f"- matmul: {peak.status}",
        f"- attention: batch 1, {s.heads} heads of width {s.head_dim}; training step: width {s.dim}, depth {s.depth}, "
        f"{s.heads} heads, patch {s.patch}, batch 1, AdamW",
        "- attention variants: seqnorm (Q, K and V normalized: the method), seqnorm_qk (Q and K "
        "only), sima (SimA), bare_qktv (Q(KᵀV) without normalization), seqnorm_unfused (seqnorm in "
        "plain autograd), softmax_sdpa, softmax_explicit (the N×N matrix formed)",
        "- times are medians over repetitions, each case in its own process; memory is the peak over the "
        "process's starting size (CPU: resident set; CUDA: allocated)",
        "",
        "### Targets",
        "",
        "| ratio | measured | target |",
        "|---|---|---|",
        *(f"| {name} | {format_ratio(value)} | {target} |" for name, value, target in ratios),
        "",
        "### Attention forward+backward (seconds, peak MiB)",
        "",
        "| tokens | " + " | ".join(ATTENTION_ORDER) + " |",
        "|---" * (len(ATTENTION_ORDER) + 1) + "|",
    ]
    by_key = {(r.spec["variant"], r.spec["tokens"]): r for r in results["attention"]}
    for n in s.tokens:
        cells = [
            f"{_time(by_key[v, n])} s, {_mem(by_key[v, n])} MiB"
            if by_key[v, n].ok
            else by_key[v, n].status
            for v in ATTENTION_ORDER
        ]
        lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Training step (forward, backward, AdamW)",
        "",
        "| model | volume | tokens | seconds | peak MiB | model TFLOP/s | of matmul peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results["train_step"] + results.get("scale", []):
        name = r.spec["model"] + (" + checkpointing" if r.spec.get("checkpointing") else "")
        name += " + memory-lean" if r.spec.get("memory_lean") else ""
        flops = cast(float, r.flops_per_s)  # set when r.ok, as peak's when peak.ok
        util = f"{flops / cast(float, peak.flops_per_s):.0%}" if r.ok and peak.ok else "–"
        tflops = f"{flops / 1e12:.3f}" if r.ok else "–"
        volume = "×".join(map(str, volume_shape(r.spec)))
        lines.append(
            f"| {name} | {volume}, patch {r.spec['patch']} | {tokens_of(r.spec):,} | {_time(r)} | {_mem(r)} "
            f"| {tflops} | {util} |"
        )
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, section: str, marker: str, title: str = "# Benchmarks") -> None:
    """Replace the section between ``<!-- marker -->`` lines of ``path`` (appending it if new; a new
    file starts with ``title``)."""
    begin, end = f"<!-- {marker} begin -->", f"<!-- {marker} end -->"
    old = path.read_text() if path.exists() else title + "\n"
    block = f"{begin}\n{section}{end}\n"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) + 1 :]
    else:
        new = old.rstrip("\n") + "\n\n" + block
    atomic_write_text(path, new)


def plot(results: dict[str, list[Result]], path: Path) -> None:
    """Log-log time and peak memory against tokens for each attention variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant in ATTENTION_ORDER:
        rows = [r for r in results["attention"] if r.spec["variant"] == variant and r.ok]
        if not rows:
            continue
        tokens = [r.spec["tokens"] for r in rows]
        ax_t.loglog(tokens, [r.median_s for r in rows], "o-", label=variant)
        ax_m.loglog(tokens, [cast(float, r.peak_bytes) / 2**20 for r in rows], "o-", label=variant)
    ax_t.set(xlabel="tokens N", ylabel="forward+backward seconds (median)", title="attention time")
    ax_m.set(xlabel="tokens N", ylabel="peak MiB", title="attention memory")
    for ax in (ax_t, ax_m):
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
