"""Device and numeric precision: CUDA when present, autocast on CUDA only by default.

On a CPU, float32 is the fast path (bfloat16 matmuls are far slower there), so ``precision: auto``
means float32 on CPU and bf16 (or fp16 where bf16 is unsupported) autocast on CUDA. The seq-norm
attention keeps its statistics and reductions in float32 under any autocast
(docs/method.md#mixed-precision).
"""

from __future__ import annotations

import contextlib
import logging

import torch

from volumetric.errors import VolumetricError

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' → the first CUDA device if there is one, else the CPU; an unavailable device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise VolumetricError(
            f"device {name!r} is not a valid torch device (auto, cpu, cuda, cuda:1, ...)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VolumetricError(
            f"device {name!r} was asked for but CUDA is not available on this machine"
        )
    return device


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain float32."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision not in _DTYPES:
        raise VolumetricError(f"precision {precision!r} is not one of auto, fp32, bf16, fp16")
    dtype = _DTYPES[precision]
    if dtype is not None and device.type == "cpu":
        log.warning(
            "precision %s on the CPU is much slower than fp32 here; use it only to test autocast",
            precision,
        )
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast for ``dtype``, or a no-op for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def keep_cpu_memory_for_reuse() -> bool:
    """Make glibc keep freed memory for reuse, as PyTorch's CUDA caching allocator does on the GPU.

    By default glibc serves every allocation above 32 MiB with a fresh mmap and returns it on free,
    so each (N, C) activation of a long token sequence is page-faulted in anew, every step: a large
    share of a step's time at whole-volume sizes. The price of reuse is fragmentation: freed blocks
    are not handed back, and the heap can grow well past the live set. So training turns it on only
    when the model runs without checkpointing and memory-lean blocks, the settings chosen for speed
    rather than size. ``VOLUMETRIC_CPU_ALLOCATOR=system`` keeps glibc's defaults always; ``=reuse``
    forces reuse. Returns whether it applied. (Measured: docs/method.md#the-cpu-allocator.)
    """
    import ctypes
    import os
    import sys

    if os.environ.get("VOLUMETRIC_CPU_ALLOCATOR") == "system" or not sys.platform.startswith(
        "linux"
    ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...)
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters from <malloc.h>
    # -1 reads as SIZE_MAX inside glibc: never trim
    return bool(libc.mallopt(m_trim_threshold, -1) and libc.mallopt(m_mmap_max, 0))


def configure_cpu_allocator(*, memory_saving: bool) -> bool:
    """Reuse freed CPU memory unless the run chose memory-saving settings (see above)."""
    import os

    if memory_saving and os.environ.get("VOLUMETRIC_CPU_ALLOCATOR") != "reuse":
        return False
    return keep_cpu_memory_for_reuse()
