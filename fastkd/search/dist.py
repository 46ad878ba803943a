"""Spreading a search over ranks (torchrun or the deepspeed launcher).

Every rank runs the same deterministic search; rank 0 alone reads and writes the store and the
outputs. What rank 0 read is broadcast, each rank evaluates its slice of the missing candidates with
its own teacher copy, and the results are all-gathered, so every rank's GA sees the same fitness
values and proposes the same next generation. One rank (no launcher) needs no process group at all.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


class Comm:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.started_group = False
        if torch.cuda.is_available():
            # Before the process group: object collectives and "cuda" both mean this rank's own GPU.
            torch.cuda.set_device(self.local_rank % torch.cuda.device_count())
        if self.world > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            # Evaluating a slice can take long: the default 10-minute collective timeout is too short.
            dist.init_process_group(backend=backend, timeout=timedelta(hours=6))
            self.started_group = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    def broadcast(self, obj):
        """rank 0's object on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self, ok: bool = True) -> None:
        """After a failure no barrier: the other ranks are inside some other collective, and waiting
        would hang until the timeout. Exiting lets the launcher tear the job down at once."""
        if self.started_group and dist.is_initialized():
            if ok:
                dist.barrier()
            dist.destroy_process_group()
