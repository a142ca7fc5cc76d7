"""The GPU figures: one table of the cached training step's speed, each lever measured in the same run.

    python bench.py --gpu                                   # one H100 or H200, the 0.6B architecture: about 8 minutes
    python bench.py --gpu --device cpu --size tiny --queries 2 --max-len 48    # the same code as a CPU dry run (tested)

Before timing, on the device itself: packed == padded embeddings through its attention kernel, and the cached
bf16 gradient against one plain bf16 pass (packed rows go through FlexAttention on a GPU without flash-attn, padded
ones through sdpa, as train.py and eval.py run them). Then each variant (the baseline, bf16 weights, packing, torch.compile,
liger-kernel, all together) runs full AdamW steps of `--queries` queries x (query, positive, 7 negatives) on two
length profiles: every sequence at max length (the 0.6b preset's 1024), and F2LLM-like lengths (queries of a few
dozen tokens, passages of a few hundred). MFU counts 6 x matrix parameters + causal attention per real token
(the cache's extra forward is not useful work) against 989 TFLOP/s (H100 and H200, bf16 dense). Last, ours
against sentence-transformers' CachedMultipleNegativesRankingLoss on the same model, batch and data, and the
largest chunk of the 1.7B and 4B architectures at max length (the presets' chunk sizes, measured).
"""
import os
import tempfile
import time
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import torch

import checkpoint
import distributed
import loss as f2llm_loss
import model as f2llm_model
import train

PEAK_TFLOPS = 989.0
VARIANTS = [  # name, precision, packed, compile, liger
    ("baseline: fp32 weights + bf16 autocast, padded", "fp32", False, False, False),
    ("bf16 weights (FSDP2 mixed precision)", "bf16", False, False, False),
    ("bf16 + packing", "bf16", True, False, False),
    ("bf16 + packing + torch.compile", "bf16", True, True, False),
    ("bf16 + packing + liger-kernel", "bf16", True, False, True),
    ("all: bf16 + packing + compile + liger", "bf16", True, True, True),
]


def lengths(profile, n_queries, max_len, rng):
    """Token counts of one batch laid out as the loss expects: queries, then (positive, 7 negatives) per query."""
    if profile == "full":
        return [max_len] * (n_queries * 9)
    queries = np.clip(rng.lognormal(np.log(24), 0.6, n_queries), 4, max_len)
    docs = np.clip(rng.lognormal(np.log(min(220, max_len // 2)), 0.7, n_queries * 8), 8, max_len)
    return [int(x) for x in np.concatenate([queries, docs])]


def make_batch(profile, n_queries, max_len, eos, seed=0):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, 150_000, n - 1).tolist() + [eos] for n in lengths(profile, n_queries, max_len, rng)]
    return dict(seqs=seqs, n_queries=n_queries, n_negatives=7, in_batch=True)


def model_flops(model, seqs):
    """6 x matrix parameters per token (forward and backward) + causal attention, summed over the real sequences."""
    cfg = model.backbone.config
    matmul = sum(p.numel() for p in model.parameters()) - cfg.vocab_size * cfg.hidden_size
    attention = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim  # QK^T and AV per token pair, forward
    return sum(6 * matmul * len(s) + 3 * attention * len(s) ** 2 / 2 for s in seqs)


def build(size, precision, compile_, liger, device, packed=False):
    model, tokenizer = f2llm_model.load(size, random_init=True, device=device, packed=packed)
    args = SimpleNamespace(precision=precision, compile=compile_, liger=liger, fsdp=False)
    return train.parallelize(model, args, 1, 0, device), tokenizer


def collate_for(packed, tokenizer, device):
    return (lambda s: f2llm_model.pack(s, device)) if packed else (lambda s: f2llm_model.pad(s, tokenizer.pad_token_id, device=device))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def checks(size, max_len, device):
    """What only the device can show: its attention kernel on packed rows against the padded path (the one
    evaluation takes), and the cache under bf16 through that kernel's backward."""
    model, tokenizer = build(size, "bf16", False, False, device, packed=True)
    kernels = model.backbone.config._attn_implementation, f2llm_model.attention_implementation(device)
    use = model.backbone.set_attn_implementation
    batch = make_batch("f2llm", 4, max_len, tokenizer.eos_token_id, seed=1)
    with torch.no_grad():
        packed = model(*f2llm_model.pack(batch["seqs"], device))
        use(kernels[1])
        padded = model(*f2llm_model.pad(batch["seqs"], tokenizer.pad_token_id, device=device))
        use(kernels[0])
    grads = lambda: {n: p.grad.full_tensor().float().clone() for n, p in model.named_parameters()}
    f2llm_loss.cached_step(model, batch, collate_for(True, tokenizer, device), chunk_tokens=max_len * 4)
    cached = grads()
    model.zero_grad()
    use(kernels[1])
    emb = model(*f2llm_model.pad(batch["seqs"], tokenizer.pad_token_id, device=device))
    f2llm_loss.f2llm_loss(*f2llm_loss.split_embeddings(emb, 4, 7), True)[0].backward()
    plain = grads()
    scale = max(g.abs().max().item() for g in plain.values())
    worst = max((cached[n] - plain[n]).abs().max().item() for n in plain) / scale
    print(f"check: packed ({kernels[0]}) vs padded ({kernels[1]}) embeddings: largest difference "
          f"{(packed - padded).abs().max().item():.2e} (bf16; tolerance 3e-2)", flush=True)
    print(f"check: cached packed ({kernels[0]}) vs plain padded ({kernels[1]}) bf16 gradient, largest difference / largest gradient "
          f"{worst:.2e} (tolerance 3e-2)", flush=True)
    return (packed - padded).abs().max().item() < 3e-2 and worst < 3e-2


def step_time(model, tokenizer, batch, variant, chunk_size, chunk_tokens, device, repeats):
    _, precision, packed, _, _ = variant
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), weight_decay=0.01)
    amp = (lambda: f2llm_model.autocast(device)) if precision == "fp32" else nullcontext
    collate = collate_for(packed, tokenizer, device)

    def step():
        f2llm_loss.cached_step(model, batch, collate, chunk_size, amp, chunk_tokens=chunk_tokens if packed else None)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
    step()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return min(times)


def largest_chunk(model, tokenizer, packed, max_len, device):
    """The largest chunk (sequences of max_len, or packed tokens) whose forward + backward fits, and its peak GiB."""
    best, peak = None, float("nan")
    for n in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64):
        seqs = [list(range(1, max_len)) + [tokenizer.eos_token_id]] * n
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            model(*collate_for(packed, tokenizer, device)(seqs)).float().sum().backward()
            sync(device)
            best = n
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        except torch.OutOfMemoryError:
            break
        finally:
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if best is None:
        return "none fits", peak
    return (f"{best * max_len:,} tokens" if packed else f"{best} x {max_len}"), peak


def chunk_memory(size, max_len, device):
    """A preset's chunk measured: bf16 weights as train.py runs on GPUs, padded chunks, one GPU holding the whole model
    (fp32 masters and gradients unsharded, so more ranks under --fsdp leave more room, never less)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model, tokenizer = build(size, "bf16", False, False, device)
    fits, peak = largest_chunk(model, tokenizer, False, max_len, device)
    print(f"memory | {size:5} | bf16 weights, padded, one GPU | largest chunk {fits} | its peak {peak:5.1f} GiB", flush=True)
    del model


def against_sentence_transformers(size, batch, ours_seconds, chunk_size, device, tokenizer):
    try:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    except ImportError:
        return print("sentence-transformers not installed: comparison skipped")
    model, _ = f2llm_model.load(size, random_init=True, device="cpu")
    with tempfile.TemporaryDirectory() as folder:
        checkpoint.export_model(folder, model.backbone, model.backbone.state_dict(), tokenizer, max(map(len, batch["seqs"])), "", "")
        st = SentenceTransformer(os.path.join(folder, "checkpoint"), device=str(device), model_kwargs={"dtype": torch.bfloat16})
    st_loss = CachedMultipleNegativesRankingLoss(st, scale=1 / f2llm_loss.TEMPERATURE, mini_batch_size=chunk_size)
    texts = [tokenizer.decode(s[:-1]) for s in batch["seqs"]]
    B = batch["n_queries"]
    columns = [texts[:B]] + [texts[B:][j::8] for j in range(8)]
    features = [st.preprocess(c) for c in columns]
    features = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in f.items()} for f in features]
    opt = torch.optim.AdamW(st.parameters(), lr=1e-5)

    def step():
        st_loss(features, None).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
    step()
    t = time.perf_counter()
    step()
    theirs = time.perf_counter() - t
    print(f"vs sentence-transformers CachedMNRL (bf16 weights, mini-batch {chunk_size}): ours {ours_seconds:.2f} s/step, theirs "
          f"{theirs:.2f} s/step: {theirs / ours_seconds:.2f}x", flush=True)


def run(size="0.6b", queries=32, device="cuda", max_len=1024, chunk_size=16, chunk_tokens=16_384, repeats=1, memory_sizes=("1.7b", "4b")):
    device = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    print(f"{name} | {size} random init | {queries} queries x 9 sequences | chunk {chunk_size} sequences or {chunk_tokens:,} tokens", flush=True)
    with distributed.process_group(1, device, needed=True):
        ok = checks(size, max_len, device)
        best = None
        for profile in ("full", "f2llm"):
            batch = make_batch(profile, queries, max_len, f2llm_model.offline_tokenizer().eos_token_id)
            tokens = sum(map(len, batch["seqs"]))
            for variant in VARIANTS:
                if (variant[3] or variant[4]) and device.type != "cuda" or variant[4] and not _has_liger():
                    print(f"{profile:5} | {variant[0]:46} | skipped: {'needs CUDA' if device.type != 'cuda' else 'liger-kernel not installed'}")
                    continue
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                model, tokenizer = build(size, variant[1], variant[3], variant[4], device, packed=variant[2])
                try:
                    seconds = step_time(model, tokenizer, batch, variant, chunk_size, chunk_tokens, device, repeats)
                except torch.OutOfMemoryError:
                    print(f"{profile:5} | {variant[0]:46} | out of memory", flush=True)
                    continue
                memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
                mfu = model_flops(model, batch["seqs"]) / seconds / (PEAK_TFLOPS * 1e12)
                fits = largest_chunk(model, tokenizer, variant[2], max_len, device)[0] if profile == "full" else "-"
                print(f"{profile:5} | {variant[0]:46} | {seconds:7.2f} s/step | {tokens / seconds:>9,.0f} tok/s | MFU {mfu:5.1%} | "
                      f"peak {memory:5.1f} GiB | largest chunk {fits}", flush=True)
                if profile == "f2llm" and (best is None or seconds < best[0]):
                    best = (seconds, batch, tokenizer)
                del model
        if best:
            against_sentence_transformers(size, best[1], best[0], chunk_size, device, best[2])
        for other in memory_sizes:
            chunk_memory(other, max_len, device)
        print("checks passed" if ok else "CHECKS FAILED", flush=True)


def _has_liger():
    import importlib.util
    return importlib.util.find_spec("liger_kernel") is not None
