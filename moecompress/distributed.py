"""One run over many processes: this process's rank, the world size, and the few collectives a run needs.

A compress run launched by ``torchrun --nproc-per-node N -m moecompress compress ...`` (or ``moecompress compress
--nproc N``, which starts the processes through torch's elastic launcher) runs in N processes, the *ranks*. Each
rank runs the layer forward on its share of the calibration batches (data parallel); statistics and Hessians are
summed across ranks; each rank solves the experts it owns (expert parallel) and the results are shared. This module
is the only place that talks to :mod:`torch.distributed`: the process group (NCCL for CUDA devices, gloo otherwise),
the ownership rule (contiguous blocks) and collectives on tensors and small Python objects.

A process that was not launched that way is a *world of one*: every collective returns its input unchanged and
every index is owned by rank 0, so a one-process run goes through exactly the same code.

Exactness: a sum over ranks adds the ranks' partial sums in another order than one process adds its batches. The
accumulators that are summed are therefore integers or float64 (each rank's per-batch terms are computed exactly as
one process computes them, in the same batches), so the float32 value a consumer reads is the same in both runs
unless float64 rounding lands within one float64 unit of a float32 rounding boundary (see README, "Scale-out").
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Environment variables the launchers (torchrun, torch's elastic agent) set for every worker process.
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Minutes a rank waits in a collective for the others (a slow rank, a long shard write) before the run fails.
TIMEOUT_VARIABLE = "MOECOMPRESS_RANK_TIMEOUT_MINUTES"
DEFAULT_TIMEOUT_MINUTES = 60.0

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


@dataclass(frozen=True)
class World:
    """This process's place in the run. ``device``: where collectives run (``cuda:LOCAL_RANK`` under NCCL, else
    the CPU); a world of one has ``size == 1`` and never calls torch.distributed."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the report, the run state and the checkpoint index."""
        return self.rank == 0

    # ----- ownership ---------------------------------------------------------------------------------------------
    def blocks(self, count: int) -> list[range]:
        """``count`` items split into ``size`` contiguous blocks, rank ``r`` owning ``blocks(count)[r]`` (sizes
        differ by at most one; with ``count < size`` the last ranks own nothing)."""
        return [range(rank * count // self.size, (rank + 1) * count // self.size) for rank in range(self.size)]

    def owned(self, count: int) -> range:
        """The block of ``count`` items this rank owns."""
        return self.blocks(count)[self.rank]

    def owner(self, index: int, count: int) -> int:
        """The rank that owns item ``index`` of ``count``."""
        return next(rank for rank, block in enumerate(self.blocks(count)) if index in block)

    # ----- tensors -----------------------------------------------------------------------------------------------
    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Combine ``tensor`` over every rank in place (``op``: ``sum`` or ``max``); returns it."""
        if self.size > 1:
            with _on_comm_device(tensor, self.device) as comm:
                dist.all_reduce(comm, op=_OPS[op])
        return tensor

    def reduce_to_(self, tensor: torch.Tensor, owner: int, op: str = "sum") -> torch.Tensor:
        """Combine ``tensor`` over every rank into ``owner``'s copy (the others' copies are left unspecified)."""
        if self.size > 1:
            with _on_comm_device(tensor, self.device) as comm:
                dist.reduce(comm, dst=owner, op=_OPS[op])
        return tensor

    def broadcast_tensors(self, tensors: list[torch.Tensor] | None, source: int) -> list[torch.Tensor]:
        """``source``'s list of tensors on every rank (the others pass None). One object broadcast of the shapes and
        dtypes, then one byte buffer; the receivers get them on the collectives' device (CPU under gloo, the rank's
        GPU under NCCL)."""
        if self.size == 1:
            return list(tensors or [])
        specs = [(tuple(t.shape), t.dtype) for t in tensors] if self.rank == source else None
        specs = self.broadcast_object(specs, source)
        sizes = [_numel(shape) * torch.empty(0, dtype=dtype).element_size() for shape, dtype in specs]
        if self.rank == source:
            flat = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8).to(self.device) for t in tensors]) \
                if tensors else torch.zeros(0, dtype=torch.uint8, device=self.device)
        else:
            flat = torch.empty(sum(sizes), dtype=torch.uint8, device=self.device)
        dist.broadcast(flat, src=source)
        if self.rank == source:
            return list(tensors)
        result, offset = [], 0
        for (shape, dtype), size in zip(specs, sizes):
            result.append(flat[offset:offset + size].view(dtype).reshape(shape).clone())
            offset += size
        return result

    # ----- Python objects ----------------------------------------------------------------------------------------
    def broadcast_object(self, value, source: int = 0):
        """``source``'s ``value`` (any picklable object) on every rank."""
        if self.size == 1:
            return value
        box = [value if self.rank == source else None]
        dist.broadcast_object_list(box, src=source, device=self.device)
        return box[0]

    def all_gather_objects(self, value) -> list:
        """Every rank's ``value``, in rank order."""
        if self.size == 1:
            return [value]
        gathered = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        """Wait until every rank reaches this point."""
        if self.size > 1:
            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()


class _on_comm_device:
    """Context manager: ``tensor`` itself when it already lives on the collectives' device, else a copy there that is
    written back on exit (NCCL reduces CUDA tensors only; statistics accumulate on the CPU)."""

    def __init__(self, tensor: torch.Tensor, device: torch.device) -> None:
        self.tensor, self.device = tensor, device
        self.copy = tensor if tensor.device == device and tensor.is_contiguous() else None

    def __enter__(self) -> torch.Tensor:
        if self.copy is None:
            self.copy = self.tensor.detach().to(self.device).contiguous()
            self.copied = True
        else:
            self.copied = False
        return self.copy

    def __exit__(self, *exc) -> None:
        if self.copied and exc[0] is None:
            self.tensor.copy_(self.copy)


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


# ----- this process's world ----------------------------------------------------------------------------------------
_WORLD = World()


def current_world() -> World:
    """The world this process belongs to (a world of one unless :func:`init_world` joined a process group)."""
    return _WORLD


def launched_size() -> int:
    """The world size a launcher asked for (``WORLD_SIZE``; 1 when the process was started plainly)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def backend_for(device: torch.device | str | None) -> str:
    """NCCL for CUDA devices, gloo for the CPU (and anything else)."""
    return "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"


def rank_device(device: torch.device | str | None, local_rank: int, device_count: int | None = None) -> torch.device | None:
    """The compute device of the rank with ``local_rank`` on its node: ``cuda`` becomes ``cuda:LOCAL_RANK`` (one GPU
    per rank); CPU (or None) stays. Raises ValueError when the node has fewer GPUs than ranks on it."""
    if device is None:
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count() if device_count is None else device_count
    if local_rank >= count:
        raise ValueError(f"rank with local rank {local_rank} needs its own GPU, but this node has {count}; start at "
                         f"most {count} processes per node (--nproc / torchrun --nproc-per-node)")
    return torch.device("cuda", local_rank)


def init_world(device: torch.device | str | None = None) -> World:
    """Join the process group the launcher described in the environment (``RANK``, ``WORLD_SIZE``, ...) with the
    backend the compute device needs, once per process; a plainly started process stays a world of one."""
    global _WORLD
    if _WORLD.size > 1 or launched_size() == 1:
        return _WORLD
    backend = backend_for(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    comm_device = torch.device("cpu")
    if backend == "nccl":
        comm_device = rank_device(device, local_rank)
        torch.cuda.set_device(comm_device)
    if not dist.is_initialized():
        minutes = float(os.environ.get(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT_MINUTES))
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=minutes))
    _WORLD = World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank, backend=backend,
                   device=comm_device)
    return _WORLD


def set_world(world: World) -> World:
    """Make ``world`` this process's world (tests, and callers that built their own process group)."""
    global _WORLD
    _WORLD = world
    return world


def shutdown_world() -> None:
    """Leave the process group (the end of a run); the process is a world of one again."""
    global _WORLD
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _WORLD = World()


def is_communication_error(error: BaseException) -> bool:
    """Did ``error`` come from a collective whose peer went away (another rank failed first)?"""
    names = {type(error).__name__, *(cls.__name__ for cls in type(error).__mro__)}
    if names & {"DistBackendError", "DistNetworkError", "DistError"}:
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(marker in text for marker in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "[gloo", "NCCL error", "ProcessGroup"))


__all__ = ["World", "backend_for", "current_world", "init_world", "is_communication_error", "launched_size",
           "rank_device", "set_world", "shutdown_world"]
