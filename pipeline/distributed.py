"""Several processes of one stage under torchrun: which rank owns the stage folder, and how the others follow it.

torchrun starts one process per device and tells each its global rank and the world size (RANK, WORLD_SIZE,
LOCAL_RANK in the environment). Only `stage=train` runs that way (pipeline/cli.py refuses the other stages under
torchrun). There, rank 0 owns the stage folder: the lock, the skip decision, the evaluation before and after,
the saved model, the manifest and `_COMPLETE`. The other ranks build the same (seeded) data set, train in step
with it, and wait for its word at two points:

1. the decision: ``skip`` (the folder is complete), ``train`` (with the checkpoint every rank resumes from), or
   ``error`` (rank 0 failed before training: each rank stops with rank 0's message and exit code 2);
2. after training (every rank has left the trainer: no process writes into the folder any more), the outcome:
   ``done`` once `_COMPLETE` is written, or ``error``.

The messages travel as JSON bytes over a CPU (gloo) group of their own, with a long timeout, so the followers can
wait out rank 0's evaluation of the model before training (an hour at MS MARCO scale) whatever the training backend;
nothing is ever unpickled. If rank 0 dies instead of failing cleanly, torchrun stops the other ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

from pipeline.artifacts import StageError

log = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 12 * 3600  # followers wait this long for rank 0 (its evaluation before training, its save)


def world_size() -> int:
    """Processes in this job: torch.distributed's when it is initialised, else torchrun's WORLD_SIZE, else 1."""
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    return max(1, int(os.environ.get("WORLD_SIZE") or 1))


def local_world_size() -> int:
    """Processes of this job on this node (torchrun's LOCAL_WORLD_SIZE, else 1): they share its cores."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1))


def rank() -> int:
    """This process's global rank (0 when not launched by torchrun)."""
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    return int(os.environ.get("RANK") or 0)


def backend_for(device: str) -> str:
    """nccl for CUDA training, gloo on CPU (what accelerate would pick)."""
    import torch

    return "nccl" if str(device).startswith("cuda") and torch.cuda.is_available() else "gloo"


class FollowerError(StageError):
    """Rank 0 failed; a follower stops with its message."""


class Coordinator:
    """Rank 0 speaks, the other ranks listen (see the module docstring). With one process every call is a no-op."""

    def __init__(self, rank: int = 0, world: int = 1, group: Any = None):
        self.rank, self.world, self.group = rank, world, group
        self.followers_waiting = world > 1 and rank == 0  # the followers start by waiting for the decision

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def tell(self, action: str, **fields: Any) -> None:
        """Rank 0: send {action, ...} to every other rank (which waits for it in `listen`)."""
        if self.world == 1:
            return
        if not self.leader:
            raise RuntimeError("only rank 0 tells the other ranks what to do")
        self._broadcast({"action": action, **fields})
        self.followers_waiting = False

    def listen(self) -> dict[str, Any]:
        """The other ranks: rank 0's next message; its error becomes this rank's FollowerError."""
        message = self._broadcast(None)
        if message.get("action") == "error":
            raise FollowerError(f"rank 0 failed, so rank {self.rank} stops too: {message.get('message')}")
        return message

    def training_done(self) -> None:
        """Every rank, after its trainer returned: from here on no rank but 0 touches the stage folder, and the
        other ranks wait for rank 0's last message."""
        if self.world == 1:
            return
        import torch.distributed as dist

        dist.barrier(group=self.group)
        self.followers_waiting = self.leader

    def _broadcast(self, message: dict[str, Any] | None) -> dict[str, Any]:
        import torch
        import torch.distributed as dist

        size = torch.zeros(1, dtype=torch.int64)
        payload = b""
        if self.leader:
            payload = json.dumps(message, default=str).encode("utf-8")
            size[0] = len(payload)
        dist.broadcast(size, src=0, group=self.group)
        data = torch.zeros(int(size[0]), dtype=torch.uint8)
        if self.leader:
            data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        dist.broadcast(data, src=0, group=self.group)
        return json.loads(bytes(data.tolist()).decode("utf-8"))


@contextlib.contextmanager
def coordinator(device: str = "cpu") -> Iterator[Coordinator]:
    """One process: a no-op Coordinator. Under torchrun: the default process group (gloo on CPU, nccl on CUDA,
    created here unless accelerate already did) plus a gloo group for the messages. When rank 0 fails while the
    others wait for it, they are told (and stop with its message) before the error propagates."""
    world = world_size()
    if world == 1:
        yield Coordinator()
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = backend_for(device)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK") or 0))
        dist.init_process_group(backend=backend)
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=CONTROL_TIMEOUT_S))
    coord = Coordinator(dist.get_rank(), dist.get_world_size(), group)
    try:
        yield coord
    except BaseException as exc:
        if coord.leader and coord.followers_waiting:
            with contextlib.suppress(Exception):
                coord.tell("error", message=f"{type(exc).__name__}: {exc}")
        raise
    # every rank got here (rank 0's last message was received): tear the groups down together
    with contextlib.suppress(Exception):
        dist.barrier(group=group)
        dist.destroy_process_group()


def quiet_followers(rank_: int) -> None:
    """Ranks other than 0 log warnings and errors only (rank 0 reports the stage)."""
    if rank_ != 0:
        logging.getLogger("pipeline").setLevel(logging.WARNING)
