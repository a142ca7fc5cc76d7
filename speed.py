"""What makes the method fast on GPUs and across them. None of it changes a gradient (each has its equivalence test);
the method files reach it through narrow calls, and a reader who skips this file still sees the whole method.

    attention_implementation, attention_masks   the kernel for a batch, and masks built from what the host knows
    chunk_by_length, chunk_by_tokens, pack      chunks of similar lengths or of a token budget; packed rows
    to_device, autocast                         copies that do not stall the GPU; bf16 compute for fp32 weights
    parallelize, gathered, no_sync              liger, torch.compile, FSDP2 or DDP; FSDP2's weights once per step
    chunker                                     train.py's flags -> how a batch is cut into chunks
"""
import functools
import importlib.util
from contextlib import contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch.nn.attention.flex_attention import create_block_mask


# ---- attention: the kernel, and its mask without a read-back --------------------------------------------------

def attention_implementation(device, packed=False):
    """flash-attention 2 on CUDA when installed; without it, FlexAttention for packed rows on CUDA (its block mask
    skips the blocks between sequences, where sdpa would take a dense T x T mask and compute every pair); sdpa
    otherwise (FlexAttention has no backward on CPU)."""
    cuda = torch.device(device).type == "cuda"
    if cuda and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "flex_attention" if cuda and packed else "sdpa"


def masks_for(backbone, attention_mask, ends, packed, width):
    """The encoder's one call: Qwen3's attention mask for a padded batch (attention_mask, None when nothing is padded)
    or a packed row (ends: each sequence's last index)."""
    if packed:
        docs = torch.searchsorted(ends, torch.arange(width, device=ends.device))[None]  # each token's sequence
    else:
        docs = None if attention_mask is None else attention_mask.long() - 1  # padding: a sequence of its own
    return attention_masks(backbone.config._attn_implementation, docs, attention_mask, width, ends.device)


def attention_masks(implementation, docs, attention_mask, width, device):
    """Qwen3's attention mask, built from what the caller knows instead of read back from the device: a token sees
    the tokens before it in its own sequence (docs: each token's sequence, [n, width]; None: one per row). Left to
    itself, transformers decides whether a batch is padded or packed by reading tensors back to the host, a sync
    that stalls the GPU at every forward. Padding counts as a sequence of its own, so no row is empty; real tokens
    see what they would in transformers' mask. flash-attention keeps transformers' path (its variable-length kernels
    need the lengths on the host anyway)."""
    if implementation == "sdpa":
        if docs is None:
            return {"full_attention": None}  # sdpa's own causal kernel
        causal = torch.ones(width, width, dtype=torch.bool, device=docs.device).tril()
        return {"full_attention": (docs[:, :, None] == docs[:, None, :])[:, None] & causal}
    if implementation == "flex_attention":  # a block mask: whole blocks between sequences are skipped
        if docs is None:
            mask_mod, rows = (lambda b, h, q, kv: q >= kv), None
        else:
            mask_mod, rows = (lambda b, h, q, kv: (docs[b, q] == docs[b, kv]) & (q >= kv)), docs.shape[0]
        build = _block_mask_compiled() if torch.device(device).type == "cuda" else create_block_mask
        return {"full_attention": build(mask_mod, rows, None, width, width, device=device)}
    return attention_mask


@functools.cache
def _block_mask_compiled():
    """create_block_mask through torch.compile, as transformers runs it on GPUs: it never holds the T x T mask."""
    return torch.compile(create_block_mask)


# ---- chunks and packed rows ---------------------------------------------------------------------------

def pack(seqs, device="cpu", width=None):
    """Sequences concatenated into one row: (input_ids [1, T], None, position_ids [1, T], ends [n]); position ids
    restart for each sequence and attention stops at its end, so no padding is computed. With width, the row is
    filled up to width tokens (T = width, unless the sequences alone are longer): every chunk the same shape, for
    kernels compiled per shape. The filling is a sequence of its own, attended by nothing and pooled by nothing."""
    lengths = [len(s) for s in seqs]
    fill = max(0, (width or 0) - sum(lengths))
    input_ids = torch.tensor([t for s in seqs for t in s] + [0] * fill, dtype=torch.long)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths + [fill]])[None]
    ends = torch.tensor(lengths).cumsum(0) - 1
    return to_device(input_ids, device), None, to_device(position_ids, device), to_device(ends, device)


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


# ---- copies and precision ---------------------------------------------------------------------------------------

def to_device(t, device):
    """A CPU tensor onto the device without a host sync: on CUDA a copy from pageable memory first waits for the
    whole stream, which would stall the queue at every chunk; from pinned memory it is queued like a kernel."""
    device = torch.device(device)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def autocast(device):
    """bf16 autocast on CUDA for fp32 weights (--precision fp32, and evaluation); plain fp32 on CPU."""
    device = torch.device(device)
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


# ---- parallelism and kernels, each switched by one flag ---------------------------------------------------------

def parallelize(model, args, world, local_rank, device):
    """Speed and data parallelism as plain functions on the plain model: liger's fused Qwen3 kernels, torch.compile
    per decoder layer, then FSDP2 (bf16 compute over fp32 master weights, reductions in fp32, on any number of ranks;
    or sharding for size) or DDP (fp32 weights)."""
    if args.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3
        # The fused linear + cross-entropy replaces a causal LM's forward; an encoder has no LM head, so it stays off.
        apply_liger_kernel_to_qwen3(model=model.backbone, fused_linear_cross_entropy=False)
    if args.compile:
        for layer in model.backbone.layers:
            layer.compile(dynamic=packed_width(args) is None)  # padded chunks change shape every time; filled rows keep one
    if args.precision == "bf16" or args.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.precision == "bf16" else MixedPrecisionPolicy()
        for layer in model.backbone.layers:
            fully_shard(layer, mp_policy=policy)
        return fully_shard(model, mp_policy=policy)
    if world > 1:  # rotary buffers are constants: no broadcast, so a forward is never a collective
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None, broadcast_buffers=False)
    return model


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


# ---- train.py's flags -> chunks and their inputs -----------------------------------------------------------------

def packs(args):
    """Whether chunks are packed rows (--chunk-tokens without --padded)."""
    return args.chunk_tokens is not None and not args.padded


def packed_width(args):
    """Under --compile each packed row is filled up to --chunk-tokens: one shape, compiled once with static shapes
    (FlexAttention is built for one shape; docs/gpu.md); it costs the step's last, partial chunk. None: rows as long as
    their sequences (and no packed rows)."""
    return args.chunk_tokens if args.compile and packs(args) else None


def chunker(args, device):
    """seqs -> index lists: chunks of --chunk-size sequences, or of --chunk-tokens tokens."""
    if args.chunk_tokens:
        return lambda seqs: chunk_by_tokens(seqs, args.chunk_tokens, device, args.padded)
    return lambda seqs: chunk_by_length(seqs, args.chunk_size)
