"""Speed and memory figures; every row is a ratio against a baseline measured in the same run.

    python bench.py          # CPU rows on the tiny Qwen3 and the built-in data (a few minutes on 2 cores)
    python bench.py --gpu    # on one CUDA GPU: the 0.6B step, each speed lever, against sentence-transformers (bench_gpu.py)
    python bench.py --data-rows 1000000   # check + tokenize a synthetic 1M-row source: time and peak memory
    python bench.py --ops 0.6b            # the aten operations one gradient-cache chunk dispatches (host work per chunk)

Rows: gradient-cache overhead, the cost of --matryoshka, memory flat in batch size, padding of length-grouped chunks, throughput
against sentence-transformers' CachedMultipleNegativesRankingLoss, and retrieval scoring against pytrec_eval.
"""
import argparse
import functools
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time

import numpy as np
import torch

import builtin
import checkpoint
import data
import launch
import metrics
import loss as f2llm_loss
import model as f2llm_model
import speed

MAX_LEN, QUERIES, CHUNK = 128, 32, 64  # the tiny model at 128 tokens, the preset's batch and chunk
CHUNKS = lambda seqs: speed.chunk_by_length(seqs, CHUNK)  # noqa: E731


def timed(fn, repeats=3):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def alternated(fns, repeats=5):
    """The fastest of `repeats` runs of each, taken in turns, so that a machine slowing down weighs on both alike."""
    times = [[] for _ in fns]
    for _ in range(repeats + 1):  # the first round warms up
        for fn, seen in zip(fns, times):
            t = time.perf_counter()
            fn()
            seen.append(time.perf_counter() - t)
    return [min(seen[1:]) for seen in times]


def builtin_batches(tokenizer, queries=QUERIES, max_len=MAX_LEN):
    tokenize, folder = functools.partial(f2llm_model.tokenize, tokenizer, max_len=max_len), builtin.training_data(os.path.join(builtin.CACHE, "stdlib-train"))
    sources = [data.load_source(f, data.task_type(data.source_name(f)), tokenize, os.path.join(builtin.CACHE, "tokenized"), progress=False)
               for f in data.find_files(folder)]
    return data.Batches(sources, queries)


def retrieval_batch(batches):
    return next(b for b in map(batches, range(batches.steps_per_epoch)) if b["in_batch"])


def uncached_step(model, batch, collate, chunk_size):
    """Baseline: the same length-grouped chunks, all kept in the autograd graph, one backward."""
    chunks = speed.chunk_by_length(batch["seqs"], chunk_size)
    order = torch.tensor([i for idx in chunks for i in idx])
    emb = torch.cat([model(*collate([batch["seqs"][i] for i in idx])) for idx in chunks])[order.argsort()]
    loss = f2llm_loss.f2llm_loss(*f2llm_loss.split_embeddings(emb, batch["n_queries"], batch["n_negatives"]), batch["in_batch"])[0]
    loss.backward()


def row_cache_overhead(model, tokenizer, batch):
    collate = lambda s: f2llm_model.pad(s, tokenizer.pad_token_id)
    plain = timed(lambda: (uncached_step(model, batch, collate, CHUNK), model.zero_grad()))
    cached = timed(lambda: (f2llm_loss.cached_step(model, batch, collate, CHUNKS), model.zero_grad()))
    n = -(-len(batch["seqs"]) // CHUNK)  # chunks; the cache adds a forward to each but the last: (4n - 1) / 3n of a plain step
    return (f"gradient cache: step {cached:.2f} s vs plain {plain:.2f} s ({len(batch['seqs'])} sequences)", cached / plain,
            f"<= 1.4 (floor ~{(4 * n - 1) / (3 * n):.2f})")


def row_matryoshka(model, tokenizer, batch):
    """What --matryoshka costs: the cached step with F2LLM-v2's loss at the tiny model's five dimensions against the plain one."""
    collate = lambda s: f2llm_model.pad(s, tokenizer.pad_token_id)
    objective = f2llm_loss.Objective(dims=f2llm_loss.matryoshka_dims(model.backbone.config.hidden_size))
    steps = [lambda o=o: (f2llm_loss.cached_step(model, batch, collate, CHUNKS, o), model.zero_grad()) for o in (f2llm_loss.Objective(), objective)]
    plain, matryoshka = alternated(steps)
    emb = torch.nn.functional.normalize(torch.randn(len(batch["seqs"]), objective.dims[0]), dim=-1).requires_grad_()
    parts = f2llm_loss.split_embeddings(emb, batch["n_queries"], batch["n_negatives"])
    alone = alternated([lambda o=o: f2llm_loss.f2llm_loss(*parts, True, o)[0].backward() for o in (f2llm_loss.Objective(), objective)], 20)
    return (f"--matryoshka ({len(objective.dims)} dimensions): cached step {matryoshka:.2f} s vs {plain:.2f} s ({len(batch['seqs'])} sequences); "
            f"the loss alone, forward and backward, {alone[1] * 1e3:.1f} ms vs {alone[0] * 1e3:.1f} ms", matryoshka / plain, "report")


def _rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_step_memory(queries):
    """In a fresh process: peak resident memory added by one cached step of `queries` queries (MiB),
    sampled every millisecond; large tensors are mmapped (MALLOC_MMAP_THRESHOLD_), so frees show in RSS."""
    torch.set_num_threads(2)
    model, tokenizer = f2llm_model.load("tiny")
    batch = retrieval_batch(builtin_batches(tokenizer, queries))
    collate = lambda s: f2llm_model.pad(s, tokenizer.pad_token_id)
    f2llm_loss.cached_step(model, retrieval_batch(builtin_batches(tokenizer, 2)), collate, CHUNKS)  # allocate grads
    base, peak, done = _rss_mib(), [0.0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.001)
    sampler = threading.Thread(target=sample)
    sampler.start()
    f2llm_loss.cached_step(model, batch, collate, CHUNKS)
    done.set()
    sampler.join()
    return peak[0] - base


def row_memory():
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the spawned process's allocator at start
    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        small, large = pool.map(_peak_step_memory, [32, 512], chunksize=1)
    return (f"memory: peak added by a cached step, 512 x (1+1+7) sequences {large:.0f} MiB vs 32 queries {small:.0f} MiB",
            large / small, "<= 1.3")


def padding_ratio(batches, grouped, chunk=CHUNK):
    real = computed = 0
    for step in range(batches.steps_per_epoch):
        seqs = batches(step)["seqs"]
        order = range(len(seqs))
        chunks = speed.chunk_by_length(seqs, chunk) if grouped else [list(order[i:i + chunk]) for i in range(0, len(seqs), chunk)]
        for idx in chunks:
            lengths = [len(seqs[i]) for i in idx]
            real, computed = real + sum(lengths), computed + max(lengths) * len(lengths)
    return real / computed


def row_padding(batches):
    ours, arrival, half = padding_ratio(batches, True), padding_ratio(batches, False), padding_ratio(batches, True, CHUNK // 2)
    return (f"padding: real/computed tokens over an epoch, {CHUNK}-sequence chunks grouped by length {ours:.3f} vs arrival order "
            f"{arrival:.3f} ({CHUNK // 2}-sequence chunks: {half:.3f})", ours, ">= 0.9")


def row_sentence_transformers(model, tokenizer, batches):
    try:
        from sentence_transformers import SentenceTransformer, models
        from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    except ImportError:
        return "sentence-transformers: not installed (pip install sentence-transformers), row skipped", None, ">= 2"
    steps = [b for b in map(batches, range(12)) if b["in_batch"]][:3]
    texts = lambda b: [tokenizer.decode(s[:-1]) for s in b["seqs"]]
    with tempfile.TemporaryDirectory() as folder:
        model.backbone.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        body = models.Transformer(folder, max_seq_length=MAX_LEN)
        st = SentenceTransformer(modules=[body, models.Pooling(model.backbone.config.hidden_size, "lasttoken"), models.Normalize()])
    st_loss = CachedMultipleNegativesRankingLoss(st, scale=1 / f2llm_loss.TEMPERATURE, mini_batch_size=CHUNK)
    features = []
    for b in steps:  # columns: queries, positives, negative_1..7, tokenized outside the timed step as ours are
        t, B = texts(b), b["n_queries"]
        docs = [t[B:][j::1 + b["n_negatives"]] for j in range(1 + b["n_negatives"])]
        features.append([st.preprocess(col) for col in [t[:B]] + docs])
    st_opt = torch.optim.AdamW(st.parameters(), lr=1e-5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    collate = lambda s: f2llm_model.pad(s, tokenizer.pad_token_id)

    def st_steps():
        for f in features:
            st_loss(f, None).backward()
            st_opt.step()
            st_opt.zero_grad()

    def our_steps():
        for b in steps:
            f2llm_loss.cached_step(model, b, collate, CHUNKS)
            opt.step()
            opt.zero_grad()
    theirs, ours = timed(st_steps, 2), timed(our_steps, 2)
    n = sum(b["n_queries"] for b in steps)
    return (f"vs sentence-transformers CachedMNRL: {n / ours:.1f} vs {n / theirs:.1f} query groups/s "
            f"(mini-batch {CHUNK}, {len(steps[0]['seqs'])} sequences/step)", theirs / ours, ">= 2")


def row_eval():
    torch.manual_seed(0)
    n_docs, n_queries, dim = 100_000, 1_000, 256
    docs = torch.nn.functional.normalize(torch.randn(n_docs, dim), dim=1)
    queries = torch.nn.functional.normalize(docs[torch.randint(0, n_docs, (n_queries,))] + 0.7 * torch.randn(n_queries, dim) / dim**0.5, dim=1)
    doc_ids, query_ids = [f"d{i}" for i in range(n_docs)], [f"q{i}" for i in range(n_queries)]
    t = time.perf_counter()
    found = metrics.search(queries, docs, doc_ids)
    run = {q: found[n] for n, q in enumerate(query_ids)}
    search_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    qrels = {q: {d: int(rng.integers(1, 3)) for d in rng.choice(list(run[q])[:50], 3, replace=False)} for q in query_ids}
    import pytrec_eval
    ks = ",".join(map(str, metrics.KS))
    t = time.perf_counter()
    ref = pytrec_eval.RelevanceEvaluator(qrels, {f"ndcg_cut.{ks}", f"map_cut.{ks}", f"recall.{ks}", f"P.{ks}"}).evaluate(run)
    theirs = time.perf_counter() - t
    t = time.perf_counter()
    ours_scores = metrics.retrieval_metrics(qrels, run)
    ours = time.perf_counter() - t
    same = all(abs(ours_scores[f"ndcg_at_{k}"] - round(np.mean([r[f"ndcg_cut_{k}"] for r in ref.values()]), 5)) < 1e-9 for k in metrics.KS)
    return (f"evaluation, 100k docs x 1k queries: search {search_s:.1f} s; scoring ours {ours:.2f} s vs pytrec_eval {theirs:.2f} s, "
            f"identical nDCG: {same}", theirs / ours, "report")


def synthetic_source(path, rows, negatives=24, seed=0, block=50_000):
    """An F2LLM-shaped parquet file: short queries, passages of about 60 words, 24 negatives drawn from the other
    passages (as mined negatives are), so most texts repeat across rows. Written in row groups, as the real files are."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(20_000)])
    text = lambda n, k: [" ".join(ws) for ws in words[rng.integers(0, len(words), (n, k))]]
    queries, passages = text(rows, 12), text(rows, 60)
    names = ["query", "passage"] + [f"negative_{j}" for j in range(1, negatives + 1)]
    with pq.ParquetWriter(path, pa.schema([(n, pa.string()) for n in names])) as writer:
        for start in range(0, rows, block):
            end = min(rows, start + block)
            negs = [[passages[i] for i in rng.integers(0, rows, end - start)] for _ in range(negatives)]
            writer.write_table(pa.table(dict(zip(names, [queries[start:end], passages[start:end], *negs]))))
    return path


def _load_once(path, cache):
    """In a fresh process: seconds and peak resident memory (MiB) to check and tokenize one source."""
    tokenize = functools.partial(f2llm_model.tokenize, builtin.qwen3_tokenizer(), max_len=512)
    start = time.perf_counter()
    source = data.load_source(path, "retrieval", tokenize, cache, progress=False)
    import resource
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, len(source.query)


def row_data(rows):
    with tempfile.TemporaryDirectory() as folder:
        path = synthetic_source(os.path.join(folder, "msmarco.parquet"), rows)
        with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            seconds, peak, n = pool.apply(_load_once, (path, os.path.join(folder, "cache")))
    return (f"data: check + tokenize a synthetic {n:,}-row source (24 negatives), {seconds:.0f} s, peak resident memory {peak / 1024:.2f} GiB",
            None, "report")


def row_mining(n_pairs):
    """Rows per second mined (embedding included) on the built-in pairs with the tiny model, ours against
    sentence-transformers' mine_hard_negatives with the same model, thresholds and corpus."""
    import mine
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives
    funcs = builtin.stdlib_functions()[:n_pairs]
    queries, positives = [f["summary"] for f in funcs], [f["code"] for f in funcs]
    model, tokenizer = f2llm_model.load("tiny")
    prompt = f2llm_model.query_prompt(builtin.RETRIEVAL_INSTRUCTION)
    settings = dict(range_min=5, range_max=100, max_score=0.8, relative_margin=0.05)
    t = time.perf_counter()
    rows, _ = mine.mine_retrieval(queries, positives, None, mine.embedder(model, tokenizer, "tiny", MAX_LEN, 32, None), prompt, **settings)
    ours = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as folder:
        checkpoint.export_model(folder, model.backbone, model.backbone.state_dict(), tokenizer, MAX_LEN, builtin.RETRIEVAL_INSTRUCTION, "")
        st = SentenceTransformer(os.path.join(folder, "checkpoint"), device="cpu")
        t = time.perf_counter()
        theirs_rows = mine_hard_negatives(Dataset.from_dict(dict(query=queries, positive=positives)), st, query_prompt=prompt, num_negatives=24,
                                          output_format="n-tuple", verbose=False, **settings)
        theirs = time.perf_counter() - t
    return (f"mining {len(queries):,} pairs with the tiny model: ours {len(queries) / ours:.0f} pairs/s ({len(rows)} rows kept) vs "
            f"sentence-transformers mine_hard_negatives {len(queries) / theirs:.0f} pairs/s ({len(theirs_rows)} kept)", theirs / ours, "report")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="the GPU table (bench_gpu.py): each speed lever, checks first")
    p.add_argument("--size", default="0.6b", help="--gpu: architecture (random weights)")
    p.add_argument("--queries", type=int, default=32, help="--gpu: queries per step (x 9 sequences)")
    p.add_argument("--max-len", type=int, default=1024, help="--gpu: tokens of a full-length sequence")
    p.add_argument("--chunk-size", type=int, default=16, help="--gpu: sequences per padded chunk (the 0.6b preset)")
    p.add_argument("--chunk-tokens", type=int, default=16_384, help="--gpu: tokens per packed chunk")
    p.add_argument("--device", default="cuda", help="--gpu: cpu runs the same code as a dry run")
    p.add_argument("--memory-sizes", nargs="*", default=["1.7b", "4b"], help="--gpu: architectures whose largest chunk is measured last")
    p.add_argument("--profiles", nargs="+", default=["full", "f2llm"], choices=["full", "f2llm"], help="--gpu: length profiles to time")
    p.add_argument("--variants", nargs="+", type=int, help="--gpu: rows of bench_gpu.VARIANTS to time (default: all)")
    p.add_argument("--no-checks", action="store_true", help="--gpu: skip the device checks")
    p.add_argument("--no-profile", action="store_true", help="--gpu: skip the operation count and the profile of one step")
    p.add_argument("--budget-s", type=float, default=540, help="--gpu: skip what is left after this many seconds (a lent GPU's call is 600 s)")
    p.add_argument("--ops", metavar="SIZE", help="only the aten operations one gradient-cache chunk of this architecture dispatches")
    p.add_argument("--mine", type=int, metavar="PAIRS", help="only the mining row, on this many built-in pairs")
    p.add_argument("--data-rows", type=int, help="only the data-loading row, on a synthetic source of this many rows (1000000: minutes)")
    args = p.parse_args()
    if args.ops:
        import bench_gpu
        with launch.process_group(1, torch.device("cpu"), needed=True):
            bench_gpu.operations(args.ops, torch.device("cpu"))
    if args.mine:
        return print(row_mining(args.mine)[0])
    if args.data_rows:
        return print(row_data(args.data_rows)[0])
    if args.gpu:
        import bench_gpu
        return bench_gpu.run(args.size, args.queries, args.device, args.max_len, args.chunk_size, args.chunk_tokens,
                             memory_sizes=args.memory_sizes, profiles=args.profiles, variants=args.variants,
                             checks_first=not args.no_checks, profile_step_too=not args.no_profile, budget_s=args.budget_s)
    model, tokenizer = f2llm_model.load("tiny")
    batches = builtin_batches(tokenizer)
    rows = [row_cache_overhead(model, tokenizer, retrieval_batch(batches)), row_matryoshka(model, tokenizer, retrieval_batch(batches)),
            row_memory(), row_padding(batches),
            row_sentence_transformers(model, tokenizer, batches), row_eval()]
    print(f"\n{'ratio':>7}  {'target':<18} figure")
    for text, ratio, target in rows:
        print(f"{'-' if ratio is None else f'{ratio:.2f}':>7}  {target:<18} {text}")


if __name__ == "__main__":
    main()
