"""The GPU figures: the cached training step's speed, each lever measured in the same run.

    python bench.py --gpu                      # one H100 or H200, the 0.6B architecture; stops itself after --budget-s 540
    python bench.py --gpu --no-checks --profiles full --variants 0 1 2     # a part alone, for a second call
    python bench.py --gpu --device cpu --size tiny --queries 2 --max-len 48   # the same code as a CPU dry run (tested)

Before timing, on the device itself: packed == padded embeddings through its attention kernel, and the cached
bf16 gradient against one plain bf16 pass (packed rows go through FlexAttention on a GPU without flash-attn, padded
ones through sdpa, as train.py and eval.py run them). Then each variant of VARIANTS runs full AdamW steps of
`--queries` queries x (query, positive, 7 negatives) on F2LLM-like lengths (queries of a few dozen tokens, passages
of a few hundred) and at max length (the 0.6b preset's 1024), after counting the operations the host issues per
chunk. MFU counts 6 x matrix parameters + causal attention per real token (the cache's extra forwards are not useful
work) against 989 TFLOP/s (H100 and H200, bf16 dense).
The parts run in the order of what they tell (run): on an H200 the checks and the first row took 373 s and seven
rows 532 s, so the whole table does not fit one 10-minute call; the budget skips and names what is left.
"""
import os
import tempfile
import time
from contextlib import contextmanager, nullcontext
from collections import namedtuple
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import builtin
import checkpoint
import launch
import loss as f2llm_loss
import model as f2llm_model
import speed
import train

PEAK_TFLOPS = 989.0


class Variant(namedtuple("Variant", "name precision chunks compile liger scale")):
    """chunks: "sequences" (--chunk-size), "tokens" (padded, --chunk-tokens) or "packed"; scale: times that size."""
    packed = property(lambda self: self.chunks == "packed")


VARIANTS = [
    Variant("baseline: fp32 weights + bf16 autocast, padded", "fp32", "sequences", False, False, 1),
    Variant("bf16 weights (FSDP2 mixed precision)", "bf16", "sequences", False, False, 1),
    Variant("bf16, 4x larger chunks", "bf16", "sequences", False, False, 4),
    Variant("bf16, padded chunks by tokens", "bf16", "tokens", False, False, 1),
    Variant("bf16 + liger-kernel", "bf16", "sequences", False, True, 1),
    Variant("bf16 + packing", "bf16", "packed", False, False, 1),
    Variant("bf16 + packing, 4x larger chunks", "bf16", "packed", False, False, 4),
    Variant("bf16 + packing + liger, 4x larger chunks", "bf16", "packed", False, True, 4),
    Variant("bf16 + torch.compile, padded (sdpa)", "bf16", "sequences", True, False, 1),
    Variant("bf16 + packing + torch.compile", "bf16", "packed", True, False, 1),
    Variant("all: bf16 + packing + compile + liger", "bf16", "packed", True, True, 1),
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


def settings(variant, chunk_tokens=None, chunk_size=None):
    """The train.py flags a variant stands for; chunk_size, chunk_tokens: the run's, before the variant's scale."""
    tokens = chunk_tokens * variant.scale if chunk_tokens and variant.chunks != "sequences" else None
    return SimpleNamespace(precision=variant.precision, compile=variant.compile, liger=variant.liger, fsdp=False, chunk_tokens=tokens,
                           padded=variant.chunks == "tokens", chunk_size=chunk_size * variant.scale if chunk_size else None)


def build(size, args, device):
    """The model as train.py builds it for these flags, and its collate (packed rows filled as train.py fills them)."""
    model, tokenizer = f2llm_model.load(size, random_init=True, device=device, packed=speed.packs(args))
    model = speed.parallelize(model, args, 1, 0, device)
    return model, tokenizer, train.collate_for(args, tokenizer, device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_checks(size, max_len, device):
    """What only the device can show: its attention kernel on packed rows against the padded path (the one
    evaluation takes), and the cache under bf16 through that kernel's backward."""
    model, tokenizer, collate = build(size, settings(Variant("packed", "bf16", "packed", False, False, 1), max_len * 4), device)
    kernels = model.backbone.config._attn_implementation, speed.attention_implementation(device)
    use = model.backbone.set_attn_implementation
    batch = make_batch("f2llm", 4, max_len, tokenizer.eos_token_id, seed=1)
    with torch.no_grad():
        packed = model(*collate(batch["seqs"]))
        use(kernels[1])
        padded = model(*f2llm_model.pad(batch["seqs"], tokenizer.pad_token_id, device=device))
        use(kernels[0])
    grads = lambda: {n: p.grad.full_tensor().float().clone() for n, p in model.named_parameters()}
    with speed.gathered(model):
        f2llm_loss.cached_step(model, batch, collate, lambda seqs: speed.chunk_by_tokens(seqs, max_len * 4, device))
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


def amp_for(variant, device):
    return (lambda: speed.autocast(device)) if variant.precision == "fp32" else nullcontext


def real_share(seqs, variant, chunk_size, chunk_tokens):
    """Real tokens / tokens the step computes (the padding of padded chunks, the filling of compiled packed rows)."""
    args = settings(variant, chunk_tokens, chunk_size)
    lengths = [[len(seqs[i]) for i in c] for c in speed.chunker(args, "cpu")(seqs)]
    computed = [max(speed.packed_width(args) or 0, sum(n)) if variant.packed else len(n) * max(n) for n in lengths]
    return sum(map(len, seqs)) / sum(computed)


def make_step(model, collate, batch, variant, chunk_size, chunk_tokens, device):
    """One full training step as train.py runs it: cached forward + backward, clipping, AdamW; chunks of the run's
    size times the variant's scale."""
    chunker = speed.chunker(settings(variant, chunk_tokens, chunk_size), device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), weight_decay=0.01)
    amp = amp_for(variant, device)

    def step():
        with speed.gathered(model):
            f2llm_loss.cached_step(model, batch, collate, chunker, amp=amp)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
    return step


def step_time(step, repeats):
    step()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return min(times)


@torch.no_grad()
def embeddings(model, collate, variant, seqs, device):
    """The variant's embeddings of a fixed batch, in the mode of the cache's first pass (no grad, training mode)."""
    with amp_for(variant, device)():
        return model(*collate(seqs)).float()


def profile_step(step, device, rows=12):
    """Where one step's device time goes: the top kernels by their own time, and how busy the device was."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        step()
        wall = time.perf_counter() - t
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    busy = sum(getattr(e, key) for e in events if not cuda or e.device_type.name == "CUDA") / 1e6
    print(f"profile | {wall:.2f} s wall (profiled), device busy {busy:.2f} s ({busy / wall:.0%})", flush=True)
    print(events.table(sort_by=key, row_limit=rows, max_name_column_width=70), flush=True)


class _Operations(TorchDispatchMode):
    """Counts the aten operations dispatched inside it."""
    n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def operations(size, device, chunks=4):
    """Host work per chunk, whatever its size: the aten operations of one cached step (short sequences, `chunks`
    chunks) divided by its chunks, each issued by the host one by one (on a GPU, a kernel launch or more each)."""
    batch = make_batch("f2llm", 4, 64, builtin.qwen3_tokenizer().eos_token_id)
    rows = [(VARIANTS[0], True), (VARIANTS[1], False), (VARIANTS[1], True)]
    for variant, once in rows:
        model, _, collate = build(size, settings(variant), device)
        for _ in range(2):  # the first step pays one-time work (lazy initialisation); the second is counted
            with _Operations() as counted, speed.gathered(model) if once else nullcontext():
                f2llm_loss.cached_step(model, batch, collate, lambda seqs: speed.chunk_by_length(seqs, -(-len(seqs) // chunks)),
                                       amp=amp_for(variant, device))
            model.zero_grad(set_to_none=True)
        how = ("FSDP2 gathers weights per forward and backward" if not once else "weights gathered once per step") if variant.precision == "bf16" else ""
        print(f"operations per chunk | {variant.name:46} | {how:47} | {counted.n // chunks:,}", flush=True)


def largest_chunk(model, collate, eos, packed, max_len, device, amp=nullcontext):
    """The largest chunk (sequences of max_len, or packed tokens) whose forward + backward fits, and its peak GiB."""
    best, peak = None, float("nan")
    for n in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128):
        seqs = [list(range(1, max_len)) + [eos]] * n
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            with amp():
                emb = model(*collate(seqs))
            emb.float().sum().backward()
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
    model, tokenizer, collate = build(size, settings(Variant("padded", "bf16", "sequences", False, False, 1)), device)
    fits, peak = largest_chunk(model, collate, tokenizer.eos_token_id, False, max_len, device)
    print(f"memory | {size:5} | bf16 weights, padded, one GPU | largest chunk {fits} | its peak {peak:5.1f} GiB", flush=True)
    del model


def against_sentence_transformers(size, batch, ours_seconds, chunk_size, device, tokenizer):
    try:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    except ImportError as e:
        return print(f"sentence-transformers not importable ({e}): comparison skipped")
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


def run(size="0.6b", queries=32, device="cuda", max_len=1024, chunk_size=16, chunk_tokens=16_384, repeats=1, memory_sizes=("1.7b", "4b"),
        profiles=("full", "f2llm"), variants=None, checks_first=True, profile_step_too=True, budget_s=540):
    """The parts in the order of what they tell: checks, F2LLM-like lengths, where one step's time goes, against
    sentence-transformers, the 1.7B/4B memory, full-length rows, torch.compile rows last (the slowest to build).
    Past budget_s the remaining parts are skipped, each named, so the run ends inside a lent machine's call.
    Every part runs even when one before it failed: a failure prints its error and the run ends with
    "CHECKS FAILED" and exit status 1."""
    device = torch.device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch._dynamo.config.recompile_limit = 64  # many models and modes in one process; past the limit dynamo runs eager
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    print(f"{name} | torch {torch.__version__} | {size} random init | {queries} queries x 9 sequences | chunk {chunk_size} sequences "
          f"or {chunk_tokens:,} tokens", flush=True)
    start, failures, skipped = time.perf_counter(), [], []
    chosen = [VARIANTS[i] for i in (variants if variants is not None else range(len(VARIANTS)))]
    eos = builtin.qwen3_tokenizer().eos_token_id
    batches = {p: make_batch(p, queries, max_len, eos) for p in ("f2llm", "full")}
    probe = make_batch("f2llm", 4, max_len, eos, seed=2)["seqs"]
    state = dict(best=None, reference=None)

    def attempt(what, fn, *args):
        if time.perf_counter() - start > budget_s:
            return skipped.append(what)
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - reported, counted, and the run goes on
            failures.append(what)
            print(f"FAILED {what}: {type(e).__name__}: {str(e)[:500]}", flush=True)

    def rows(profile, compiled):
        for variant in (v for v in chosen if v.compile == compiled):
            if variant.liger and (device.type != "cuda" or not _has_liger()):
                print(f"{profile:5} | {variant.name:46} | skipped: {'needs CUDA' if device.type != 'cuda' else 'liger-kernel not installed'}")
                continue
            with _qwen3_module_restored():  # liger patches transformers' Qwen3 module for every model built after it
                result = attempt(f"{profile} | {variant.name}", measure, profile, variant, batches[profile], probe, state["reference"], size,
                                 max_len, chunk_size, chunk_tokens, device, repeats, start)
            if result is None:
                continue
            seconds, emb, tokenizer, diff = result
            if state["reference"] is None:
                state["reference"] = emb
            if diff is not None and diff > 3e-2:
                failures.append(f"{variant.name} embeddings")
            if state["best"] is None or profile == "f2llm" and seconds < state["best"][0]:
                state["best"] = (seconds, variant, batches[profile], tokenizer)

    with launch.process_group(1, device, needed=True):
        if checks_first and attempt("checks", device_checks, size, max_len, device) is False:
            failures.append("checks")
        if profile_step_too:  # where a step's time goes, part 1: the host's work per chunk
            attempt("operations per chunk", operations, size, device)
        print(f"({time.perf_counter() - start:.0f} s)", flush=True)
        if "f2llm" in profiles:
            rows("f2llm", compiled=False)
        if state["best"]:
            seconds, variant, batch, tokenizer = state["best"]
            if profile_step_too:
                with _qwen3_module_restored():
                    attempt(f"profile of {variant.name}", profile_variant, variant, batch, size, chunk_size, chunk_tokens, device)
            attempt("sentence-transformers comparison", against_sentence_transformers, size, batch, seconds, chunk_size, device, tokenizer)
        for other in memory_sizes:
            attempt(f"memory {other}", chunk_memory, other, max_len, device)
        if "full" in profiles:
            rows("full", compiled=False)
        for profile in (p for p in ("f2llm", "full") if p in profiles):
            rows(profile, compiled=True)
        print(f"compiled graphs {torch._dynamo.utils.counters['stats']['unique_graphs']}, graph breaks "
              f"{sum(torch._dynamo.utils.counters['graph_break'].values())}; {time.perf_counter() - start:.0f} s in all", flush=True)
        if skipped:
            print(f"skipped past the {budget_s} s budget: {'; '.join(skipped)}", flush=True)
        print("checks passed" if not failures else f"CHECKS FAILED: {', '.join(failures)}", flush=True)
    if failures:
        raise SystemExit(1)


def measure(profile, variant, batch, probe, reference, size, max_len, chunk_size, chunk_tokens, device, repeats, start):
    """One row of the table: the variant's step time, MFU, peak memory, largest chunk, and its embeddings of a fixed
    batch against the first row's (same seed, so the same weights)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, tokenizer, collate = build(size, settings(variant, chunk_tokens), device)
    emb = embeddings(model, collate, variant, probe, device)
    diff = None if reference is None else (emb - reference).abs().max().item()
    step = make_step(model, collate, batch, variant, chunk_size, chunk_tokens, device)
    tokens = sum(map(len, batch["seqs"]))
    try:
        seconds = step_time(step, repeats)
    except torch.OutOfMemoryError:
        print(f"{profile:5} | {variant.name:46} | out of memory", flush=True)
        return None
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    mfu = model_flops(model, batch["seqs"]) / seconds / (PEAK_TFLOPS * 1e12)
    probed = profile == "full" and not (variant.compile and variant.packed)  # compiled per row width: one compilation per probe
    fits = largest_chunk(model, collate, tokenizer.eos_token_id, variant.packed, max_len, device, amp_for(variant, device))[0] if probed else "-"
    chunk = f"{chunk_size * variant.scale} seq" if variant.chunks == "sequences" else f"{chunk_tokens * variant.scale:,} tok"
    share = real_share(batch["seqs"], variant, chunk_size, chunk_tokens)
    print(f"{profile:5} | {variant.name:46} | chunk {chunk:>10} | real/computed {share:.3f} | {seconds:7.2f} s/step | "
          f"{tokens / seconds:>9,.0f} tok/s | MFU {mfu:5.1%} | "
          f"peak {memory:5.1f} GiB | largest chunk {fits} | embeddings vs first row {'-' if diff is None else f'{diff:.1e}'} | "
          f"at {time.perf_counter() - start:.0f} s", flush=True)
    return seconds, emb, tokenizer, diff


def profile_variant(variant, batch, size, chunk_size, chunk_tokens, device):
    """The variant rebuilt (the table keeps no model, so its peaks are its own), one warm-up step, one profiled."""
    print(f"profile of one step: {variant.name}", flush=True)
    model, _, collate = build(size, settings(variant, chunk_tokens), device)
    step = make_step(model, collate, batch, variant, chunk_size, chunk_tokens, device)
    step()
    profile_step(step, device)


@contextmanager
def _qwen3_module_restored():
    """liger-kernel replaces functions and classes in transformers' Qwen3 module itself; put them back afterwards."""
    from transformers.models.qwen3 import modeling_qwen3
    saved = dict(vars(modeling_qwen3))
    try:
        yield
    finally:
        vars(modeling_qwen3).update(saved)


def _has_liger():
    import importlib.util
    return importlib.util.find_spec("liger_kernel") is not None
