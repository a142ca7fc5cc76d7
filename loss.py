"""The F2LLM contrastive loss and a gradient cache that makes it exact for any batch in one chunk's memory.

Loss (F2LLM report, section 3), temperature tau = 0.05, s = cosine:
    hard     = CE over [d_i, d_i1..d_in] for each query q_i, label d_i         (every batch)
    in_batch = CE over the positives of the whole global batch, label d_i     (retrieval batches only)
    loss     = mean over queries of hard (+ in_batch)

The in-batch term as the released models were trained: the official code gathers the positives of all GPUs
with accelerate's `gather`, a copy that carries no gradient (DeepSpeed, mandatory there, makes it a copy even
on one GPU). So the in-batch term trains the queries only, and positives learn through the hard term alone.
Here the positives are gathered detached on any number of ranks, each rank scores its own queries, and DDP's
gradient averaging completes the mean over the global batch: N ranks give the gradient of one process holding
the whole global batch. `in_batch_grad=True` is the other objective, where the gradient of every gathered
positive flows back to the rank that made it (a differentiable all-gather); not the released recipe.

Gradient cache (Gao et al. 2021): 1) embed every chunk without autograd, 2) loss on the
detached embeddings, backward to d loss / d embedding, 3) re-embed each chunk with autograd under the same
RNG state and backward with the cached gradient. Exact; memory of one chunk; one extra forward per chunk but the
last, which is embedded with autograd in step 1 and backpropagated right after step 2.
"""
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F

TEMPERATURE = 0.05  # never changed in the official code


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


def f2llm_loss(queries, positives, negatives, in_batch, temperature=TEMPERATURE, gather_ranks=True, in_batch_grad=False):
    """queries, positives: [B, H]; negatives: [B, n, H]; all L2-normalised. Returns (loss, hard, in_batch).
    The in-batch candidates are the positives of every rank (gather_ranks=False when the caller holds the whole
    batch); they carry the in-batch term's gradient only with in_batch_grad."""
    candidates = torch.cat([positives[:, None], negatives], 1)  # [B, 1 + n, H]
    scores = torch.einsum("bh,bch->bc", queries, candidates) / temperature
    labels = torch.zeros(len(queries), dtype=torch.long, device=queries.device)
    hard = F.cross_entropy(scores, labels)
    if not in_batch:
        return hard, hard.detach(), torch.zeros_like(hard)
    if gather_ranks:
        all_positives, offset = gather(positives, in_batch_grad)
    else:
        all_positives, offset = (positives if in_batch_grad else positives.detach()), 0
    scores = queries @ all_positives.T / temperature
    ib = F.cross_entropy(scores, offset + torch.arange(len(queries), device=queries.device))
    return hard + ib, hard.detach(), ib.detach()


def split_embeddings(emb, n_queries, n_negatives):
    """Rows are laid out [queries; groups of (positive, negative_1..n) per query]."""
    docs = emb[n_queries:].view(n_queries, 1 + n_negatives, -1)
    return emb[:n_queries], docs[:, 0], docs[:, 1:]


@contextmanager
def no_sync(model):
    """Skip the gradient all-reduce for this forward + backward: DDP's no_sync, FSDP2's gradient sync switch."""
    if hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


@contextmanager
def gathered(model):
    """FSDP2's weights gathered once for a whole step. By default FSDP2 gathers a layer's weights (all-gather, cast to
    the compute dtype) before each of its forwards and backwards and frees them after: three gathers per layer per
    chunk. Kept for the step, they cost one copy of the weights in the compute dtype; they go back to their shards at
    the end, before the optimizer changes the masters (the gathered copies would then be stale)."""
    if not hasattr(model, "set_reshard_after_forward"):
        yield
        return
    model.set_reshard_after_forward(False)
    model.set_reshard_after_backward(False)
    try:
        yield
    finally:
        model.set_reshard_after_backward(True)
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # FSDP2's own choice for the root
        for module in model.modules():
            if hasattr(module, "reshard"):
                module.reshard()


def chunk_by_length(seqs, chunk_size):
    """Index lists of at most chunk_size sequences, longest first, so each chunk pads to similar lengths."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    return [order[i:i + chunk_size] for i in range(0, len(order), chunk_size)]


def chunk_by_tokens(seqs, chunk_tokens, device="cpu", padded=False):
    """Index lists of the sequences of each chunk, longest first: as many as chunk_tokens tokens hold (a longer
    sequence alone), counting real tokens for a packed row, or rows x the longest for a padded chunk. Every rank
    gets the same number of chunks, because under FSDP a forward is a collective: where a rank has fewer, its
    largest chunks are split (one small all-reduce)."""
    chunks, used = [[]], 0
    for i in sorted(range(len(seqs)), key=lambda i: -len(seqs[i])):
        cost = (len(chunks[-1]) + 1) * len(seqs[chunks[-1][0]]) if padded and chunks[-1] else used + len(seqs[i])
        if chunks[-1] and cost > chunk_tokens:
            chunks.append([])
            used = 0
        chunks[-1].append(i)
        used += len(seqs[i])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        most = torch.tensor(len(chunks), device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        most = int(most.item())
        while len(chunks) < most:
            big = max((c for c in chunks if len(c) > 1), key=lambda c: sum(len(seqs[i]) for i in c))
            chunks.remove(big)
            chunks += [big[:len(big) // 2], big[len(big) // 2:]]
    return chunks


def make_chunks(seqs, chunk_size=None, chunk_tokens=None, device="cpu", padded=False):
    """Padded chunks of chunk_size sequences; or chunks of chunk_tokens tokens, packed (collate with model.pack) or,
    with padded, padded rows whose area holds chunk_tokens (collate with model.pad)."""
    return chunk_by_tokens(seqs, chunk_tokens, device, padded) if chunk_tokens else chunk_by_length(seqs, chunk_size)


def to_device(t, device):
    """A CPU tensor onto the device without a host sync: on CUDA a copy from pageable memory first waits for the
    whole stream, which would stall the queue at every chunk; from pinned memory it is queued like a kernel."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _rng_state(device):
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _restore_rng(state, device):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_step(model, batch, collate, chunk_size=None, amp=nullcontext, temperature=TEMPERATURE, in_batch_grad=False, chunk_tokens=None,
                padded=False, gather_once=True):
    """Forward + backward of one batch through the gradient cache; returns (loss, hard, in_batch) detached.

    batch: dict(seqs=[queries..., then per query positive + n negatives], n_queries, n_negatives, in_batch).
    collate(list of token lists) -> the model's inputs on its device: model.pad for chunks of chunk_size
    sequences, model.pack for chunks of chunk_tokens tokens (model.pad with padded: chunk_tokens then counts the
    padding). Every rank runs the same number of chunks. Under FSDP2 the weights are gathered once for the step
    (gather_once=False: FSDP2's default, per forward and backward).
    """
    with gathered(model) if gather_once else nullcontext():
        return _cached_step(model, batch, collate, chunk_size, amp, temperature, in_batch_grad, chunk_tokens, padded)


def _cached_step(model, batch, collate, chunk_size, amp, temperature, in_batch_grad, chunk_tokens, padded):
    seqs = batch["seqs"]
    device = next(model.parameters()).device
    chunks = make_chunks(seqs, chunk_size, chunk_tokens, device, padded)
    rows = to_device(torch.tensor([i for idx in chunks for i in idx]), device).split([len(idx) for idx in chunks])  # each chunk's rows
    emb, states = None, []
    with torch.no_grad():
        for idx, at in zip(chunks[:-1], rows[:-1]):
            states.append(_rng_state(device))
            with amp():
                e = model(*collate([seqs[i] for i in idx]))
            emb = torch.empty(len(seqs), e.shape[1], device=device) if emb is None else emb
            emb[at] = e.float()
    # The last chunk keeps its graph: its backward follows the loss's at once, so it is embedded once, not twice. It
    # accumulates locally unless it is the only chunk (the last chunk embedded again makes the one all-reduce).
    with no_sync(model) if len(chunks) > 1 else nullcontext():
        with amp():
            e = model(*collate([seqs[i] for i in chunks[-1]]))
        emb = torch.empty(len(seqs), e.shape[1], device=device) if emb is None else emb
        emb[rows[-1]] = e.detach().float()
        emb.requires_grad_(True)
        loss, hard, ib = f2llm_loss(*split_embeddings(emb, batch["n_queries"], batch["n_negatives"]), batch["in_batch"], temperature,
                                    in_batch_grad=in_batch_grad)
        loss.backward()
        e.float().backward(emb.grad[rows[-1]])
    for k, (idx, at) in enumerate(zip(chunks[:-1], rows[:-1])):
        with (no_sync(model) if k < len(chunks) - 2 else nullcontext()), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            _restore_rng(states[k], device)
            with amp():
                e = model(*collate([seqs[i] for i in idx]))
            e.float().backward(emb.grad[at])
    return loss.detach(), hard, ib


def heldout_loss(model, batches, collate, amp, chunk_size, chunk_tokens, temperature=TEMPERATURE, padded=False):
    """Mean held-out loss per source, the same on any number of ranks: each rank embeds its shard of a held-out
    global batch, the shards are gathered, and the loss is computed on the whole batch."""
    sums = {}
    model.eval()
    with torch.no_grad():
        for b in batches:
            emb = None
            for idx in make_chunks(b["seqs"], chunk_size, chunk_tokens, next(model.parameters()).device, padded):
                with amp():
                    e = model(*collate([b["seqs"][i] for i in idx])).float()
                emb = torch.empty(len(b["seqs"]), e.shape[1], device=e.device) if emb is None else emb
                emb[idx] = e
            q, p, negs = (gather(x)[0] for x in split_embeddings(emb, b["n_queries"], b["n_negatives"]))
            loss = f2llm_loss(q, p, negs, b["in_batch"], temperature, gather_ranks=False)[0]
            total = sums.setdefault(b["source"], [0.0, 0])
            total[0] += loss.item()
            total[1] += 1
    model.train()
    per_source = {name: s / n for name, (s, n) in sums.items()}
    return (sum(per_source.values()) / len(per_source) if per_source else None), per_source
