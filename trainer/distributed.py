"""Data parallelism for one training job: `torchrun --nproc-per-node N -m trainer ...`.

Every rank builds the same seeded global batch and takes its shard (rows rank, rank + N, ...);
the loss is normalised by the global number of target tokens and the prompt's gradient is
summed over ranks, so each step is the single-process step on the same global batch (up to
float rounding). Every rank then applies the same update and the same trust-region
projection. Only rank 0 evaluates, selects, reports progress and publishes; what it decides
(stop early, cancelled) is broadcast so all ranks leave the loop together.

The process group is gloo on CPU and NCCL on CUDA, set up from torchrun's environment.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# The other ranks wait in a collective while rank 0 evaluates; a long validation (generation on
# a real model) must not trip the group's timeout (gloo 30 min, NCCL 10 min by default).
GROUP_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where collectives run (NCCL needs CUDA tensors)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, rows: list) -> list:
        return rows[self.rank :: self.world]

    def sum(self, value: float) -> float:
        """`value` summed over ranks."""
        if not self.distributed:
            return float(value)
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return float(tensor.item())

    def sum_(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over ranks in place."""
        if self.distributed:
            moved = tensor.to(self.device)
            dist.all_reduce(moved)
            tensor.copy_(moved)

    def decide(self, flag: bool) -> bool:
        """Rank 0's `flag`, on every rank."""
        if not self.distributed:
            return flag
        tensor = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(tensor, src=0)
        return bool(tensor.item())


def current() -> Ranks:
    """This process's place in the process group (rank 0 of 1 when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def init_from_environment() -> Ranks:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a no-op otherwise. With CUDA,
    each rank takes the GPU of its LOCAL_RANK (its `device`) and the group uses NCCL."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return current()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible): "
                "start at most one process per GPU"
            )
        torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl", timeout=GROUP_TIMEOUT, device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group(backend="gloo", timeout=GROUP_TIMEOUT)
    ranks = current()
    logger.info("rank %d of %d (%s)", ranks.rank, ranks.world, dist.get_backend())
    return ranks


@contextmanager
def process_group() -> Iterator[Ranks]:
    """This process's ranks (init_from_environment) for the block, and the group left after it.

    When the block returns, every rank first meets the others in a barrier: rank 0 still
    evaluates and publishes when the other ranks are done, and a rank that tears the group down
    while a peer is connected can be aborted by gloo ("terminate called without an active
    exception"). When it raises, nothing collective is attempted (a peer may be inside another
    collective): the process exits non-zero and torchrun stops the other ranks."""
    ranks = init_from_environment()
    yield ranks  # an exception propagates from here, past the teardown
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
