"""Train an F2LLM embedding model: Qwen3 + EOS pooling + contrastive loss with a gradient cache.

    python train.py                                              # tiny Qwen3 on built-in data, CPU, minutes
    torchrun --standalone --nproc_per_node=2 train.py            # the same on 2 processes (gloo on CPU)
    torchrun --standalone --nproc_per_node=8 train.py --size 0.6b --data DIR   # the paper's recipe, 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --size 4b --data codefuse-ai/F2LLM
    python train.py --resume                                     # continue the run in --out exactly
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id run1 train.py --size 4b ...

One step: the global batch (512 queries in the paper, all from one source) is split across ranks; each rank
runs the gradient cache over its share, chunk by chunk; one gradient reduction; clip; AdamW at the released schedule's rate.
The file reads in nanoGPT's order: settings, set-up, data, model, optimizer, then the loop (`train`) and one step.
"""
import argparse
import functools
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from types import SimpleNamespace
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

import builtin
import checkpoint
import checks
import data
import eval as evaluation
import launch
import logs
import loss
import model as f2llm_model
import speed
from logs import print0

# ---- settings: paper Table 1 and the released config ------------------------------------------------------------
PRESETS = {  # lr, global batch (queries), max length, epochs, warmup and the world it was counted for (see lr_at);
    # validation interval (1% held out is big); chunk: sequences per gradient-cache chunk for 80 GB at 1024 tokens
    # (0.6b measured, 1.7b and 4b scaled from it by hidden size x layers: docs/gpu.md)
    "0.6b": dict(lr=1e-5, batch_size=512, max_len=1024, epochs=2, warmup=500, schedule_world=16, val_every=1000, chunk_size=16),
    "1.7b": dict(lr=9e-6, batch_size=512, max_len=1024, epochs=2, warmup=500, schedule_world=16, val_every=1000, chunk_size=8),
    "4b": dict(lr=8e-6, batch_size=512, max_len=1024, epochs=2, warmup=500, schedule_world=32, val_every=1000, chunk_size=4),
    # random init learns from scratch: a large rate, short sequences, a few minutes on 2 CPU cores; 64 queries, so the
    # in-batch term (which trains the queries only) has enough candidates (docs/measurements.md: how it was chosen)
    "tiny": dict(lr=1e-3, batch_size=64, max_len=96, epochs=3, warmup=10, schedule_world=1, val_every=50, chunk_size=64),
}


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model
    p.add_argument("--size", default="tiny", choices=list(PRESETS), help="Qwen3 size; picks the presets below")
    p.add_argument("--model", help="local Hugging Face folder or hub id instead of the size's Qwen3 checkpoint")
    p.add_argument("--random-init", action="store_true", help="the size's architecture with random weights, no download")
    # data
    p.add_argument("--data", help="folder of F2LLM .parquet/.jsonl files or hub id codefuse-ai/F2LLM (default: built-in)")
    p.add_argument("--task-type", action="append", default=[], metavar="SOURCE=TYPE", help=f"override a source's task type ({', '.join(data.TASK_TYPES)})")
    p.add_argument("--max-len", type=int, help="tokens per sequence, EOS included (preset)")
    # optimisation (AdamW betas (0.9, 0.98), cosine schedule: the paper's)
    p.add_argument("--lr", type=float, help="peak learning rate (preset)")
    p.add_argument("--min-lr", type=float, default=1e-7, help="learning-rate floor")
    p.add_argument("--warmup", type=int, help="warmup length in scheduler steps (preset; see --schedule-world)")
    p.add_argument("--schedule-world", type=int, help="the released runs' GPU count (preset 16, 4b 32, tiny 1): their scheduler counted "
                   "per-GPU batches and was stepped once per GPU per optimizer step, so warmup 500 lasted 500/16 optimizer steps")
    p.add_argument("--epochs", type=int, help="passes over every source (preset)")
    p.add_argument("--batch-size", type=int, help="global batch in queries, over all ranks (preset)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--temperature", type=float, default=loss.TEMPERATURE)
    p.add_argument("--in-batch-grad", action="store_true", help="let the in-batch term train the positives too (not the released recipe)")
    p.add_argument("--matryoshka", action="store_true", help="F2LLM-v2's loss: every term also on the first 2^k coordinates (not the v1 recipe)")
    p.add_argument("--matryoshka-dims", type=int, nargs="+", metavar="D", help="with --matryoshka: these dimensions instead of the 2^k")
    p.add_argument("--seed", type=int, default=0)
    # memory and speed (speed.py; none changes the gradient)
    p.add_argument("--chunk-size", type=int, help="sequences per gradient-cache chunk (preset): sets memory, not the result")
    p.add_argument("--chunk-tokens", type=int, help="chunks of this many tokens, each packed into one row: no padding computed")
    p.add_argument("--padded", action="store_true", help="with --chunk-tokens: padded rows (as many as the budget holds) instead of one packed row")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16" if torch.cuda.is_available() else "fp32",
                   help="bf16 (GPU default): FSDP2, bf16 weights for compute over fp32 masters, as the released run; fp32: fp32 weights "
                        "(CPU default; bf16 autocast on GPUs)")
    p.add_argument("--fsdp", action="store_true", help="shard fp32 weights, gradients and optimizer over the ranks too (bf16 always does)")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (off by default: docs/gpu.md)")
    p.add_argument("--liger", action="store_true", help="liger-kernel's fused Qwen3 kernels (RMSNorm, RoPE, SwiGLU; GPUs, liger-kernel installed)")
    # bookkeeping
    p.add_argument("--out", default="out", help="training state, the model folder (out/checkpoint), log.jsonl, evaluation results")
    p.add_argument("--cache-dir", default=os.path.join(builtin.CACHE, "tokenized"), help="tokenized data cache")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--val-every", type=int, help="held-out loss every N steps (preset; 0: only at the start and end)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluation tasks every N steps (0: before and after)")
    p.add_argument("--eval-tasks", nargs="*", help="task folders evaluated during training (default: built-in)")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep", type=int, default=2, help="training states kept: --resume falls back past a damaged newest one")
    p.add_argument("--resume", action="store_true", help="continue from the training state in --out")
    p.add_argument("--overwrite", action="store_true", help="start afresh even though --out holds another run (it is deleted)")
    p.add_argument("--stop-at", type=int, help="checkpoint and exit after this step, e.g. to fit a job's time limit")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many steps in a row with a non-finite loss or gradient")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard curves (out/tensorboard)")
    return p


def parse_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    for k, v in PRESETS[args.size].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    checks.check_args(p, args, data.TASK_TYPES)
    return args


def lr_at(step, args, length):
    """The learning rate of optimizer step `step` (0-based) as the released runs had it: transformers' cosine
    schedule with warmup, whose `length` and warmup are counted in per-GPU batches of a run on
    args.schedule_world GPUs, stepped that many times per optimizer step by accelerate's AcceleratedScheduler;
    the official loop raises the rate to min_lr after each step, so the first step runs at the schedule's 0."""
    x = step * args.schedule_world
    if x < args.warmup:
        factor = x / max(1, args.warmup)
    else:
        factor = max(0.0, 0.5 * (1 + math.cos(math.pi * ((x - args.warmup) / max(1, length - args.warmup)))))
    return args.lr * factor if step == 0 else max(args.min_lr, args.lr * factor)


def schedule_length(batches, args):
    """The official scheduler's length: per-GPU batches of every source (the last one partial), times epochs."""
    per_gpu = args.batch_size // args.schedule_world
    return args.epochs * sum(math.ceil(len(rows) / per_gpu) for rows in batches.train)


def main(argv=None):
    args = parse_args(argv)
    proc = launch.process()
    if proc.device.type == "cuda":
        torch.cuda.set_device(proc.device)
        torch.backends.cuda.matmul.allow_tf32 = True
    with launch.process_group(proc.world, proc.device, args.precision == "bf16" or args.fsdp), \
            checkpoint.lock(args.out) if proc.master else nullcontext():  # --out is this run's alone
        train(setup(args, proc))
    return launch.exit_code()  # one process (several end in process_group)


# ---- set-up: --out, the data files, the model, the optimizer; everything the loop needs -------------------------------

def setup(args, proc):
    torch.manual_seed(args.seed)
    files, identity, tasks, summary = prepare(args, proc)
    # model: the size's Qwen3 (or --model); a resumed run's weights come from the training state below
    model, tokenizer = f2llm_model.load(args.model or args.size, random_init=args.random_init, device=proc.device, seed=args.seed,
                                        packed=speed.packs(args))
    dims = loss.matryoshka_dims(model.backbone.config.hidden_size, args.matryoshka_dims) if args.matryoshka else ()
    print0(f"model {args.model or args.size}: {sum(p.numel() for p in model.parameters()):,} parameters, "
           f"{model.backbone.config._attn_implementation} attention, {proc.world} rank(s) on {proc.device.type}"
           + (f", Matryoshka dimensions {', '.join(map(str, dims))}" if dims else ""))
    if summary and summary["tokenizer"] != checks.tokenizer_digest(tokenizer):
        raise SystemExit(f"--resume: the tokenizer of {args.model or args.size} differs from the one the checkpoint was trained with")
    batches = load_batches(args, proc, files, identity, tokenizer)
    # speed and data parallelism (speed.py), then AdamW as the paper has it; --resume restores weights, optimizer, RNG
    model = speed.parallelize(model, args, proc.world, proc.local_rank, proc.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)
    start, counters = checkpoint.restore(summary["resume"], model, optimizer, proc.device) if args.resume else (0, dict(bad_in_a_row=0, bad=0))
    if args.resume:
        print0(f"resumed from {summary['resume']} at step {start}")
    total = batches.steps_per_epoch * args.epochs
    amp = (lambda: speed.autocast(proc.device)) if args.precision == "fp32" else nullcontext  # bf16: the weights are bf16 already
    how = Step(collate_for(args, tokenizer, proc.device), speed.chunker(args, proc.device), loss.Objective(args.temperature, args.in_batch_grad, dims),
               amp, args.clip)
    about = dict(args=vars(args), data=identity, tokenizer=checks.tokenizer_digest(tokenizer), keep=args.keep, export=export_args(args, dims))
    return SimpleNamespace(args=args, proc=proc, model=model, tokenizer=tokenizer, optimizer=optimizer, batches=batches, how=how, tasks=tasks,
                           start=start, counters=counters, total=total, length=schedule_length(batches, args), about=about,
                           log=logs.Log(args.out, start, total, proc.master, not args.no_tensorboard))


def prepare(args, proc):
    """Rank 0 mends or refuses --out, writes the built-in data and tasks if needed and identifies the data files;
    every rank receives (files, their identity, evaluation tasks, the checkpoint's summary on --resume)."""
    folder, found = args.data or os.path.join(builtin.CACHE, "stdlib-train"), None
    if proc.master:
        files = data.find_files(builtin.training_data(folder) if not args.data else folder)
        if unknown := set(args.task_type) - {data.source_name(f) for f in files}:
            raise SystemExit(f"--task-type names no source of {folder}: {sorted(unknown)}")
        summary = checkpoint.prepare(args, checks.RESUME_KEYS)  # after the checks above: --overwrite deletes
        tasks = builtin.tasks(os.path.join(builtin.CACHE, "stdlib-eval")) if args.eval_tasks is None else args.eval_tasks
        identity = checks.identify(files, data.source_name)
        if summary and (changes := checks.changes(summary["data"], identity)):
            raise SystemExit(f"--resume: the data differs from the checkpoint's: {'; '.join(changes)}")
        found = files, identity, tasks, summary
    return launch.broadcast(found)


def load_batches(args, proc, files, identity, tokenizer):
    """Every file checked and tokenized once, by rank 0 first while the others wait, then read from the cache by them."""
    tokenize, digests = functools.partial(f2llm_model.tokenize, tokenizer, max_len=args.max_len), {d["source"]: d["digest"] for d in identity}
    for turn in (0, 1):
        if proc.master == (turn == 0):
            sources = [data.load_source(f, data.task_type(data.source_name(f), args.task_type), tokenize, args.cache_dir,
                                        digests[data.source_name(f)], proc.master) for f in files]
        if proc.world > 1:
            dist.barrier()
    batches = data.Batches(sources, args.batch_size, proc.world, proc.rank, args.seed)
    logs.sources(batches, data.unlisted([s.name for s in sources], args.task_type), args.epochs)
    return batches


def collate_for(args, tokenizer, device):
    """A chunk's token lists -> the model's inputs: one packed row (--chunk-tokens) or a padded batch."""
    if speed.packs(args):
        return lambda seqs: speed.pack(seqs, device, speed.packed_width(args))
    return lambda seqs: f2llm_model.pad(seqs, tokenizer.pad_token_id, device=device)


# ---- the loop -------------------------------------------------------------------------------------------------------

def train(run):
    args, log = run.args, run.log
    if run.start == 0:
        if run.tasks:
            evaluate(run, 0)
        validate(run, 0)
    launch.stop_on_signals()  # SIGTERM or Ctrl-C: finish the step on every rank, checkpoint, exit
    run.model.train()
    log.t0 = time.time()
    prefetch = ThreadPoolExecutor(1)  # the next step's batch (thousands of token lists) is built while this step computes
    upcoming = prefetch.submit(run.batches, run.start)
    for step in range(run.start, run.total):
        t, batch, done = time.time(), upcoming.result(), step + 1
        if done < run.total:
            upcoming = prefetch.submit(run.batches, done)
        lr = lr_at(step, args, run.length)
        numbers = train_step(run.model, run.optimizer, batch, lr, run.how)
        if not skipped(run, done, numbers) and (done % args.log_every == 0 or done == run.total):
            log.step(done, batch, numbers, lr, time.time() - t, run.proc.device)
        if done == run.total or (args.val_every and done % args.val_every == 0):
            validate(run, done)
        if run.tasks and (done == run.total or (args.eval_every and done % args.eval_every == 0)):
            evaluate(run, done)
        stopping = done == args.stop_at or numbers["stop"]
        if done == run.total or done % args.save_every == 0 or stopping:
            checkpoint.save(args.out, run.model, run.optimizer, run.tokenizer, dict(step=done, counters=run.counters), run.about)
            print0(f"saved {args.out}/state-{done:08d}.pt and {args.out}/checkpoint at step {done}")
        if stopping:
            print0(f"stopped after step {done}; --resume continues")
            break
    prefetch.shutdown(cancel_futures=True)
    log.close()
    print0(f"done in {(time.time() - log.t0) / 60:.1f} min")


class Step(NamedTuple):
    """How a step runs: chunks and their inputs, the loss's settings, the autocast for fp32 weights, clipping."""
    collate: Callable
    chunker: Callable
    objective: loss.Objective
    amp: Callable
    clip: float


def train_step(model, optimizer, batch, lr, how):
    """One optimizer step on this rank's share of the global batch. Returns the step's numbers, averaged over ranks,
    from one all-reduce (and one host sync): losses, gradient norm, token counts and the stop flag. A step whose loss
    or gradient is not finite on any rank changes nothing."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with speed.gathered(model):  # FSDP2: each layer's weights gathered once for the step, not per chunk
        value, hard, ib = loss.cached_step(model, batch, how.collate, how.chunker, how.objective, how.amp)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), how.clip)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
    counts = [sum(map(len, batch["seqs"])), len(batch["seqs"]), launch.stop_requested()]
    stats = torch.cat([torch.stack([value, hard, ib, norm.to(value.device)]).double(), torch.tensor(counts, dtype=torch.float64, device=value.device)])
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        dist.all_reduce(stats)
    value, hard, ib, norm, tokens, seqs, stop = stats.tolist()
    numbers = dict(loss=value / world, hard=hard / world, in_batch=ib / world, grad_norm=norm / world, tokens=tokens, seqs=seqs, stop=stop > 0)
    numbers["finite"] = math.isfinite(numbers["loss"]) and math.isfinite(numbers["grad_norm"])
    if numbers["finite"]:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return numbers


def skipped(run, done, numbers):
    """Whether the step was skipped for a non-finite loss or gradient: counted (in the checkpoint too) and logged; after
    --max-bad-steps of them in a row the run stops."""
    counters = run.counters
    counters["bad_in_a_row"] = 0 if numbers["finite"] else counters["bad_in_a_row"] + 1
    counters["bad"] += not numbers["finite"]
    if not numbers["finite"]:
        run.log.skipped(done, numbers, counters)
    if counters["bad_in_a_row"] >= run.args.max_bad_steps:
        raise launch.UserError(f"{counters['bad_in_a_row']} steps in a row with a non-finite loss or gradient norm, up to step {done}: "
                               f"stopping; the last checkpoint in {run.args.out} is the last good state (a lower --lr may help)")
    return not numbers["finite"]


def validate(run, step):
    """The held-out loss per source (data.Batches.validation), the same on any number of ranks; at the full size, as v2."""
    val, per_source = loss.heldout_loss(run.model, run.batches.validation(), run.how.collate, run.how.chunker, run.how.objective._replace(dims=()),
                                        run.how.amp)
    if val is not None:
        print0(f"val step {step} | loss {val:.4f} | " + " | ".join(f"{k} {v:.4f}" for k, v in per_source.items()))
        run.log.write(dict(step=step, val_loss=val, val=per_source))


def evaluate(run, step):
    """The evaluation tasks. Every rank encodes (FSDP needs all of them); rank 0 writes and prints. Compiled layers run
    eagerly here: padded batches of every shape, every few thousand steps, are not worth compiling for."""
    model = run.model.module if isinstance(run.model, torch.nn.parallel.DistributedDataParallel) else run.model
    with torch.compiler.set_stance("force_eager") if run.args.compile else nullcontext():
        results = evaluation.evaluate(model, run.tokenizer, run.tasks, max_len=evaluation.max_len_for(vars(run.args)),
                                      out=os.path.join(run.args.out, "eval", f"step{step}") if run.proc.master else None,
                                      dims=run.how.objective.dims or None)  # with --matryoshka, at each trained dimension
    print0(f"eval step {step} | " + " | ".join(f"{r['task']} {r['main_score_name']} {r['main_score']:.4f}" for r in results))
    run.log.write(dict(step=step, eval={r["task"]: r["main_score"] for r in results}))


def export_args(args, dims):
    """What the model folder says of itself: base model, embedding length, query instruction, Matryoshka dimensions."""
    base = args.model or (f"random-init Qwen3 ({args.size})" if args.random_init or args.size == "tiny" else f2llm_model.HUB_IDS[args.size])
    instruction = builtin.RETRIEVAL_INSTRUCTION if not args.data else checkpoint.DEFAULT_INSTRUCTION
    return dict(base=base, max_len=evaluation.max_len_for(vars(args)), instruction=instruction, data=args.data or "the built-in data", dims=dims)


if __name__ == "__main__":
    launch.run(main)
