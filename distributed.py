"""The process group of a torchrun job (or of one process, for FSDP2), and the one way out of it."""
import os
import sys
from contextlib import contextmanager

import torch.distributed as dist


@contextmanager
def process_group(world, device, needed=False):
    """The process group of a torchrun job, and the one way out of it: a torchrun worker ends here.

    Why it ends with os._exit: gloo's worker threads release each finished collective a moment after the caller
    has been woken. If the interpreter is already shutting down by then, the tensors' Python objects belong to
    that release, which needs the GIL; a finalizing interpreter answers by ending the thread, and the process
    aborts ("terminate called without an active exception", SIGABRT) after all its work is done. Joining those
    threads first is not possible: DDP and FSDP keep the process group, and so its threads, alive until the
    interpreter is torn down, and a barrier does not help either (its work holds the collectives still in
    flight when it started). So a clean exit (end, --stop-at, SIGTERM) meets every rank at a barrier, so that
    nobody leaves while a peer still waits, destroys the group and leaves without interpreter teardown.
    Everything the run writes is flushed or closed before this point. On an error there is no barrier (the
    other ranks would never reach it): the exception ends this rank, its peers' next collective fails on the
    closed connection, and torchrun reports this rank's error as the root cause."""
    if world == 1 and not needed:
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world == 1:  # FSDP2 on one process (--precision bf16) still wants a process group
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def broadcast(obj):
    """Rank 0's object on every rank (itself when there is one rank)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
