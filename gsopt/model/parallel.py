"""Processes under torchrun: data-parallel replicas of tensor-parallel shards, joined in one
place.

`torchrun --nproc-per-node N -m gsopt ... --tp T` runs N / T replicas of the model, each
sharded T ways by FMS's tensor parallelism: ranks r*T .. r*T + T - 1 hold replica r's shards
(consecutive ranks, so a replica's shards share a node when T divides the processes per
node). Every command joins here first, before it loads anything; a model is then sharded
only when the loader is given this layout's tensor-parallel group, never because a process
group happens to exist.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gsopt.errors import GsoptError
from gsopt.runtime import resolve_device

# Ranks wait for the slowest at a corpus run's final barrier; torchrun ends every rank when
# one dies, so a long wait can only be a slow rank, never a dead one.
BARRIER_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class Layout:
    """This process's place: rank `rank` of `world`, in replicas of `tp` shards each."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    tp: int = 1
    tp_group: Any = field(default=None, compare=False)  # the replica's group when tp > 1

    @property
    def replica(self) -> int:
        return self.rank // self.tp

    @property
    def replicas(self) -> int:
        return self.world // self.tp

    @property
    def shard(self) -> int:
        return self.rank % self.tp

    @property
    def leader(self) -> bool:
        """Whether this rank speaks for its replica (writes its results): shard 0."""
        return self.shard == 0

    def device(self, name: str | None) -> torch.device:
        """`--device`, with a bare `cuda` (or the default on a CUDA machine) meaning this
        rank's own GPU, cuda:LOCAL_RANK."""
        device = resolve_device(name)
        if self.world > 1 and device.type == "cuda" and device.index is None:
            device = resolve_device(f"cuda:{self.local_rank}")
        return device

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def leave(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _env() -> tuple[int, int, int]:
    values = []
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        try:
            values.append(int(os.environ.get(name, default)))
        except ValueError:
            raise GsoptError(f"{name}={os.environ[name]!r} is not a number") from None
    rank, world, local_rank = values
    if not 0 <= rank < world:
        raise GsoptError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, local_rank


def join(tp: int = 1, device: str | None = None) -> Layout:
    """Join the process group torchrun set up (gloo on a CPU, nccl on CUDA) and make each
    replica's tensor-parallel group; one process, no torchrun: nothing to join."""
    rank, world, local_rank = _env()
    if tp < 1:
        raise GsoptError(f"--tp must be at least 1, got {tp}")
    if world % tp:
        raise GsoptError(
            f"--tp {tp}: run under torchrun with a multiple of {tp} processes, e.g. "
            f"torchrun --nproc-per-node {tp} -m gsopt ... --tp {tp} (this run has {world})"
        )
    layout = Layout(rank, world, local_rank, tp)
    if world == 1:
        return layout
    where = layout.device(device)
    if not dist.is_initialized():
        if where.type == "cuda":
            torch.cuda.set_device(where)
            dist.init_process_group("nccl", timeout=BARRIER_TIMEOUT, device_id=where)
        else:
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    group = None
    if tp > 1:  # every rank makes every group, in the same order, as new_group requires
        groups = [dist.new_group(list(range(r * tp, (r + 1) * tp))) for r in range(world // tp)]
        group = groups[layout.replica]
    return Layout(rank, world, local_rank, tp, group)


def add_argument(parser) -> None:
    """`--tp N`, as every command that can shard the decoder takes it."""
    parser.add_argument(
        "--tp",
        type=int,
        default=1,
        metavar="N",
        help="shard the decoder across N processes (FMS tensor parallelism); run under "
        "torchrun with a multiple of N processes (more: data-parallel replicas)",
    )
