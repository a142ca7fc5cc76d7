"""Build F2LLM training files from your own pairs and labels, the way F2LLM built its 6 million rows.

    python mine.py pairs.csv --name support_faq --out data/ --model Qwen/Qwen3-Embedding-0.6B \\
        --instruction "Given a customer question, retrieve the FAQ answer"          # retrieval: mined negatives
    python mine.py tickets.jsonl --kind clustering --name tickets --out data/ --instruction "Identify the ticket topic"
    python mine.py reviews.csv --kind classification --name reviews --label-names 0=negative 1=positive --out data/ ...
    torchrun --nproc_per_node=8 mine.py ...                                          # the embedding sharded over ranks

Input: csv, jsonl or parquet. Retrieval: columns `query`, `positive` (a query may repeat with several positives);
`--corpus` a file with a `text` column (default: all positives). Classification and clustering: `text`, `label`.
Output: `<out>/<name>.parquet` (retrieval) or `<name>_classification.parquet` / `<name>_clustering.parquet`, with
`query` (the instruction prompt included, as in the released data), `passage`, `negative_1..n`: what data.py reads,
typed by its name. A short report: rows in and out, why rows were dropped, score distributions.

Retrieval (the paper, section 3; its repository mined with sentence-transformers' mine_hard_negatives, whose
rules these are): embed queries with the prompt and documents without; per query the 100 + (positives) most
similar documents by cosine; the query's positives (and any document equal to one) never count; candidates
scoring above 0.8, or above 0.95 x the query's (lowest) positive score, are removed; of the first 100 left, the
first 5 are skipped (false-negative guard) and the next 24 kept; a query with fewer than 24 is dropped.
Classification: a binary label's positive is its name, the negative the other label's name. Multi-class
classification and clustering: the positive is another text of the same label, the 24 negatives texts of other
labels.
"""
import argparse
import csv
import hashlib
import os
import random
from collections import Counter

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import builtin
import checks
import launch
import model as f2llm_model


class MineError(launch.UserError, ValueError):
    pass


def read_rows(path, columns):
    """Rows of a csv, jsonl or parquet file holding `columns` (strings); errors name the file and the problem."""
    if not os.path.exists(path):
        raise MineError(f"{path}: no such file")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        rows = pq.read_table(path).to_pylist()
    elif path.endswith(".jsonl"):
        rows = [row for _, row in checks.json_lines(path, MineError)]
    elif path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise MineError(f"{path}: expected a .csv, .jsonl or .parquet file")
    if not rows:
        raise MineError(f"{path}: no rows")
    if missing := [c for c in columns if c not in rows[0]]:
        raise MineError(f"{path}: missing column(s) {missing}; found {sorted(rows[0])}")
    for n, row in enumerate(rows, 1):
        for c in columns:
            if c != "label" and not (isinstance(row[c], str) and row[c].strip()):
                raise MineError(f"{path}: row {n}: {c!r} must be a non-empty string, got {row[c]!r}")
    return rows


# ---- embeddings: our encoder, cached on disk, sharded over torchrun ranks ----------------------------------

def embedder(model, tokenizer, name, max_len, batch_size, cache_dir):
    """embed(texts, prompt) -> float32 unit vectors. Cached on disk by (model, prompt, length, texts), so a rerun
    with other thresholds does not embed again. Under torchrun each rank embeds a slice; all receive the whole."""
    def embed(texts, prompt):
        key = hashlib.sha256(repr((name, prompt, max_len, texts)).encode()).hexdigest()[:24]
        path = os.path.join(cache_dir, f"{key}.npy") if cache_dir else None
        if path and os.path.exists(path):
            return torch.from_numpy(np.load(path))
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        part = f2llm_model.encode(model, tokenizer, texts[rank::world], prompt, max_len=max_len, batch_size=batch_size)
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, part)
            part = torch.empty(len(texts), parts[0].shape[1])
            for r, p in enumerate(parts):
                part[r::world] = p
        if path and rank == 0:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}.npy"  # this process's: two runs embedding the same texts may meet here
            np.save(tmp, part.numpy())
            os.replace(tmp, path)
        return part
    return embed


def cos_sim(a, b):
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


# ---- the recipes --------------------------------------------------------------------------------------------

def mine_retrieval(queries, positives, corpus, embed, prompt, range_min=5, range_max=100, max_score=0.8, relative_margin=0.05,
                   negatives=24, query_chunk=1024, corpus_chunk=50_000):
    """(rows of query, passage, negative_1..n; report). Each distinct query is searched once, by corpus chunks."""
    corpus = list(dict.fromkeys((corpus or []) + positives))  # positives belong to the corpus; duplicates go
    where = {t: i for i, t in enumerate(corpus)}
    unique = list(dict.fromkeys(queries))
    index, own = {q: i for i, q in enumerate(unique)}, [[] for _ in unique]
    for q, p in zip(queries, positives):
        if where[p] not in own[index[q]]:
            own[index[q]].append(where[p])
    q_emb, d_emb = embed(unique, prompt), embed(corpus, None)
    pos_scores = [(F.normalize(q_emb[i:i + 1], dim=-1) * F.normalize(d_emb[own[i]], dim=-1)).sum(-1) for i in range(len(unique))]
    pool = range_max + max(Counter(queries).values())  # room for the positives (rows per query, as sentence-transformers counts)
    k = min(pool, len(corpus))
    kept, scores_kept = [], []
    for start in tqdm(range(0, len(unique), query_chunk), desc="mine", disable=len(unique) <= query_chunk):
        qs = q_emb[start:start + query_chunk]
        top_s, top_i = None, None
        for c in range(0, len(corpus), corpus_chunk):  # never a queries-by-corpus matrix
            s, i = cos_sim(qs, d_emb[c:c + corpus_chunk]).topk(min(k, min(corpus_chunk, len(corpus) - c)), dim=1)
            if top_s is None:
                top_s, top_i = s, i + c
            else:  # the best of both; only candidates tied at the cut can differ from one search over everything
                top_s, order = torch.cat([top_s, s], 1).topk(k, dim=1)
                top_i = torch.cat([top_i, i + c], 1).gather(1, order)
        pad = pool - top_s.shape[1]  # a small corpus: -inf fills the pool, as sentence-transformers does
        top_s = torch.cat([top_s, top_s.new_full((len(qs), pad), -float("inf"))], 1) if pad > 0 else top_s
        top_i = torch.cat([top_i, top_i.new_full((len(qs), pad), -1)], 1) if pad > 0 else top_i
        for row, q in enumerate(range(start, start + len(qs))):
            s = top_s[row].clone()
            s[torch.isin(top_i[row], torch.tensor(own[q])) | (top_i[row] < 0)] = -float("inf")  # never a positive
            floor = pos_scores[q].min()
            s[s > floor - floor.abs() * relative_margin] = -float("inf")
            s[s > max_score] = -float("inf")
            neg_s, local = s.topk(range_max)
            neg_s, chosen = neg_s[range_min:range_min + negatives], top_i[row][local][range_min:range_min + negatives]
            kept.append(chosen.tolist() if torch.isfinite(neg_s).all() and len(chosen) == negatives else None)
            scores_kept.append(neg_s.tolist())
    rows, report = [], dict(rows_in=len(queries), queries=len(unique), corpus=len(corpus), dropped_too_few_negatives=0,
                            positive_scores=[], negative_scores=[])
    for q, chosen in enumerate(kept):
        if chosen is None:
            report["dropped_too_few_negatives"] += len(own[q])
            continue
        report["negative_scores"] += scores_kept[q]
        for p, p_score in zip(own[q], pos_scores[q].tolist()):
            report["positive_scores"].append(p_score)
            rows.append(dict(query=prompt + unique[q], passage=corpus[p], **{f"negative_{j + 1}": corpus[d] for j, d in enumerate(chosen)}))
    return rows, report


def from_labels(texts, labels, kind, prompt, negatives=24, label_names=None, seed=0):
    """Classification and clustering rows from (text, label) pairs; labels with one text cannot give a positive."""
    rng = random.Random(seed)
    report = dict(rows_in=len(texts), labels=len(set(labels)), dropped_single_text_label=0, positive_scores=[], negative_scores=[])
    if kind == "classification" and len(set(labels)) == 2:
        names = label_names or {str(v): str(v) for v in set(labels)}
        if sorted(names) != sorted(map(str, set(labels))):
            raise MineError(f"--label-names {names} does not name the labels {sorted(map(str, set(labels)))}")
        other = {a: b for a, b in (sorted(names), sorted(names)[::-1])}
        return [dict(query=prompt + t, passage=names[str(y)], negative_1=names[other[str(y)]]) for t, y in zip(texts, labels)], report
    by_label = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    if len(by_label) < 2:
        raise MineError("all texts share one label: there is nothing to tell apart")
    rows = []
    for i, (t, y) in enumerate(zip(texts, labels)):
        same = [j for j in by_label[y] if j != i]
        if not same:
            report["dropped_single_text_label"] += 1
            continue
        others = [j for j in range(len(texts)) if labels[j] != y]
        picked = rng.sample(others, negatives) if len(others) >= negatives else [rng.choice(others) for _ in range(negatives)]
        rows.append(dict(query=prompt + t, passage=texts[rng.choice(same)], **{f"negative_{k + 1}": texts[j] for k, j in enumerate(picked)}))
    return rows, report


def write_source(rows, path):
    """One parquet file, written aside and renamed: never half-written."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def summary(report):
    lines = [f"{k}: {v:,}" for k, v in report.items() if isinstance(v, int)]
    for name in ("positive_scores", "negative_scores"):
        if values := report[name]:
            q = np.percentile(values, [0, 10, 50, 90, 100])
            lines.append(f"{name.replace('_', ' ')}: min {q[0]:.3f} p10 {q[1]:.3f} median {q[2]:.3f} p90 {q[3]:.3f} max {q[4]:.3f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="csv, jsonl or parquet: query, positive (retrieval) or text, label")
    p.add_argument("--kind", choices=["retrieval", "classification", "clustering"], default="retrieval")
    p.add_argument("--name", required=True, help="the source name: the output file's name")
    p.add_argument("--out", default="data", help="folder of F2LLM files (train.py --data)")
    p.add_argument("--instruction", required=True, help="the task instruction, put in each query as 'Instruct: ...\\nQuery: '")
    p.add_argument("--corpus", help="retrieval: a file with a text column to mine from (default: the positives)")
    p.add_argument("--model", default="Qwen/Qwen3-Embedding-0.6B", help="hub id or local folder (the paper: Qwen3-Embedding-0.6B); 'tiny' for a test")
    p.add_argument("--label-names", nargs="*", metavar="LABEL=NAME", help="binary classification: the name of each label (default: the label)")
    p.add_argument("--negatives", type=int, default=24)
    p.add_argument("--range-min", type=int, default=5, help="retrieval: candidates skipped first (false-negative guard)")
    p.add_argument("--range-max", type=int, default=100, help="retrieval: candidates considered per query")
    p.add_argument("--max-score", type=float, default=0.8, help="retrieval: candidates scoring above are removed")
    p.add_argument("--relative-margin", type=float, default=0.05, help="retrieval: candidates above (1 - this) x the positive's score are removed")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cache-dir", default=os.path.join(builtin.CACHE, "mining"), help="embeddings, so a rerun need not embed again")
    args = p.parse_args(argv)
    if args.negatives < 1 or args.range_min < 0 or args.range_max < args.range_min + args.negatives:
        p.error("need --negatives >= 1, --range-min >= 0 and --range-max >= --range-min + --negatives")
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    with launch.process_group(world, torch.device("cuda" if torch.cuda.is_available() else "cpu")):
        mine_source(args, rank)


def mine_source(args, rank):
    prompt = f2llm_model.query_prompt(args.instruction)
    label_names = dict(kv.split("=", 1) for kv in args.label_names or []) or None
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    if args.kind == "retrieval":
        rows = read_rows(args.input, ["query", "positive"])
        corpus = [r["text"] for r in read_rows(args.corpus, ["text"])] if args.corpus else None
        model, tokenizer = f2llm_model.load(args.model, device=device)
        embed = embedder(model, tokenizer, args.model, args.max_len, args.batch_size, args.cache_dir)
        out, report = mine_retrieval([r["query"] for r in rows], [r["positive"] for r in rows], corpus, embed, prompt, args.range_min,
                                     args.range_max, args.max_score, args.relative_margin, args.negatives)
        path = os.path.join(args.out, f"{args.name}.parquet")
    else:
        rows = read_rows(args.input, ["text", "label"])
        out, report = from_labels([r["text"] for r in rows], [r["label"] for r in rows], args.kind, prompt, args.negatives, label_names)
        path = os.path.join(args.out, f"{args.name}_{args.kind}.parquet")
    if rank == 0:
        if not out:
            raise MineError(f"no row survived (report below)\n{summary(report)}")
        write_source(out, path)
        print(f"{summary(report)}\nrows out: {len(out):,} -> {path}")


if __name__ == "__main__":
    launch.run(main)
