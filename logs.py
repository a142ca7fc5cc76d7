"""What a run reports, on rank 0: the terminal, out/log.jsonl and out/tensorboard/. On --resume the log and the curves
drop what came after the checkpoint, so they are the history of the run that produced it."""
import json
import os
import resource
import time

import torch

import checkpoint


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


class Log:
    """log.jsonl and TensorBoard on rank 0 (nothing on the others); the terminal's step line with an ETA."""

    def __init__(self, out, start, total, master, curves=True):
        if master and start:
            truncate(os.path.join(out, "log.jsonl"), start)
        self.file = open(os.path.join(out, "log.jsonl"), "a") if master else None
        self.curves = tensorboard(out, start) if master and curves else None
        self.start, self.total, self.t0 = start, total, time.time()

    def write(self, record):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        for tag, value in scalars(record) if self.curves else ():
            self.curves.add_scalar(tag, value, record["step"])

    def step(self, step, batch, numbers, lr, seconds, device):
        """A trained step: losses, lr, gradient norm, throughput, peak memory and the time left."""
        eta = (time.time() - self.t0) / (step - self.start) * (self.total - step)
        n = numbers
        print0(f"step {step}/{self.total} | {batch['source']} | loss {n['loss']:.4f} (hard {n['hard']:.4f} in-batch {n['in_batch']:.4f}) | "
               f"lr {lr:.2e} | grad norm {n['grad_norm']:.3f} | {n['seqs'] / seconds:.1f} seq/s {n['tokens'] / seconds:,.0f} tok/s | "
               f"peak mem {peak_memory_gb(device):.2f} GB | eta {eta / 60:.1f} min")
        self.write(dict(step=step, source=batch["source"], loss=n["loss"], hard=n["hard"], in_batch=n["in_batch"], lr=lr,
                        grad_norm=n["grad_norm"], seq_per_s=n["seqs"] / seconds, tok_per_s=n["tokens"] / seconds))

    def skipped(self, step, numbers, counters):
        """A step whose loss or gradient was not finite: it changed nothing."""
        print0(f"step {step}: non-finite loss or gradient norm ({numbers['loss']}, {numbers['grad_norm']}); skipped, weights unchanged "
               f"({counters['bad_in_a_row']} in a row, {counters['bad']} in all)")
        self.write(dict(step=step, skipped="non-finite loss or gradient norm", bad=counters["bad"]))

    def close(self):
        for handle in (self.curves, self.file):
            if handle:
                handle.close()


def sources(batches, unlisted, epochs):
    """What the run trains on: each source's type, rows and steps, and the sources trained otherwise than officially."""
    for s, n in zip(batches.sources, batches.n_batches):
        print0(f"  source {s.name}: {s.kind}, {len(s.query):,} rows, {n} steps per epoch")
    for name in unlisted:
        print0(f"warning: source {name!r} is in none of F2LLM's lists: trained as retrieval (hard and in-batch negatives), where the "
               f"official code trains it with hard negatives only; --task-type {name}=clustering does that")
    print0(f"{batches.steps_per_epoch * epochs} steps: {epochs} epoch(s) x {batches.steps_per_epoch}, global batch {batches.G} queries")


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def truncate(path, step):
    """On resume, the log keeps the history of the run that produced the checkpoint: records past its step go."""
    if os.path.exists(path):
        kept = [line for line in open(path) if line.strip() and json.loads(line)["step"] <= step]
        checkpoint.write_atomic(path, lambda p: open(p, "w").writelines(kept))


def tensorboard(out, start):
    """A TensorBoard writer when tensorboard is installed; on resume, events past the checkpoint's step are dropped."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("TensorBoard curves off: `pip install tensorboard` to have them", flush=True)
        return None
    return SummaryWriter(os.path.join(out, "tensorboard"), purge_step=start + 1 if start else None)


def scalars(record):
    """The numbers of a log record as TensorBoard tags: train/loss, val/<source>, eval/<task>, ..."""
    for key, value in record.items():
        if isinstance(value, dict):
            yield from ((f"{key}/{k}", v) for k, v in value.items())
        elif isinstance(value, (int, float)) and key != "step":
            yield ("val/loss" if key == "val_loss" else f"train/{key}"), value
