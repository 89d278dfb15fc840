"""DataLoaders for training, evaluation and inference: how many workers, and errors from them.

A scan that fails inside a DataLoader worker would reach the main process as PyTorch's
"Caught ... in DataLoader worker process 0" and the worker's whole traceback. `ScanDataset`
returns the failure as an item instead, `collate` keeps it whole, and `batches` raises it in the
main process as the same one-line `VolumetricError` a single process gives.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from torch.utils.data import default_collate

from volumetric.errors import VolumetricError

MAX_AUTO_WORKERS = 8


@dataclass(frozen=True)
class LoadingOptions:
    """How the scans of an evaluation or inference are read and shown: ``cache`` (disk, memory
    or none; volumetric/data/cache.py) in ``cache_dir`` (None: the default place),
    ``num_workers`` loading processes (auto or a count, see `resolve_workers`) and progress bars.
    Training takes the first three from its config (train.cache, train.num_workers)."""

    cache: str = "disk"
    cache_dir: str | Path | None = None
    num_workers: int | str = "auto"
    progress: bool = True


DEFAULT_LOADING = LoadingOptions()


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


T = TypeVar("T")
R = TypeVar("R")


def read_in_threads(read: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[read(item) for item in items]`` over up to 8 threads: for reads of headers and
    sidecars, which wait on the file system, not on a CPU."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, available_cpus()))) as pool:
        return list(pool.map(read, items))


def resolve_workers(setting: int | str) -> int:
    """``auto``: one worker per CPU beyond the first (which the model's matrix products use), at
    most 8, so that reading and resampling overlap with the step; but none on a machine of two
    CPUs or fewer, where a worker takes a core from the matrix products and costs more than it
    saves (docs/benchmarks.md, data pipeline)."""
    if setting == "auto":
        cpus = available_cpus()
        return 0 if cpus <= 2 else min(MAX_AUTO_WORKERS, cpus - 1)
    return int(setting)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """default_collate, unless an item is a failure: then the batch is that failure."""
    for item in items:
        if "error" in item:
            return item
    return default_collate(items)


def batches(loader: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The loader's batches; a failed scan raises its VolumetricError here, in the main process."""
    for batch in loader:
        if "error" in batch:
            raise VolumetricError(batch["error"])
        yield batch


def loader_options(num_workers: int, pin_memory: bool) -> dict[str, Any]:
    """DataLoader keyword arguments shared by every loader of the package."""
    options: dict[str, Any] = dict(
        num_workers=num_workers, pin_memory=pin_memory, collate_fn=collate
    )
    if num_workers > 0:
        # workers start with the dataset as it is (fork), stay for the next epoch, and read ahead
        options.update(persistent_workers=True, prefetch_factor=2)
    return options
