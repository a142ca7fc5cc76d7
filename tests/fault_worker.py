"""Run by torchrun from test_ddp.py: train.py, except that rank 1 fails in its second step (an injected error)."""
import os
import sys

import conftest  # noqa: F401  (puts the project on sys.path)

import loss as f2llm_loss
import train

if os.environ["RANK"] == "1":
    cached_step, calls = f2llm_loss.cached_step, []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure on rank 1 in step 2")
        return cached_step(*args, **kwargs)
    f2llm_loss.cached_step = failing_step
train.main(sys.argv[1:])
