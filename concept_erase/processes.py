"""Several processes for the work that is only generation: `accelerate launch ... concept-erase eval|sample|attack`.

Launched with `accelerate launch --num_processes N`, every process loads the model once and draws its share
of the images (whole batches, dealt round-robin, so each image comes out of the same batch as in one process:
the same pixels, the same numbers); the main process alone decides about the output folder, scores, and
writes reports. Not launched, this is one process and every call here is a no-op.

Accelerate's `PartialState` sets up the process group (NCCL on GPUs, gloo on CPUs) and says which GPU is
this process's.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import Callable, Sequence, TypeVar

from concept_erase.errors import UserError

T = TypeVar("T")


class Processes:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.state = None
        self.rank = 0
        if self.world > 1:
            import torch
            from accelerate import PartialState
            from accelerate.utils import parse_flag_from_env

            # as Accelerator does: without a GPU (or with ACCELERATE_USE_CPU=1) the processes meet over gloo;
            # a bare PartialState() there quietly makes each process a world of its own
            cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()
            self.state = PartialState(cpu=cpu)
            close_at_exit()
            self.rank = self.state.process_index
            self.world = self.state.num_processes

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world > 1

    def device(self, asked: str = "") -> str:
        """This process's device: the one asked (cuda means this process's GPU when launched), else the GPU
        Accelerate gives it, else cuda or cpu."""
        import torch

        if self.state is not None and (not asked or asked == "cuda"):
            return str(self.state.device)
        return asked or ("cuda" if torch.cuda.is_available() else "cpu")

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def decide(self, fn: Callable[[], T]) -> T:
        """`fn()` on the main process, its result (or its UserError) on every process."""
        if self.state is None:
            return fn()
        from accelerate.utils import broadcast_object_list

        box: list = [None]
        if self.main:
            try:
                box[0] = ("ok", fn())
            except UserError as err:
                box[0] = ("error", str(err))
            except BaseException as err:  # the others must not wait forever for an answer
                box[0] = ("error", f"the main process failed: {type(err).__name__}: {err}")
                broadcast_object_list(box, from_process=0)
                raise
        broadcast_object_list(box, from_process=0)
        kind, value = box[0]
        if kind == "error":
            raise UserError(value)
        return value

    def gather_rows(self, mine: list[int], rows, per_item: int, items: int):
        """Every process's share of a tensor, `per_item` rows per item, put back in item order on every process."""
        import torch
        from accelerate.utils import gather_object

        pieces = gather_object([(mine, rows)])
        out = [None] * items
        for indices, tensor in pieces:
            for k, i in enumerate(indices):
                out[i] = tensor[k * per_item:(k + 1) * per_item]
        return torch.cat(out)

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's items: every `world`-th one, from its rank."""
        return list(items[self.rank::self.world])


_processes: Processes | None = None


def processes() -> Processes:
    global _processes
    if _processes is None:
        _processes = Processes()
    return _processes


def close() -> None:
    """Shut this process's process group down, if it has one. Local: no message to the others, so it cannot
    wait on one that is gone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_close_registered = False


def close_at_exit() -> None:
    """A launched process shuts its process group down when Python exits, before the interpreter's teardown.
    Left to the teardown, the group's threads can outlive it: ranks of two-process CPU runs that had finished
    their work aborted at exit with "terminate called without an active exception" (seen in the suite's two-rank
    tests, one launched through the command, one a script calling `erase`; their reruns passed)."""
    global _close_registered
    if not _close_registered:
        atexit.register(close)
        _close_registered = True


def leave(code: int) -> int:
    """The exit of a command-line process. A process launched as one of several (WORLD_SIZE > 1) shuts its
    process group down and ends here, without the interpreter's teardown: there, threads of the group's
    transport could still be destroyed while joinable, and a rank whose work was all written aborted with
    "terminate called without an active exception", failing the launch (seen on loaded two-core machines,
    rarely). Every output is written and closed before this point; the streams are flushed. A single
    process returns `code` to its caller."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return code
    close()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def peer_lost(err: BaseException) -> bool:
    """A collective failed because another rank is gone (gloo/NCCL say it in several ways)."""
    text = str(err).lower()
    return any(w in text for w in ("connection closed", "connection reset", "broken pipe", "peer", "timed out",
                                   "timeout", "nccl", "gloo"))
