"""Data parallelism over documents through Accelerate: who am I, which documents are mine,
and collecting what every process scored on the main process.

One process per device, started by ``accelerate launch`` (any number of processes, GPUs and
nodes; gloo on CPU). Without a launcher everything degrades to a single process.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Sequence

import torch

logger = logging.getLogger(__name__)

# Ranks wait at barriers while the main process encodes audio and while the slowest rank finishes
# its share, which can take hours; a short collective timeout would kill healthy runs.
DEFAULT_TIMEOUT_HOURS = 24.0


def shard_by_length(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Indices of ``lengths`` per rank: longest first onto the least-loaded rank (ties: lowest
    rank, then input order), so every rank gets about the same number of frames. Deterministic:
    every rank computes the same assignment from the same list."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    load = [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for i in order:
        rank = min(range(world_size), key=lambda r: (load[r], r))
        shards[rank].append(i)
        load[rank] += lengths[i]
    return shards


@dataclass
class Dist:
    """The process group as the runner needs it (a thin layer over ``accelerate.PartialState``)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    state: Any = None  # accelerate's PartialState, or None for a process group the caller owns
    owns_group: bool = False  # close() leaves the process group (only when it was set up here)

    @classmethod
    def create(cls, device: str = "auto") -> "Dist":
        """Join the process group ``accelerate launch`` set up (or a single process without it)."""
        from accelerate import PartialState

        hours = float(os.environ.get("TTT_BENCH_DIST_TIMEOUT_HOURS", DEFAULT_TIMEOUT_HOURS))
        kwargs: dict[str, Any] = {"timeout": timedelta(hours=hours)}
        use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        if device == "cpu" or use_cpu or (device == "auto" and not torch.cuda.is_available()):
            kwargs["cpu"] = True  # gloo over CPU processes (accelerate needs to be told)
        state = PartialState(**kwargs)
        chosen = state.device if device == "auto" or state.num_processes > 1 else torch.device(device)
        if device not in ("auto", "cpu") and state.num_processes > 1:
            logger.warning("--device %s ignored under accelerate launch: process %d uses %s", device,
                           state.process_index, chosen)
        return cls(state.process_index, state.num_processes, chosen, state, owns_group=True)

    @classmethod
    def join(cls, device: torch.device, distributed: bool | None = None) -> "Dist":
        """The caller's already initialised ``torch.distributed`` group (never set up or torn down
        here), or this process alone when there is none or ``distributed`` is False."""
        group = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and not group:
            raise ValueError("distributed=True but torch.distributed is not initialised; call "
                             "torch.distributed.init_process_group first (or leave distributed unset)")
        if distributed is False or not group or torch.distributed.get_world_size() == 1:
            return cls(0, 1, torch.device(device))
        return cls(torch.distributed.get_rank(), torch.distributed.get_world_size(), torch.device(device))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if not self.distributed:
            return
        if self.state is not None:
            self.state.wait_for_everyone()
        else:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def local_main_first(self) -> Iterator[None]:
        """The main process of each node runs the block first (warming the node's code cache)."""
        if not self.distributed:
            yield
            return
        if self.state is not None:
            with self.state.local_main_process_first():
                yield
            return
        local_main = int(os.environ.get("LOCAL_RANK", self.rank)) == 0
        if not local_main:
            self.barrier()
        yield
        if local_main:
            self.barrier()

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on the main process (rank order); None elsewhere."""
        if not self.distributed:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Wait for every process, then leave the process group if it was set up here (an open
        gloo group aborts the interpreter at exit); a caller's group is left as it was."""
        if self.distributed and self.owns_group and torch.distributed.is_initialized():
            self.barrier()
            torch.distributed.destroy_process_group()

    def all_agree(self, obj: Any) -> Any:
        """Raise on every rank the main process's value if ranks disagree (they should not)."""
        values = self.gather(obj)
        mismatch = self.broadcast(values is not None and any(v != values[0] for v in values))
        if mismatch:
            raise RuntimeError("processes disagree on the document list; every process must see the same data")
        return obj
