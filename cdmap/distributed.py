"""Jobs under ``torchrun``: the process group and the few collective steps that training and predict need.

With one process (no ``WORLD_SIZE`` > 1) every helper is a no-op, so callers use them unconditionally. A
collective that fails because another rank died (gloo notices a closed connection at once) or stopped
answering (the process group's timeout) raises :class:`cdmap.errors.RankError`, one line naming the step.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed

from cdmap.errors import RankError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 7200.0  # how long a rank waits for the others at a collective step


@dataclass
class Dist:
    """This process's place in the job; ``created`` when this process made the process group (and ends it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    created: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @contextmanager
    def _step(self, what: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as exc:  # gloo/nccl errors (DistBackendError is a RuntimeError)
            raise RankError(f"rank {self.rank} of {self.world}: another rank failed or stopped answering "
                            f"during {what} ({_short(exc)})") from exc

    def barrier(self, what: str = "a barrier") -> None:
        if self.world > 1:
            with self._step(what):
                torch.distributed.barrier()

    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm running statistics)."""
        if self.world > 1:
            with self._step("a buffer broadcast"):
                for buf in model.buffers():
                    torch.distributed.broadcast(buf, 0)

    def sum(self, *tensors: torch.Tensor) -> None:
        """All-reduce (sum) ``tensors`` in place."""
        if self.world > 1:
            with self._step("an all-reduce"):
                for t in tensors:
                    torch.distributed.all_reduce(t)

    def gather(self, obj: Any, what: str = "a gather") -> list[Any]:
        """``obj`` of every rank, in rank order."""
        if self.world <= 1:
            return [obj]
        out: list[Any] = [None] * self.world
        with self._step(what):
            torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any, what: str = "a broadcast") -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world <= 1:
            return obj
        box = [obj]
        with self._step(what):
            torch.distributed.broadcast_object_list(box, 0)
        return box[0]

    def main_first(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on rank 0 and hand its result, or its :class:`~cdmap.errors.CdmapError`, to every rank.

        Every rank then raises the same error, so a refusal on rank 0 (outputs exist, resume mismatch) stops
        the whole job with one message instead of leaving the other ranks waiting.
        """
        from cdmap.errors import CdmapError

        result: Any = None
        failure: tuple[str, int] | None = None
        if self.main:
            try:
                result = fn()
            except CdmapError as exc:
                if self.world <= 1:
                    raise
                failure = (str(exc), exc.exit_code)
                self.broadcast((failure, None), what)
                raise
        sent = self.broadcast((failure, result), what)
        if sent[0] is not None:
            err = CdmapError(sent[0][0])  # rank 0's message and exit code
            err.exit_code = sent[0][1]
            raise err
        return sent[1]

    def close(self) -> None:
        if self.created and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _short(exc: BaseException) -> str:
    """The gist of a backend error: its first sentence, without gloo's source-file prefix."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". ")[0][:160]


def world_size() -> int:
    """The number of processes ``torchrun`` started (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device_name: str, backend: str | None = None, timeout_s: float | None = None) -> Dist:
    """Join (or create) the process group that ``torchrun`` describes.

    ``backend`` defaults to nccl on CUDA and gloo on CPU; ``timeout_s`` bounds every collective step, so a
    rank that stopped answering fails the others with :class:`~cdmap.errors.RankError` instead of a hang.
    """
    world = world_size()
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name not in ("cpu",)
        if use_cuda and local_rank < torch.cuda.device_count():
            torch.cuda.set_device(local_rank)
        timeout = datetime.timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
        try:
            dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), timeout=timeout)
        except RuntimeError as exc:
            raise RankError(f"cannot join the torchrun job ({str(exc).strip()[:200]})") from exc
        created = True
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, created=created)
