"""Train an F2LLM embedding model: Qwen3 + EOS pooling + contrastive loss with a gradient cache.

    python train.py                                              # tiny Qwen3 on built-in data, CPU, minutes
    torchrun --standalone --nproc_per_node=2 train.py            # the same on 2 processes (gloo on CPU)
    torchrun --standalone --nproc_per_node=8 train.py --size 0.6b --data DIR   # the paper's recipe, 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --size 4b --fsdp --data codefuse-ai/F2LLM
    python train.py --resume                                     # continue the run in --out exactly
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id run1 train.py --size 4b ...

One step: the global batch (512 queries in the paper, all from one source) is split across ranks; each rank
runs the gradient cache over its share in chunks of --chunk-size sequences; one all-reduce; clip; AdamW.
"""
import argparse
import json
import math
import os
import resource
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

import builtin
import checkpoint
import data
import distributed
import eval as evaluation
import loss as f2llm_loss
import model as f2llm_model

# ---- configuration: paper Table 1 and the released config ----------------------------------------------------
PRESETS = {  # lr, global batch (queries), max length, epochs, warmup and the world it was counted for (see lr_at);
    # validation interval (1% held out is big); chunk size: sequences per gradient-cache chunk for 80 GB at 1024 tokens.
    # 0.6b measured on an H100 (45 GiB peak at 16; 24 reaches 63 GiB; 32 runs out). 1.7b and 4b are scaled from the
    # 0.6b's 2.2 MiB of activations per token by hidden size x layers, not measured: lower --chunk-size if one runs out
    "0.6b": dict(lr=1e-5, batch_size=512, max_len=1024, epochs=2, warmup=500, schedule_world=16, val_every=1000, chunk_size=16),
    "1.7b": dict(lr=9e-6, batch_size=512, max_len=1024, epochs=2, warmup=500, schedule_world=16, val_every=1000, chunk_size=8),
    "4b": dict(lr=8e-6, batch_size=512, max_len=1024, epochs=2, warmup=500, schedule_world=32, val_every=1000, chunk_size=4),
    # random init learns from scratch: a large rate, short sequences, a few minutes on 2 CPU cores; 64 queries, so the
    # in-batch term (which trains the queries only) has enough candidates (README: how the default was chosen)
    "tiny": dict(lr=1e-3, batch_size=64, max_len=96, epochs=3, warmup=10, schedule_world=1, val_every=50, chunk_size=64),
}


# what must match the checkpoint for --resume to continue the same run
RESUME_KEYS = ("size", "model", "random_init", "data", "task_type", "max_len", "lr", "min_lr", "warmup", "schedule_world", "epochs",
               "batch_size", "weight_decay", "clip", "temperature", "in_batch_grad", "precision", "seed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model
    p.add_argument("--size", default="tiny", choices=list(PRESETS), help="Qwen3 size; picks the presets below")
    p.add_argument("--model", help="local Hugging Face folder or hub id instead of the size's Qwen3 checkpoint")
    p.add_argument("--random-init", action="store_true", help="the size's architecture with random weights, no download")
    p.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer (FSDP2) for models too big for DDP")
    cuda = torch.cuda.is_available()
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16" if cuda else "fp32",
                   help="bf16: bf16 weights for compute over fp32 master weights and optimizer (FSDP2's mixed precision, the released "
                        "run's arithmetic; default on GPUs); fp32: fp32 weights, bf16 autocast on GPUs (default on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (off by default: on an H200 it failed with --liger, "
                   "and with --chunk-tokens before packed rows kept one shape; README, GPU figures)")
    p.add_argument("--liger", action="store_true", help="liger-kernel's fused Qwen3 kernels (RMSNorm, RoPE, SwiGLU; GPUs, liger-kernel installed)")
    # data
    p.add_argument("--data", help="folder of F2LLM .parquet/.jsonl files or hub id codefuse-ai/F2LLM (default: built-in)")
    p.add_argument("--task-type", action="append", default=[], metavar="SOURCE=TYPE", help=f"override a source's task type ({', '.join(data.TASK_TYPES)})")
    p.add_argument("--max-len", type=int, help="tokens per sequence, EOS included (preset)")
    # optimisation (AdamW betas (0.9, 0.98), cosine schedule: the paper's)
    p.add_argument("--lr", type=float, help="peak learning rate (preset)")
    p.add_argument("--min-lr", type=float, default=1e-7, help="learning-rate floor")
    p.add_argument("--warmup", type=int, help="warmup length in scheduler steps (preset; see --schedule-world)")
    p.add_argument("--schedule-world", type=int, help="the released runs' GPU count (preset 16, 4b 32): their scheduler counted "
                   "per-GPU batches and was stepped once per GPU per optimizer step, so warmup 500 lasted 500/16 optimizer steps")
    p.add_argument("--epochs", type=int, help="passes over every source (preset)")
    p.add_argument("--batch-size", type=int, help="global batch in queries, over all ranks (preset)")
    p.add_argument("--chunk-size", type=int, help="sequences per gradient-cache chunk (preset): sets memory, not the result")
    p.add_argument("--chunk-tokens", type=int, help="pack each chunk's sequences into one row of at most this many tokens, no padding "
                   "computed (replaces --chunk-size)")
    p.add_argument("--padded", action="store_true", help="with --chunk-tokens: padded rows instead of one packed row, as many as the "
                   "token budget holds counting the padding (sequences sorted by length, so little)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--temperature", type=float, default=f2llm_loss.TEMPERATURE)
    p.add_argument("--in-batch-grad", action="store_true", help="let the in-batch term train the positives too (not the released recipe)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many steps in a row with a non-finite loss or gradient")
    # bookkeeping
    p.add_argument("--out", default="out", help="training state, the model folder (out/checkpoint), log.jsonl, evaluation results")
    p.add_argument("--cache-dir", default=os.path.join(f2llm_model.CACHE, "tokenized"), help="tokenized data cache")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--val-every", type=int, help="held-out loss every N steps (preset; 0: only at the start and end)")
    p.add_argument("--eval-every", type=int, default=0, help="built-in evaluation tasks every N steps (0: before and after)")
    p.add_argument("--eval-tasks", nargs="*", help="task folders evaluated during training (default: built-in)")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the training state in --out")
    p.add_argument("--overwrite", action="store_true", help="start afresh even though --out holds another run (it is deleted)")
    p.add_argument("--stop-at", type=int, help="checkpoint and exit after this step, e.g. to fit a job's time limit")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard curves (out/tensorboard)")
    args = p.parse_args(argv)
    for k, v in PRESETS[args.size].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    # Every setting that could crash after training starts, or train nothing, is refused here, before any loading.
    for name, low in dict(batch_size=1, chunk_size=1, chunk_tokens=1, epochs=1, save_every=1, log_every=1, max_len=2, schedule_world=1, warmup=0,
                          val_every=0, eval_every=0, stop_at=1, max_bad_steps=1).items():
        if getattr(args, name) is not None and getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}" + (" (one text token and the EOS)" if name == "max_len" else ""))
    for name in ("lr", "temperature", "clip"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.min_lr < 0 or args.weight_decay < 0:
        p.error("--min-lr and --weight-decay cannot be negative")
    if bad := [kv for kv in args.task_type if "=" not in kv]:
        p.error(f"--task-type takes SOURCE=TYPE, got {bad}")
    args.task_type = dict(kv.split("=", 1) for kv in args.task_type)
    if bad := {k: v for k, v in args.task_type.items() if v not in data.TASK_TYPES}:
        p.error(f"--task-type: unknown types {bad}")
    if args.batch_size % args.schedule_world:
        p.error(f"--batch-size {args.batch_size} is not divisible by --schedule-world {args.schedule_world}")
    if args.padded and args.chunk_tokens is None:
        p.error("--padded says how --chunk-tokens fills a chunk; give --chunk-tokens too")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out; --overwrite deletes it: pick one")
    args.data = os.path.normpath(args.data) if args.data and os.path.exists(args.data) else args.data  # dir/ == dir
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


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def export_args(args):
    """What the model folder says of itself: base model, embedding length, query instruction, a model card."""
    base = args.model or (f"random-init Qwen3 ({args.size})" if args.random_init or args.size == "tiny" else f2llm_model.HUB_IDS[args.size])
    instruction = builtin.RETRIEVAL_INSTRUCTION if not args.data else checkpoint.DEFAULT_INSTRUCTION
    return dict(base=base, max_len=evaluation.max_len_for(vars(args)), instruction=instruction, data=args.data or "the built-in data")


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def packs(args):
    """Whether chunks are packed rows (--chunk-tokens without --padded)."""
    return args.chunk_tokens is not None and not args.padded


def packed_width(args):
    """Under --compile each packed row is filled up to --chunk-tokens: one shape, compiled once, static (with dynamic
    shapes Inductor failed to lower FlexAttention on torch 2.11; README); it costs the step's last, partial chunk.
    None: rows as long as their sequences (and no packed rows)."""
    return args.chunk_tokens if args.compile and packs(args) else None


def collate_for(args, tokenizer, device):
    """A chunk's token lists -> the model's inputs: one packed row (--chunk-tokens) or a padded batch."""
    if packs(args):
        return lambda seqs: f2llm_model.pack(seqs, device, packed_width(args))
    return lambda seqs: f2llm_model.pad(seqs, tokenizer.pad_token_id, device=device)


def parallelize(model, args, world, local_rank, device):
    """Speed and data parallelism as plain functions on the plain model, each switched by one flag: liger's fused
    Qwen3 kernels, torch.compile per decoder layer, then FSDP2 (bf16 compute over fp32 master weights, reductions
    in fp32, on any number of ranks; or sharding for size) or DDP (fp32 weights)."""
    if args.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3
        # The fused linear + cross-entropy replaces a causal LM's forward; an encoder has no LM head, so it stays off.
        apply_liger_kernel_to_qwen3(model=model.backbone, fused_linear_cross_entropy=False)
    if args.compile:
        for layer in model.backbone.layers:
            # Padded chunks change both sizes every time; packed rows keep one (packed_width).
            layer.compile(dynamic=packed_width(args) is None)
    if args.precision == "bf16" or args.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.precision == "bf16" else MixedPrecisionPolicy()
        for layer in model.backbone.layers:
            fully_shard(layer, mp_policy=policy)
        return fully_shard(model, mp_policy=policy)
    if world > 1:  # rotary buffers are constants: no broadcast, so a forward is never a collective
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None, broadcast_buffers=False)
    return model


@record  # under torchrun, a failing rank's exception (not just its exit code) is the job's reported root cause
def main(argv=None):
    args = parse_args(argv)
    # ---- distributed set-up: torchrun's RANK / LOCAL_RANK / WORLD_SIZE; nccl on GPUs, gloo on CPU ----------
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    with distributed.process_group(world, device, args.precision == "bf16" or args.fsdp), checkpoint.lock(args.out) if rank == 0 else nullcontext():  # --out is this run's alone
        train(args, rank, local_rank, world, device)


def train(args, rank, local_rank, world, device):
    master = rank == 0
    torch.manual_seed(args.seed)
    amp = (lambda: f2llm_model.autocast(device)) if args.precision == "fp32" else nullcontext  # bf16: the weights are bf16 already
    # ---- --out, the data files and what identifies them: rank 0 first, then everyone -----------------------------
    folder, tasks, summary = args.data or os.path.join(f2llm_model.CACHE, "stdlib-train"), args.eval_tasks, None
    if master:
        summary = checkpoint.prepare(args, RESUME_KEYS)
        if not args.data:
            builtin.training_data(folder)
        if tasks is None:
            tasks = builtin.tasks(os.path.join(f2llm_model.CACHE, "stdlib-eval"))
        files = data.find_files(folder)
        if unknown := set(args.task_type) - {data.source_name(f) for f in files}:
            raise SystemExit(f"--task-type names no source of {folder}: {sorted(unknown)}")
        identity = data.identify(files)
        if summary and (changes := data.changes(summary["data"], identity)):
            raise SystemExit(f"--resume: the data differs from the checkpoint's: {'; '.join(changes)}")
    files, identity, tasks = distributed.broadcast((files, identity, tasks) if master else None)

    # ---- model: the size's Qwen3 (or --model); a resumed run's weights come from the training state -----------
    model, tokenizer = f2llm_model.load(args.model or args.size, random_init=args.random_init, device=device, seed=args.seed, packed=packs(args))
    print0(f"model {args.model or args.size}: {sum(p.numel() for p in model.parameters()):,} parameters, "
           f"{model.backbone.config._attn_implementation} attention, {world} rank(s) on {device.type}")
    collate = collate_for(args, tokenizer, device)
    tokenizer_id = data.tokenizer_digest(tokenizer)
    if summary and summary["tokenizer"] != tokenizer_id:
        raise SystemExit(f"--resume: the tokenizer of {args.model or args.size} differs from the one the checkpoint was trained with")

    # ---- data: checked and tokenized by rank 0 first, then read from the cache by everyone -------------------
    digests = {d["source"]: d["digest"] for d in identity}
    for turn in (0, 1):
        if master == (turn == 0):
            sources = [data.load_source(f, tokenizer, args.max_len, args.cache_dir, data.task_type(data.source_name(f), args.task_type),
                                        f2llm_model.tokenize, master, digests[data.source_name(f)]) for f in files]
        if world > 1:
            dist.barrier()
    batches = data.Batches(sources, args.batch_size, world, rank, args.seed)
    total, length = batches.steps_per_epoch * args.epochs, schedule_length(batches, args)
    for s, n in zip(sources, batches.n_batches):
        print0(f"  source {s.name}: {s.kind}, {len(s.query):,} rows, {n} steps per epoch")
    for name in data.unlisted([s.name for s in sources], args.task_type):
        print0(f"warning: source {name!r} is in none of F2LLM's lists: trained as retrieval (hard and in-batch negatives), where the "
               f"official code trains it with hard negatives only; --task-type {name}=clustering does that")
    print0(f"{total} steps: {args.epochs} epoch(s) x {batches.steps_per_epoch}, global batch {args.batch_size} queries")

    # ---- speed, data parallelism, optimizer, resume -------------------------------------------------------------
    model = parallelize(model, args, world, local_rank, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)
    start, counters = 0, dict(bad_in_a_row=0, bad=0)
    if args.resume:
        start, counters = checkpoint.restore(args.out, model, optimizer, device)
        if master:
            checkpoint.truncate_log(os.path.join(args.out, "log.jsonl"), start)
        print0(f"resumed from {args.out}/state.pt at step {start}")
    encoder = unwrap(model)

    # ---- logging: stdout, log.jsonl and TensorBoard on rank 0 ------------------------------------------------
    log = open(os.path.join(args.out, "log.jsonl"), "a") if master else None
    curves = checkpoint.tensorboard(args.out, start) if master and not args.no_tensorboard else None
    def write(record):
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()
        for tag, value in checkpoint.scalars(record) if curves else ():
            curves.add_scalar(tag, value, record["step"])

    def run_eval(step):
        # Every rank encodes (FSDP needs all of them); rank 0 writes and prints. Compiled layers run eagerly here:
        # padded batches of every shape, every few thousand steps, are not worth compiling for.
        with torch.compiler.set_stance("force_eager") if args.compile else nullcontext():
            results = evaluation.evaluate(encoder, tokenizer, tasks, out=os.path.join(args.out, "eval", f"step{step}") if master else None,
                                          max_len=evaluation.max_len_for(vars(args)), progress=False)
        print0(f"eval step {step} | " + " | ".join(f"{r['task']} {r['main_score_name']} {r['main_score']:.4f}" for r in results))
        write(dict(step=step, eval={r["task"]: r["main_score"] for r in results}))

    def run_validation(step):
        val, per_source = f2llm_loss.heldout_loss(model, batches.validation(), collate, amp, args.chunk_size, args.chunk_tokens, args.temperature,
                                                  args.padded)
        if val is not None:
            print0(f"val step {step} | loss {val:.4f} | " + " | ".join(f"{k} {v:.4f}" for k, v in per_source.items()))
            write(dict(step=step, val_loss=val, val=per_source))
    if start == 0:
        if tasks:
            run_eval(0)
        run_validation(0)

    # ---- the loop ---------------------------------------------------------------------------------------------
    # SIGTERM (preemption, scancel, a torchrun shutdown) finishes the current step, checkpoints and exits.
    # The flag travels in the step's all-reduce, so every rank stops after the same step.
    stop = [0.0]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, 1.0))
    model.train()
    t0, tokens_seen = time.time(), 0
    prefetch = ThreadPoolExecutor(1)  # the next step's batch (thousands of token lists) is built while this step computes
    upcoming = prefetch.submit(batches, start)
    for step in range(start, total):
        t = time.time()
        batch = upcoming.result()
        if step + 1 < total:
            upcoming = prefetch.submit(batches, step + 1)
        lr = lr_at(step, args, length)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, hard, ib = f2llm_loss.cached_step(model, batch, collate, args.chunk_size, amp, args.temperature, args.in_batch_grad, args.chunk_tokens,
                                                args.padded)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
        # One all-reduce and one host sync per step: losses, gradient norm, token counts and the stop flag.
        stats = torch.stack([loss, hard, ib, grad_norm.to(loss.device)]).double()
        stats = torch.cat([stats, torch.tensor([sum(map(len, batch["seqs"])), len(batch["seqs"]), stop[0]], dtype=torch.float64, device=stats.device)])
        if world > 1:
            dist.all_reduce(stats)
        loss_, hard_, ib_, norm, tokens, seqs, stopped = stats.tolist()
        loss_, hard_, ib_, norm = loss_ / world, hard_ / world, ib_ / world, norm / world
        done = step + 1
        # A step whose loss or gradient is not finite (on any rank) changes nothing; several in a row stop the run.
        if not (math.isfinite(loss_) and math.isfinite(norm)):
            counters["bad_in_a_row"] += 1
            counters["bad"] += 1
            optimizer.zero_grad(set_to_none=True)
            print0(f"step {done}: non-finite loss or gradient norm ({loss_}, {norm}); skipped, weights unchanged "
                   f"({counters['bad_in_a_row']} in a row, {counters['bad']} in all)")
            write(dict(step=done, skipped="non-finite loss or gradient norm", bad=counters["bad"]))
            if counters["bad_in_a_row"] >= args.max_bad_steps:
                raise RuntimeError(f"{counters['bad_in_a_row']} steps in a row with a non-finite loss or gradient norm, up to step {done}: "
                                   f"stopping; the last checkpoint in {args.out} is the last good state (a lower --lr may help)")
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            counters["bad_in_a_row"] = 0
            dt, tokens_seen = time.time() - t, tokens_seen + tokens
            if done % args.log_every == 0 or done == total:
                eta = (time.time() - t0) / (done - start) * (total - done)
                print0(f"step {done}/{total} | {batch['source']} | loss {loss_:.4f} (hard {hard_:.4f} in-batch {ib_:.4f}) | lr {lr:.2e} | "
                       f"grad norm {norm:.3f} | {seqs / dt:.1f} seq/s {tokens / dt:,.0f} tok/s | peak mem {peak_memory_gb(device):.2f} GB | "
                       f"eta {eta / 60:.1f} min")
                write(dict(step=done, source=batch["source"], loss=loss_, hard=hard_, in_batch=ib_, lr=lr, grad_norm=norm,
                           seq_per_s=seqs / dt, tok_per_s=tokens / dt))
        if done == total or (args.val_every and done % args.val_every == 0):
            run_validation(done)
        if tasks and (done == total or (args.eval_every and done % args.eval_every == 0)):
            run_eval(done)
        stopping = done == args.stop_at or stopped > 0
        if done == total or done % args.save_every == 0 or stopping:
            checkpoint.save(args.out, model, optimizer, tokenizer, done, counters, dict(args=vars(args), data=identity, tokenizer=tokenizer_id),
                            export_args(args), rank)
            print0(f"saved {args.out}/state.pt and {args.out}/checkpoint at step {done}")
        if stopping:
            print0(f"stopped after step {done}; --resume continues")
            break
    prefetch.shutdown(cancel_futures=True)
    if curves:
        curves.close()
    if log:
        log.close()
    print0(f"done in {(time.time() - t0) / 60:.1f} min, {tokens_seen:,.0f} tokens")


if __name__ == "__main__":
    main()
