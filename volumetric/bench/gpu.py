"""The GPU plan (``volumetric-bench --gpu``): the seq-norm kernel and whole-CT training on one GPU.

The cases run in the order of their importance, so that a run cut short (a lent GPU is often
lent for minutes) keeps what matters most; each case has its own time limit, and each result
is appended to a JSON-lines file and the report rewritten as it lands.

1. attention forward+backward at 65,536 tokens, bfloat16 then float32: the kernel (Triton),
   the kernel's PyTorch path, the bare Q(KᵀV) product, and softmax SDPA (flash in bfloat16,
   memory-efficient in float32);
2. whole 256³ volumes (a CT resampled to about 1.5 mm), bf16 autocast as training uses on CUDA:
   a training step and an inference for the seq-norm ViT at patch 8, MONAI DenseNet121 at full
   resolution and MONAI's ViT (SDPA) at patch 8; the seq-norm ViT at patch 4 (262,144 tokens)
   without and with gradient checkpointing, and a bf16 matrix product of the shape of its first
   MLP layer, the reference its model FLOP utilization is measured against; patch 8 with
   checkpointing;
3. attention at 16,384 and 262,144 tokens, as in 1;
4. attention at 1,048,576 tokens: the kernel in both types, the bare product in bfloat16.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

from volumetric.atomic_files import atomic_write_text
from volumetric.bench.cases import tokens_of
from volumetric.bench.report import format_ratio, machine_description, write_markdown
from volumetric.bench.runner import Result, run_case

HEADS, HEAD_DIM = 8, 32
VIT = {"dim": 256, "depth": 6, "heads": HEADS}  # the CPU suite's ViT
CT_VOLUME = 256
ATTENTION_VARIANTS = ["seqnorm", "seqnorm_torch", "bare_qktv", "softmax_sdpa"]
SDPA_FOR = {"bfloat16": "flash", "float32": "efficient"}
MARKER = "gpu-cuda"


@dataclasses.dataclass(frozen=True)
class Case:
    section: str  # "attention", "volume" or "matmul"
    spec: dict[str, Any]
    timeout_s: float


def _attention(tokens: int, dtype: str, variants: list[str] = ATTENTION_VARIANTS) -> list[Case]:
    cases = []
    for variant in variants:
        spec = {
            "kind": "attention",
            "variant": variant,
            "tokens": tokens,
            "heads": HEADS,
            "head_dim": HEAD_DIM,
            "dtype": dtype,
            "device": "cuda",
        }
        if variant == "softmax_sdpa":
            spec["sdpa"] = SDPA_FOR[dtype]
        cases.append(Case("attention", spec, timeout_s=60.0 if tokens <= 65536 else 150.0))
    return cases


def _volume(model: str, patch: int, mode: str, checkpointing: bool = False) -> Case:
    spec = {
        "kind": "train_step",
        "model": model,
        "volume": CT_VOLUME,
        "patch": patch,
        "mode": mode,
        "precision": "bf16",
        "checkpointing": checkpointing,
        "device": "cuda",
        **VIT,
    }
    return Case("volume", spec, timeout_s=150.0)


def mlp_matmul_shape(patch: int) -> list[int]:
    """(M, K, N) of the ViT's first MLP layer on a 256³ volume: tokens × width × 4·width."""
    tokens = (CT_VOLUME // patch) ** 3
    return [tokens, VIT["dim"], 4 * VIT["dim"]]


def plan() -> list[Case]:
    cases = _attention(65536, "bfloat16") + _attention(65536, "float32")
    for mode in ("train", "infer"):
        cases += [_volume(m, 8, mode) for m in ("seqnorm", "densenet121", "monai_vit")]
    cases += [
        _volume("seqnorm", 4, "train"),
        _volume("seqnorm", 4, "train", checkpointing=True),
        _volume("seqnorm", 4, "infer"),
        Case(
            "matmul",
            {"kind": "matmul", "shape": mlp_matmul_shape(4), "dtype": "bfloat16", "device": "cuda"},
            timeout_s=60.0,
        ),
        _volume("seqnorm", 8, "train", checkpointing=True),
    ]
    for tokens in (16384, 262144):
        cases += _attention(tokens, "bfloat16") + _attention(tokens, "float32")
    cases += _attention(1048576, "bfloat16", ["seqnorm", "bare_qktv"])
    cases += _attention(1048576, "float32", ["seqnorm"])
    return cases


def run_plan(
    cases: list[Case],
    jsonl: Path,
    on_result: Callable[[list[tuple[Case, Result]]], None],
    run: Callable[..., Result] = run_case,
) -> list[tuple[Case, Result]]:
    """Run ``cases`` one after another, each in its own process under its own timeout; append
    each result to ``jsonl`` and call ``on_result`` with all results so far as each lands."""
    done: list[tuple[Case, Result]] = []
    for case in cases:
        result = run(case.spec, timeout_s=case.timeout_s)
        done.append((case, result))
        with jsonl.open("a") as f:
            f.write(json.dumps({"section": case.section, **dataclasses.asdict(result)}) + "\n")
        on_result(done)
    return done


# ------------------------------------------------------------------------------------ the report


def _find(done: list[tuple[Case, Result]], **match: Any) -> Result | None:
    for _, r in done:
        if r.ok and all(r.spec.get(k, False) == v for k, v in match.items()):
            return r
    return None


def _ratio(a: Result | None, b: Result | None, field: str = "median_s") -> float | None:
    if a is None or b is None:
        return None
    return cast(float, getattr(a, field)) / cast(float, getattr(b, field))


def goals(done: list[tuple[Case, Result]]) -> list[tuple[str, float | None, str]]:
    """(what, measured, goal) for the GPU goals, from the cases measured so far."""
    out: list[tuple[str, float | None, str]] = []
    for dtype in ("bfloat16", "float32"):
        kernel = _find(done, variant="seqnorm", tokens=65536, dtype=dtype)
        bare = _find(done, variant="bare_qktv", tokens=65536, dtype=dtype)
        out.append(
            (
                f"attention fwd+bwd @65k tokens, {dtype}: kernel time / bare Q(KᵀV) time",
                _ratio(kernel, bare),
                "<= 1.3",
            )
        )
    p4 = _find(done, model="seqnorm", patch=4, mode="train", checkpointing=False)
    peak = _find(done, kind="matmul")
    out.append(
        (
            "training step @256³ patch 4 (262,144 tokens), no checkpointing: peak GiB",
            cast(float, p4.peak_bytes) / 2**30 if p4 else None,
            "<= 80",
        )
    )
    out.append(
        (
            "the same step: model FLOP/s / same-shape bf16 matrix product's FLOP/s",
            _ratio(p4, peak, "flops_per_s"),
            ">= 0.60",
        )
    )
    vit = _find(done, model="seqnorm", patch=8, mode="train", checkpointing=False)
    densenet = _find(done, model="densenet121", mode="train")
    out.append(
        (
            "training @256³: seq-norm ViT patch 8 scans/s / DenseNet121 scans/s",
            _ratio(densenet, vit),
            ">= 1",
        )
    )
    return out


def _cell(r: Result) -> str:
    if not r.ok:
        return r.status
    return f"{cast(float, r.median_s) * 1e3:.3g} ms, {cast(float, r.peak_bytes) / 2**20:,.0f} MiB"


def _attention_rows(done: list[tuple[Case, Result]]) -> Iterator[str]:
    by_key = {
        (r.spec["tokens"], r.spec["dtype"], r.spec["variant"]): r
        for c, r in done
        if c.section == "attention"
    }
    for tokens, dtype in sorted({key[:2] for key in by_key}):
        cells = [
            _cell(by_key[tokens, dtype, v]) if (tokens, dtype, v) in by_key else "–"
            for v in ATTENTION_VARIANTS
        ]
        yield f"| {tokens:,} | {dtype} | " + " | ".join(cells) + " |"


def _volume_rows(done: list[tuple[Case, Result]]) -> Iterator[str]:
    peak = _find(done, kind="matmul")
    for case, r in done:
        if case.section != "volume":
            continue
        s = r.spec
        name = {"seqnorm": "seq-norm ViT", "monai_vit": "MONAI ViT (SDPA)"}.get(
            s["model"], "MONAI DenseNet121"
        )
        grid = "full resolution" if s["model"] == "densenet121" else f"patch {s['patch']}"
        tokens = "–" if s["model"] == "densenet121" else f"{tokens_of(s):,}"
        ckpt = "yes" if s.get("checkpointing") else "no"
        if not r.ok:
            yield f"| {name} | {grid} | {tokens} | {ckpt} | {s['mode']} | {r.status} | | | |"
            continue
        flops = cast(float, r.flops_per_s)
        util = f"{flops / cast(float, peak.flops_per_s):.0%}" if peak else "–"
        yield (
            f"| {name} | {grid} | {tokens} | {ckpt} | {s['mode']} | {1 / cast(float, r.median_s):.3g} "
            f"| {cast(float, r.peak_bytes) / 2**30:.2f} | {flops / 1e12:.1f} | {util} |"
        )


def markdown(done: list[tuple[Case, Result]], command: str, total: int) -> str:
    peak = _find(done, kind="matmul")
    lines = [
        "## GPU run",
        "",
        f"- machine: {machine_description('cuda')}",
        f"- command: `{command}`, {datetime.date.today().isoformat()}; "
        f"{len(done)} of {total} cases measured",
        "- attention: batch 1, 8 heads of width 32, forward+backward, inputs in the named type; "
        "seqnorm is the kernel (Triton), seqnorm_torch its PyTorch path, softmax_sdpa flash "
        "in bfloat16 and memory-efficient in float32",
        f"- whole volumes: one {CT_VOLUME}³ volume, batch 1, bf16 autocast; ViTs of width "
        f"{VIT['dim']}, depth {VIT['depth']}, {VIT['heads']} heads; a training step is forward, "
        "backward and AdamW; times are medians, memory the peak allocated",
        (
            f"- bf16 matrix product {' × '.join(map(str, peak.spec['shape']))}: "
            f"{cast(float, peak.flops_per_s) / 1e12:.0f} TFLOP/s"
            if peak
            else "- bf16 matrix product: not measured"
        ),
        "",
        "### Goals",
        "",
        "| what | measured | goal |",
        "|---|---|---|",
        *(f"| {what} | {format_ratio(value)} | {goal} |" for what, value, goal in goals(done)),
        "",
        "### Attention forward+backward (median time, peak memory)",
        "",
        "| tokens | type | " + " | ".join(ATTENTION_VARIANTS) + " |",
        "|---" * (len(ATTENTION_VARIANTS) + 2) + "|",
        *_attention_rows(done),
        "",
        f"### Whole {CT_VOLUME}³ volumes",
        "",
        "| model | grid | tokens | checkpointing | mode | scans/s | peak GiB | model TFLOP/s "
        "| of the bf16 product |",
        "|---|---|---|---|---|---|---|---|---|",
        *_volume_rows(done),
    ]
    return "\n".join(lines) + "\n"


def run_and_report(output: Path, command: str) -> list[tuple[Case, Result]]:
    """The whole plan; the report (``output``'s GPU section) and ``output``-gpu.jsonl are
    rewritten after every case."""
    jsonl = output.with_name(output.stem + "-gpu.jsonl")
    atomic_write_text(jsonl, "")
    cases = plan()

    def report(done: list[tuple[Case, Result]]) -> None:
        write_markdown(output, markdown(done, command, len(cases)), MARKER)

    return run_plan(cases, jsonl, report)
