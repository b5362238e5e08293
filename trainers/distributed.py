"""The processes of a training run: one, or several under ``accelerate launch`` / ``torchrun``.

:class:`Processes` joins the process group through accelerate's :class:`~accelerate.PartialState` and offers
the few collective operations the loop needs (barrier, all-reduced sum and mean, broadcast of a Python
object, the DDP wrapper and its ``no_sync``). With one process every operation is the identity.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

__all__ = ["Processes", "leave_process_group"]


class Processes:
    """The processes of a run through accelerate's :class:`~accelerate.PartialState`, which joins the process
    group; gradients are synchronised by DDP.

    Deliberately not :class:`~accelerate.Accelerator`: its mixed-precision setting is process-global and an
    earlier user of it in the same process (e.g. a Hugging Face ``Trainer``) would silently change ours.

    Args:
        cpu: run on the CPU (gloo) even where CUDA is present.
    """

    def __init__(self, cpu: bool) -> None:
        from accelerate import PartialState

        self.state = PartialState(cpu=cpu)
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.is_main = self.state.is_main_process

    def wait(self) -> None:
        """Barrier across the processes."""
        if self.world > 1:
            self.state.wait_for_everyone()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduced mean of ``t`` (``t`` itself with one process)."""
        if self.world > 1:
            t = t.clone()
            torch.distributed.all_reduce(t)
            t /= self.world
        return t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduced sum of ``t`` (``t`` itself with one process)."""
        if self.world > 1:
            t = t.clone()
            torch.distributed.all_reduce(t)
        return t

    def broadcast(self, obj: Any) -> Any:
        """The main process's ``obj`` on every process."""
        if self.world == 1:
            return obj
        holder = [obj]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``module`` under DDP when there are several processes."""
        if self.world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    def no_sync(self, module: nn.Module) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient all-reduce (micro-batches before the last of a step)."""
        return module.no_sync() if self.world > 1 else contextlib.nullcontext()


def leave_process_group(clean: bool = True) -> None:
    """Leave the process group, if this process joined one: a last barrier (when ``clean``, so that no process
    leaves while another still talks to it) and ``destroy_process_group``.

    A process that exits still in a gloo group can abort (SIGABRT, "terminate called without an active
    exception") when the interpreter tears down gloo's worker threads, failing a run whose training finished.
    Call it once the process is done with collectives, e.g. at the end of a training script; pass
    ``clean=False`` when leaving on an error, where the other processes may never reach the barrier.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()
