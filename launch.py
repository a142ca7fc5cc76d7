"""How a process of ours starts and ends: which rank it is, torchrun's process group, SIGTERM and Ctrl-C as a request
to stop, and the ways out: a clean exit, or an error in one line (a bug in a traceback), named once under torchrun.

    python train.py ...          an error a user can cause or meet ends as `train.py: <what is wrong>`, exit status 1
    F2LLM_TRACEBACK=1 python ... the same with its traceback, for debugging
"""
import json
import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.distributed as dist

PEER_WAIT = 60  # seconds a rank whose peer failed waits for torchrun to stop it (it does within a second)


class UserError(RuntimeError):
    """An error a user can cause or meet (bad input, a flag, a full disk, a damaged file): its message says what is
    wrong and what to do, so it is all the user sees."""


class Process(NamedTuple):
    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def master(self):
        return self.rank == 0


def process():
    """This process as torchrun started it (RANK, LOCAL_RANK, WORLD_SIZE; one process without torchrun), and its device."""
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    return Process(rank, local_rank, world, torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"))


# ---- stopping: a signal finishes the step, every rank after the same one -----------------------------------------

_stop = [0]  # the signal that asked to stop


def stop_on_signals():
    """SIGTERM (preemption, scancel, a torchrun shutdown) and Ctrl-C ask the run to stop after its current step; a
    second Ctrl-C stops it at once. The request travels in the step's all-reduce (stop_requested), so every rank stops
    after the same step. Under torchrun, Ctrl-C reaches the workers as one SIGINT forwarded by torchrun."""
    def first(signum, frame):
        _stop[0] = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, again)
            os.write(2, b"Ctrl-C: finishing this step, then a checkpoint (Ctrl-C again stops at once)\n")  # no buffer: a handler
    def again(signum, frame):
        raise KeyboardInterrupt("stopped at once by a second Ctrl-C; --resume continues from the last checkpoint")
    signal.signal(signal.SIGTERM, first)
    signal.signal(signal.SIGINT, first)


def stop_requested():
    return float(_stop[0] != 0)


def exit_code():
    """0 after a clean end or SIGTERM; 128 + 2 after Ctrl-C, as a shell expects of an interrupted program."""
    return 128 + signal.SIGINT if _stop[0] == signal.SIGINT else 0


# ---- errors: one line for the user's, a traceback for bugs --------------------------------------------------------------

def run(main):
    """A program's entry point: main() ends the process with its exit status, or with its error as one line."""
    try:
        code = main()
    except BaseException as e:
        line = one_line(e)
        if line is None:
            if isinstance(e, SystemExit) and isinstance(e.code, str):  # a refusal, shown with its traceback (F2LLM_TRACEBACK)
                traceback.print_exc()
                sys.exit(1)
            if not isinstance(e, SystemExit):
                _record("".join(traceback.format_exception(e)))
            raise
        _exit(line, 128 + signal.SIGINT if isinstance(e, KeyboardInterrupt) else 1, leave=sys.exit)
    sys.exit(code or 0)


def one_line(error):
    """`program: message` for an error a user can cause or meet; None for a bug (or with F2LLM_TRACEBACK set)."""
    if os.environ.get("F2LLM_TRACEBACK"):
        return None
    if isinstance(error, SystemExit):
        message = None if error.code is None or isinstance(error.code, int) else str(error.code)
    elif isinstance(error, (UserError, KeyboardInterrupt)):
        message = str(error) or "interrupted"
    elif isinstance(error, torch.OutOfMemoryError):
        message = f"out of memory: {str(error).splitlines()[0]}; a smaller --chunk-size or --chunk-tokens (or eval.py --batch-size) fits"
    elif isinstance(error, OSError) and error.strerror:
        message = f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    else:
        return None
    return f"{os.path.basename(sys.argv[0])}: {message}\n" if message else None


# ---- the process group, and the ways out of it ----------------------------------------------------------------------

@contextmanager
def process_group(world, device, needed=False):
    """The process group of a torchrun job, and the one way out of it: a torchrun worker ends here.

    A clean exit (end, --stop-at, SIGTERM) meets every rank at a barrier, so that nobody leaves while a peer
    still waits, destroys the group and leaves without interpreter teardown (os._exit). Why: gloo's worker threads
    release each finished collective a moment after the caller has been woken; if the interpreter is shutting down
    by then, the release needs the GIL, a finalizing interpreter ends the thread, and the process aborts
    ("terminate called without an active exception", SIGABRT) after all its work is done. DDP and FSDP keep the
    group, and so its threads, alive until teardown, so they cannot be joined first.

    An error ends the job with that error as torchrun's root cause (`failed`)."""
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
    except BaseException as e:  # every way out of a rank goes through here
        if world == 1:  # no peer to tell
            dist.destroy_process_group()
            raise
        failed(e)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code())


def failed(error):
    """End this rank after `error`, so that torchrun names the rank whose error it was.

    torchrun reports as root cause the failure with the earliest timestamp, in whole seconds, the first one it
    saw on a tie. When one rank fails, its peers' next collective fails too ("Connection closed by peer"), in
    the same second. So the failing rank first says so in the job's store, then writes its error file
    (TORCHELASTIC_ERROR_FILE) and only then exits, which is what closes its connections. A rank whose error comes
    after a peer's announcement knows its error is a consequence: it says whose failure stopped it and waits
    for torchrun, which stops the other ranks as soon as it sees the failed one, so that failure is the first
    torchrun sees and the earliest. Without torchrun (or when it does not come), it leaves after PEER_WAIT."""
    rank, key = dist.get_rank(), f"f2llm/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    store = _store()
    peer = _read(store, key)
    if peer is None:
        message = one_line(error) or "".join(traceback.format_exception(error))
        if store is not None:
            try:
                store.set(key, f"rank {rank} failed: {message.strip().splitlines()[-1]}")
            except Exception:  # the store's host is gone: nobody is left to tell
                pass
        _exit(message, 128 + signal.SIGINT if isinstance(error, KeyboardInterrupt) else 1)
    message = f"{os.path.basename(sys.argv[0])}: rank {rank} stops because {peer}\n"
    sys.stderr.write(message)
    sys.stderr.flush()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # torchrun's SIGTERM ends the wait (stop_on_signals would only flag it)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if _stop[0] == signal.SIGTERM:  # it came before the line above (during the failed collective) and was only flagged
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(PEER_WAIT)
    _exit(message, 1, printed=True)


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:
        return None


def _read(store, key):
    """The announcement of a peer's failure, or None (none yet, or no store to ask)."""
    try:
        return store.get(key).decode() if store is not None and store.check([key]) else None
    except Exception:
        return None


def _exit(message, code, printed=False, leave=os._exit):
    """Write torchrun's error file for this rank (its root-cause report), print the message, leave (at once: os._exit)."""
    _record(message)
    if not printed:
        sys.stderr.write(message)
    sys.stdout.flush()
    sys.stderr.flush()
    leave(code)


def _record(message):
    """torchrun's error file for this process (TORCHELASTIC_ERROR_FILE), in the format of its own @record."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as f:
            json.dump(dict(message=dict(message=message.strip().splitlines()[-1],
                                        extraInfo=dict(py_callstack=message, timestamp=str(int(time.time()))))), f)


def broadcast(obj):
    """Rank 0's object on every rank (itself when there is one rank)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
