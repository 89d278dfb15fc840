"""Several processes, one run: the process group that torchrun asks for, and the few collectives
the training loop needs.

torchrun (``python -m torch.distributed.run``) starts one process per GPU and gives each the
environment variables WORLD_SIZE, RANK and LOCAL_RANK. `distributed_session` reads them, joins the
process group (NCCL on CUDA, gloo on the CPU), puts each process on ``cuda:LOCAL_RANK`` and leaves
the group on the way out, whatever happens. Launched without torchrun, it changes nothing and every
helper below is the identity (or a no-op), so the single-process path stays exactly as it was.

Collectives must be called by every process, in the same order: a helper that only some ranks
reach blocks the others. The training loop therefore reduces its stop decisions (a signal, a NaN
loss) instead of acting on what one process saw.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from volumetric.device import resolve_device
from volumetric.errors import VolumetricError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among ``size`` processes, and its rank on its own node."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise VolumetricError(
            f"environment variable {name}={value!r} is not an integer (set by torchrun)"
        ) from None


def world_from_env() -> World:
    """The World that torchrun describes in WORLD_SIZE, RANK and LOCAL_RANK (one process without them)."""
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if size < 1 or not 0 <= rank < size or local_rank < 0:
        raise VolumetricError(
            f"inconsistent torchrun environment: WORLD_SIZE={size}, RANK={rank}, LOCAL_RANK={local_rank}"
        )
    return World(rank=rank, local_rank=local_rank, size=size)


def current_world() -> World:
    """The joined process group if there is one, else what the environment says."""
    if dist.is_available() and dist.is_initialized():
        return World(
            rank=dist.get_rank(),
            local_rank=_env_int("LOCAL_RANK", dist.get_rank()),
            size=dist.get_world_size(),
        )
    return world_from_env()


def is_main() -> bool:
    """True in the process that writes files and prints (rank 0, or the only process)."""
    return current_world().is_main


def process_device(name: str, world: World) -> torch.device:
    """The device of this process: ``name`` resolved as usual, but ``cuda:LOCAL_RANK`` when several
    processes share CUDA (one GPU each; an explicit index in ``name`` is overridden)."""
    device = resolve_device(name)
    if device.type != "cuda" or not world.distributed:
        return device
    if world.local_rank >= torch.cuda.device_count():
        raise VolumetricError(
            f"process with LOCAL_RANK={world.local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
            "start at most that many processes per node (torchrun --nproc_per_node)"
        )
    if device.index is not None and device.index != world.local_rank:
        log.warning(
            "device %s ignored: under torchrun each process uses cuda:LOCAL_RANK (here cuda:%d)",
            device,
            world.local_rank,
        )
    return torch.device("cuda", world.local_rank)


@contextmanager
def distributed_session(device_name: str = "auto") -> Iterator[tuple[World, torch.device]]:
    """Join the process group torchrun describes (if any) for the duration of the block.

    Yields (world, device). A group that the caller initialized already is used as it is and left
    open; one this function opened is destroyed in a ``finally``.
    """
    already = dist.is_available() and dist.is_initialized()
    world = current_world()
    device = process_device(device_name, world)
    if not world.distributed or already:
        if device.type == "cuda" and world.distributed:
            torch.cuda.set_device(device)
        yield world, device
        return
    if not dist.is_available():
        raise VolumetricError("WORLD_SIZE > 1, but this PyTorch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device)
    else:
        dist.init_process_group(backend)
    log.info(
        "process %d of %d (local rank %d) on %s, backend %s",
        world.rank,
        world.size,
        world.local_rank,
        device,
        backend,
    )
    try:
        yield world, device
        dist.barrier()  # leave together, not while another process still talks to this one
    finally:
        gc.collect()  # DDP's reducer holds on to the group from inside reference cycles: free it first
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ collectives


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    """Where tensors must be for the group's backend: the current GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every process gets here (no-op in a single process)."""
    if _active():
        dist.barrier()


def _all_reduce(
    values: Sequence[float] | torch.Tensor, op: dist.ReduceOp.RedOpType
) -> torch.Tensor:
    tensor = torch.as_tensor(values, dtype=torch.float64).detach().reshape(-1)  # (k,)
    if not _active():
        return tensor.cpu()
    tensor = tensor.to(_comm_device())
    dist.all_reduce(tensor, op=op)
    return tensor.cpu()


def all_reduce_sum(values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Elementwise sum over the processes, in float64 on the CPU: (k,) → (k,)."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def all_reduce_max(values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Elementwise maximum over the processes, in float64 on the CPU: (k,) → (k,)."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every process's ``tensor``, in rank order, on the CPU; the first dimension may differ between
    processes (the rest must not): (n_r, *rest) on rank r → [(n_0, *rest), (n_1, *rest), ...]."""
    tensor = tensor.detach()
    if not _active():
        return [tensor.cpu()]
    device = _comm_device()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], dtype=torch.int64, device=device))
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    # (max n_r, *rest)
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor.to(device)
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return [g[:n].cpu() for g, n in zip(gathered, counts)]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's picklable ``obj``, in rank order ([obj] in a single process)."""
    if not _active():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
