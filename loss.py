"""The F2LLM contrastive loss and a gradient cache that makes it exact for any batch in one chunk's memory.

Loss (F2LLM report, section 3), temperature tau = 0.05, s = cosine:
    hard     = CE over [d_i, d_i1..d_in] for each query q_i, label d_i         (every batch)
    in_batch = CE over the positives of the whole global batch, label d_i     (retrieval batches only)
    loss     = mean over queries of hard (+ in_batch)

The in-batch term as the released models were trained: the official code gathers the positives of all GPUs
with accelerate's `gather`, a copy that carries no gradient (DeepSpeed, mandatory there, makes it a copy even
on one GPU). So the in-batch term trains the queries only, and positives learn through the hard term alone.
Here the positives are gathered detached on any number of ranks, each rank scores its own queries, and the gradient
averaging of DDP (or FSDP2, the default on GPUs) completes the mean over the global batch: N ranks give the gradient
of one process holding the whole global batch. The in-batch candidates are positives only: no query, and no other
query's hard negative. `in_batch_grad` is the other objective, where the gradient of every gathered positive flows
back to the rank that made it (a differentiable all-gather); not the released recipe.

Gradient cache (Gao et al. 2021): 1) embed every chunk without autograd, 2) loss on the detached embeddings,
backward to d loss / d embedding, 3) re-embed each chunk with autograd under the same RNG state and backward with
the cached gradient. Each embedding depends on its own sequence only, so the gradient is the sum over chunks of
each chunk's Jacobian times its cached gradient: the whole batch's gradient, up to the rounding of sums taken in
another order. Memory: one chunk's activations, besides the [N, H] embeddings and their gradient. Time: one extra
forward per chunk but the last, which keeps its graph from step 1 and is backpropagated right after step 2. (Qwen3 has
no dropout, so the recorded RNG states only matter for a --model that has.)
"""
import math
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

import speed

TEMPERATURE = 0.05  # never changed in the official code


class Objective(NamedTuple):
    """The loss's settings: temperature; whether the in-batch term trains the positives too (not the released recipe);
    Matryoshka dimensions (F2LLM-v2; none in the v1 recipe), the full size first: see `matryoshka`."""
    temperature: float = TEMPERATURE
    in_batch_grad: bool = False
    dims: tuple = ()


def f2llm_loss(queries, positives, negatives, in_batch, objective=Objective(), gather_ranks=True):
    """queries, positives: [B, H]; negatives: [B, n, H]; all L2-normalised. Returns (loss, hard, in_batch).
    The in-batch candidates are the positives of every rank (gather_ranks=False when the caller holds the whole
    batch), so every rank must hold B queries of the same source (data.Batches does); they carry the in-batch term's
    gradient only with objective.in_batch_grad."""
    if in_batch:
        all_positives, offset = gather(positives, objective.in_batch_grad) if gather_ranks else \
            ((positives if objective.in_batch_grad else positives.detach()), 0)
    hard = ib = 0
    for dim, weight in matryoshka(queries.shape[-1], objective.dims):
        q, p, n = (first(x, dim) for x in (queries, positives, negatives))
        scores = torch.einsum("bh,bch->bc", q, torch.cat([p[:, None], n], 1)) / objective.temperature  # [B, 1 + n]
        hard = hard + weight * F.cross_entropy(scores, torch.zeros(len(q), dtype=torch.long, device=q.device))  # label: the positive
        if in_batch:
            scores = q @ first(all_positives, dim).T / objective.temperature
            ib = ib + weight * F.cross_entropy(scores, offset + torch.arange(len(q), device=q.device))  # label: its own positive
    if not in_batch:
        return hard, hard.detach(), torch.zeros_like(hard)
    return hard + ib, hard.detach(), ib.detach()


def matryoshka(hidden, dims=()):
    """(dimension, weight) of each term: the whole embedding, weight 1. With Matryoshka dimensions (F2LLM-v2's utils.py),
    each term is taken on the first `dimension` coordinates, normalised again, and the r-th from the largest down is
    weighted 1 / (r sqrt(hidden / dimension)); the terms are summed, not averaged (v2's division is commented out)."""
    return [(d, 1 / (r * math.sqrt(hidden / d))) for r, d in enumerate(dims or (hidden,), 1)]


def matryoshka_dims(hidden, chosen=None):
    """F2LLM-v2's dimensions: the hidden size, then every 2^k (3 <= k <= 14) below it, or the `chosen` ones below it."""
    return (hidden, *sorted({d for d in chosen or [2 ** k for k in range(3, 15)] if d < hidden}, reverse=True))


def first(x, dim):
    return x if dim == x.shape[-1] else F.normalize(x[..., :dim], dim=-1)


def gather(x, grad=False):
    """(rows of all ranks in rank order, offset of this rank's rows). Without `grad`, a copy that carries no
    gradient, as accelerate's gather; with it, the gradient of every row flows back to the rank that made it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return (x if grad else x.detach()), 0
    offset = dist.get_rank() * x.shape[0]
    if grad:
        return _GatherWithGrad.apply(x), offset
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts), offset


class _GatherWithGrad(torch.autograd.Function):
    """All ranks' rows in rank order. Every rank's loss uses every row, so the gradient of a rank's own rows
    is the sum over ranks of d loss_r / d rows: an all-reduce, then this rank's slice."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def split_embeddings(emb, n_queries, n_negatives):
    """Rows are laid out [queries; groups of (positive, negative_1..n) per query]."""
    docs = emb[n_queries:].view(n_queries, 1 + n_negatives, -1)
    return emb[:n_queries], docs[:, 0], docs[:, 1:]


def cached_step(model, batch, collate, chunker, objective=Objective(), amp=nullcontext):
    """Forward + backward of one batch through the gradient cache; returns (loss, hard, in_batch), detached.

    batch: dict(seqs=[queries..., then per query its positive and n negatives], n_queries, n_negatives, in_batch).
    collate: token lists -> the model's inputs on its device; chunker: seqs -> index lists (speed.chunker: longest first,
    as many chunks on every rank, which the place of the one synchronising backward below relies on).
    One gradient all-reduce per step, as in a plain step: every backward, and every forward with autograd (DDP sets up
    its hooks there), runs under no_sync except the re-embedding of the second-to-last chunk, the step's last backward;
    a batch of one chunk is a plain step."""
    seqs = batch["seqs"]
    chunks, device = chunker(seqs), next(model.parameters()).device
    rows = speed.to_device(torch.tensor([i for idx in chunks for i in idx]), device).split([len(idx) for idx in chunks])
    embed = lambda k: model(*collate([seqs[i] for i in chunks[k]]))
    emb, states = torch.empty(len(seqs), hidden_size(model), device=device), []
    # 1. every chunk without autograd, its RNG state recorded; the last one with autograd, so it is embedded once
    with torch.no_grad(), amp():
        for k in range(len(chunks) - 1):
            states.append(rng_state(device))
            emb[rows[k]] = embed(k)
    with speed.no_sync(model) if len(chunks) > 1 else nullcontext():
        with amp():
            last = embed(-1)
        emb[rows[-1]] = last.detach()
        # 2. the loss on the detached embeddings; its backward caches d loss / d embedding
        emb.requires_grad_(True)
        loss, hard, ib = f2llm_loss(*split_embeddings(emb, batch["n_queries"], batch["n_negatives"]), batch["in_batch"], objective)
        loss.backward()
        last.backward(emb.grad[rows[-1]])
    # 3. every other chunk again, with autograd and its recorded RNG state, backpropagating its cached gradient
    for k in range(len(chunks) - 1):
        with speed.no_sync(model) if k < len(chunks) - 2 else nullcontext(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            restore_rng(states[k], device)
            with amp():
                again = embed(k)
            again.backward(emb.grad[rows[k]])
    return loss.detach(), hard, ib


def hidden_size(model):
    return (model.module if hasattr(model, "module") else model).backbone.config.hidden_size


def rng_state(device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def restore_rng(state, device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def heldout_loss(model, batches, collate, chunker, objective=Objective(), amp=nullcontext):
    """Mean held-out loss per source, the same on any number of ranks: each rank embeds its shard of a held-out
    global batch, the shards are gathered, and the loss is computed on the whole batch."""
    sums, device, was_training = {}, next(model.parameters()).device, model.training
    model.eval()
    with torch.no_grad():
        for b in batches:
            emb = torch.empty(len(b["seqs"]), hidden_size(model), device=device)
            for idx in chunker(b["seqs"]):
                with amp():
                    emb[idx] = model(*collate([b["seqs"][i] for i in idx]))
            q, p, negs = (gather(x)[0] for x in split_embeddings(emb, b["n_queries"], b["n_negatives"]))
            total = sums.setdefault(b["source"], [0.0, 0])
            total[0] += f2llm_loss(q, p, negs, b["in_batch"], objective, gather_ranks=False)[0].item()
            total[1] += 1
    model.train(was_training)
    per_source = {name: s / n for name, (s, n) in sums.items()}
    return (sum(per_source.values()) / len(per_source) if per_source else None), per_source
