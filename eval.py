r"""Evaluate an embedding model on local tasks with MTEB's scoring, so our numbers equal mteb's on the same embeddings.

    python eval.py                                           # latest checkpoint of `python train.py`, built-in tasks
    python eval.py --model out/checkpoint --tasks DIR [DIR ...] --out results/

A task is a folder with `task.json` ({"type": ..., "instruction": ..., options}) and its data, in UTF-8 jsonl:
    retrieval            BEIR layout: corpus.jsonl (_id, title, text), queries.jsonl (_id, text), qrels/test.tsv
                         option ignore_identical_ids                                            main ndcg_at_10
    reranking            test.jsonl: query, positive [texts], negative [texts] (mteb's older format, converted
                         as mteb converts it), or the retrieval layout plus top_ranked.jsonl (_id, corpus_ids)
                         option main_score, e.g. max_over_subqueries_map_at_1000 (MindSmall)   main map_at_1000
    clustering           test.jsonl: text, label (or a list of labels, one per level)
                         options fraction (of documents embedded, default 0.04; null: all), max_depth  main v_measure
    classification       train.jsonl and test.jsonl: text, label; options samples_per_label, n_experiments  main accuracy
    sts                  test.jsonl: sentence1, sentence2, score                               main cosine_spearman
    pair_classification  test.jsonl: sentence1, sentence2, label (0/1)                         main max_ap
    summarization        test.jsonl: human_summaries, machine_summaries, relevance             main cosine_spearman
Queries get F2LLM's prompt "Instruct: {instruction}\nQuery: ", documents none; symmetric tasks prompt every text.
Embedding follows F2LLM's own MTEB runs: up to 8192 tokens, BEIR titles joined as (title + " " + text).strip().
The scoring rules are in metrics.py.
"""
import argparse
import json
import os
import time
from collections import defaultdict

import torch

import builtin
import checks
import launch
import metrics
import model as f2llm_model

MAX_LEN = 8192  # F2LLM's own MTEB runs (mteb's codefuse wrapper) embed up to 8192 tokens, not the training 1024
MAIN_SCORE = dict(retrieval="ndcg_at_10", reranking="map_at_1000", clustering="v_measure", classification="accuracy",
                  sts="cosine_spearman", pair_classification="max_ap", summarization="cosine_spearman")
TEXT, TEXTS, LABEL, NUMBER, NUMBERS = "a string", "a list of strings", "a string or an integer", "a number", "a list of numbers"
KINDS = {TEXT: lambda v: isinstance(v, str), TEXTS: lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
         LABEL: lambda v: isinstance(v, (str, int)) and not isinstance(v, bool) or isinstance(v, list) and v and all(isinstance(x, (str, int)) for x in v),
         NUMBER: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
         NUMBERS: lambda v: isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)}


class TaskError(launch.UserError, ValueError):
    pass


# ---- tasks on disk: every problem is an error naming the file and line -------------------------------------

def read_jsonl(path, fields, unique=None):
    """Rows of a jsonl file whose `fields` ({name: kind}) are present and of their kind; `unique` names a field
    whose values may not repeat (an id)."""
    if not os.path.exists(path):
        raise TaskError(f"{path}: missing")
    rows, seen = [], {}
    for n, row in checks.json_lines(path, TaskError):
        missing = [k for k in fields if row.get(k) is None]
        if missing:
            raise TaskError(f"{path}: line {n}: missing {', '.join(missing)}")
        for k, kind in fields.items():
            if not KINDS[kind](row[k]):
                raise TaskError(f"{path}: line {n}: {k} is {type(row[k]).__name__}, expected {kind}")
        if unique:
            key = str(row[unique])
            if key in seen:
                raise TaskError(f"{path}: line {n}: {unique} {key!r} repeats line {seen[key]}")
            seen[key] = n
        rows.append(row)
    if not rows:
        raise TaskError(f"{path}: no rows")
    return rows


def read_qrels(path, query_ids, doc_ids):
    if not os.path.exists(path):
        raise TaskError(f"{path}: missing (the judgements: query-id, corpus-id, score)")
    qrels = defaultdict(dict)
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise TaskError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if not lines or lines[0].split("\t")[:3] != ["query-id", "corpus-id", "score"]:
        raise TaskError(f"{path}: line 1: expected the header query-id, corpus-id, score")
    for n, line in enumerate(lines[1:], 2):
        parts = line.split("\t")
        if len(parts) < 3:
            raise TaskError(f"{path}: line {n}: expected 3 tab-separated fields")
        q, d, g = parts[:3]
        if q not in query_ids:
            raise TaskError(f"{path}: line {n}: unknown query id {q!r}")
        if d not in doc_ids:
            raise TaskError(f"{path}: line {n}: unknown corpus id {d!r}")
        try:
            qrels[q][d] = int(g)
        except ValueError:
            raise TaskError(f"{path}: line {n}: grade {g!r} is not an integer") from None
    return dict(qrels)


def load_task(folder):
    meta_path = os.path.join(folder, "task.json")
    if not os.path.exists(meta_path):
        raise TaskError(f"{folder}: no task.json")
    try:
        meta = json.load(open(meta_path, encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TaskError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("type") not in MAIN_SCORE:
        raise TaskError(f"{meta_path}: expected an object whose type is one of {', '.join(MAIN_SCORE)}")
    meta.setdefault("name", os.path.basename(os.path.normpath(folder)))
    test = lambda **fields: read_jsonl(os.path.join(folder, "test.jsonl"), fields)
    kind = meta["type"]
    if kind == "retrieval" or kind == "reranking" and os.path.exists(os.path.join(folder, "top_ranked.jsonl")):
        corpus = read_jsonl(os.path.join(folder, "corpus.jsonl"), dict(_id=LABEL, text=TEXT), unique="_id")
        queries = read_jsonl(os.path.join(folder, "queries.jsonl"), dict(_id=LABEL, text=TEXT), unique="_id")
        doc_ids, query_ids = [str(d["_id"]) for d in corpus], [str(q["_id"]) for q in queries]
        meta.update(corpus=corpus, queries=queries, doc_ids=doc_ids, query_ids=query_ids,
                    qrels=read_qrels(os.path.join(folder, "qrels", "test.tsv"), set(query_ids), set(doc_ids)))
        if kind == "reranking":
            path, known = os.path.join(folder, "top_ranked.jsonl"), set(doc_ids)
            meta["top_ranked"] = {}
            for n, row in enumerate(read_jsonl(path, dict(_id=LABEL, corpus_ids=TEXTS), unique="_id"), 1):
                if unknown := [d for d in row["corpus_ids"] if d not in known]:
                    raise TaskError(f"{path}: query {row['_id']}: unknown corpus ids {unknown[:3]}")
                meta["top_ranked"][str(row["_id"])] = row["corpus_ids"]
    elif kind == "reranking":
        meta.update(as_retrieval(test(query=TEXT, positive=TEXTS, negative=TEXTS)))
    elif kind == "clustering":
        meta["rows"] = test(text=TEXT, label=LABEL)
    elif kind == "classification":
        meta["train"] = read_jsonl(os.path.join(folder, "train.jsonl"), dict(text=TEXT, label=LABEL))
        meta["rows"] = test(text=TEXT, label=LABEL)
    elif kind in ("sts", "pair_classification"):
        meta["rows"] = test(sentence1=TEXT, sentence2=TEXT, **{"score" if kind == "sts" else "label": NUMBER})
    else:
        meta["rows"] = test(human_summaries=TEXTS, machine_summaries=TEXTS, relevance=NUMBERS)
    return meta


def as_retrieval(rows):
    """mteb's conversion of query/positive/negative rows: rows without a positive or a negative are dropped; the
    others become queries test_query{i} whose candidates are named so that, on an exact score tie, a negative
    ranks above a positive (apositive_... < negative_... in the descending id order of the tie-break)."""
    corpus, queries, qrels, top_ranked = [], [], {}, {}
    for i, r in enumerate(r for r in rows if r["positive"] and r["negative"]):
        q = f"test_query{i}"
        queries.append(dict(_id=q, text=r["query"]))
        cands = [(f"apositive_{q}_{j:05d}", t, 1) for j, t in enumerate(r["positive"])] + [(f"negative_{q}_{j:05d}", t, 0) for j, t in enumerate(r["negative"])]
        corpus += [dict(_id=d, text=t) for d, t, _ in cands]
        qrels[q] = {d: g for d, _, g in cands}
        top_ranked[q] = [d for d, _, _ in cands]
    if not queries:
        raise TaskError("no reranking row has both a positive and a negative")
    return dict(corpus=corpus, queries=queries, doc_ids=[d["_id"] for d in corpus], query_ids=[q["_id"] for q in queries], qrels=qrels,
                top_ranked=top_ranked)


# ---- scoring a task --------------------------------------------------------------------------------------

def score_task(task, embed):
    """embed(texts, is_query) -> float32 [n, H]. Returns the MTEB-named scores of one task."""
    kind, rows = task["type"], task.get("rows")
    if kind in ("retrieval", "reranking"):
        qrels = {q: j for q, j in task["qrels"].items() if j}  # mteb drops queries without judgements
        queries = [q for q in task["queries"] if str(q["_id"]) in qrels]
        query_emb = embed([q["text"] for q in queries], True)
        docs = embed([((d.get("title") or "") + " " + d["text"]).strip() for d in task["corpus"]], False)  # as F2LLM's wrapper
        if kind == "retrieval":
            found = metrics.search(query_emb, docs, task["doc_ids"])
            run = {str(q["_id"]): found[n] for n, q in enumerate(queries)}
        else:
            position = {d: i for i, d in enumerate(task["doc_ids"])}
            run = {}
            for n, q in enumerate(queries):
                ids = task["top_ranked"].get(str(q["_id"]), [])
                run[str(q["_id"])] = metrics.rerank(query_emb[n], docs[[position[d] for d in ids]], ids) if ids else {}
        scores = metrics.retrieval_metrics(qrels, run, ignore_identical_ids=task.get("ignore_identical_ids", False))
        if task.get("main_score", "").startswith("max_over_subqueries"):
            scores.update(metrics.max_over_subqueries(qrels, run))
        return scores
    if kind == "clustering":
        return metrics.clustering_scores(lambda t: embed(t, True), [r["text"] for r in rows], [r["label"] for r in rows],
                                         task.get("fraction", 0.04), max_depth=task.get("max_depth"))
    if kind == "classification":
        return metrics.classification_scores(lambda t: embed(t, True), [r["text"] for r in task["train"]], [r["label"] for r in task["train"]],
                                             [r["text"] for r in rows], [r["label"] for r in rows],
                                             task.get("n_experiments", 10), task.get("samples_per_label", 8))
    if kind in ("sts", "pair_classification"):
        e1, e2 = embed([r["sentence1"] for r in rows], True), embed([r["sentence2"] for r in rows], True)
        if kind == "sts":
            return metrics.sts_scores(e1, e2, [r["score"] for r in rows])
        return metrics.pair_classification_scores(e1, e2, [r["label"] for r in rows])
    return metrics.summarization_scores([embed(r["human_summaries"], True) for r in rows], [embed(r["machine_summaries"], True) for r in rows],
                                        [r["relevance"] for r in rows])


def max_len_for(settings):
    """Tokens per text for a checkpoint trained with `settings` (train.py's): MAX_LEN, except the tiny
    random-init model, which has seen nothing longer than its training length and would only run slower."""
    return settings["max_len"] if settings and settings.get("size") == "tiny" else MAX_LEN


def evaluate(model, tokenizer, task_dirs, out=None, max_len=MAX_LEN, batch_size=32, dims=None):
    """Score every task, at each of `dims` if given (`at_dim`; each text embedded once); write one MTEB-style JSON per
    task (and dimension: `<task>@<D>`) into `out` if given. Returns the result dicts."""
    results = []
    for folder in task_dirs:
        task, embedded = load_task(folder), {}
        prompt = f2llm_model.query_prompt(task["instruction"]) if task.get("instruction") else None

        def embed(texts, is_query):
            key = (tuple(texts), is_query)
            if key not in embedded:
                embedded[key] = f2llm_model.encode(model, tokenizer, texts, prompt if is_query else None, max_len=max_len, batch_size=batch_size)
                if not torch.isfinite(embedded[key]).all():
                    raise TaskError(f"{task['name']}: the model gives non-finite embeddings; its weights are broken")
            return embedded[key]
        for dim in dims or [None]:
            start, main = time.time(), task.get("main_score", MAIN_SCORE[task["type"]])
            scores = score_task(task, at_dim(embed, dim))
            result = dict(task=task["name"] + (f"@{dim}" if dim else ""), type=task["type"], dim=dim, main_score_name=main,
                          main_score=scores[main], scores=scores, evaluation_time=round(time.time() - start, 2))
            if out:
                os.makedirs(out, exist_ok=True)
                with open(os.path.join(out, f"{result['task']}.json"), "w") as f:
                    json.dump(result, f, indent=2)
            results.append(result)
    return results


def at_dim(embed, dim):
    """The embeddings at dimension `dim`: their first `dim` coordinates, L2-normalised again (what a Matryoshka model is
    trained for; sentence-transformers' truncate_dim with normalize_embeddings=True). None: the whole embeddings."""
    return embed if dim is None else lambda texts, is_query: torch.nn.functional.normalize(embed(texts, is_query)[:, :dim], dim=-1)


def check_model_path(path):
    """A clear error for a path that cannot be the model: missing, a run's output folder, or not a model folder."""
    looks_like_path = os.path.isabs(path) or path.startswith(".") or os.sep in path and os.path.exists(path.split(os.sep)[0])
    if not os.path.exists(path):
        if looks_like_path or path.startswith("out"):
            raise SystemExit(f"{path}: no such folder; run `python train.py` first, or pass --model")
        return  # a size preset or a hub id
    if not os.path.isfile(os.path.join(path, "config.json")):
        if os.path.isfile(os.path.join(path, "checkpoint", "config.json")):
            raise SystemExit(f"{path} is a training run's folder; the model is {os.path.join(path, 'checkpoint')}")
        raise SystemExit(f"{path}: not a Hugging Face model folder (no config.json)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join("out", "checkpoint"), help="checkpoint folder, size preset or hub id")
    p.add_argument("--tasks", nargs="*", help="task folders (default: the built-in ones)")
    p.add_argument("--out", default=os.path.join("out", "eval"), help="one JSON result file per task")
    p.add_argument("--max-len", type=int, help=f"tokens per text (default: the checkpoint's max_seq_length; {MAX_LEN}, as F2LLM's MTEB runs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dims", type=int, nargs="+", metavar="D", help="score each task on the first D coordinates of the embeddings, "
                   "normalised again, for each D (a Matryoshka model's dimensions); default: the whole embeddings")
    args = p.parse_args(argv)
    if args.dims and min(args.dims) < 1:
        p.error("--dims takes dimensions of at least 1")
    check_model_path(args.model)
    st_config = os.path.join(args.model, "sentence_bert_config.json")  # our checkpoints say how long a text they embed
    if args.max_len is None:
        args.max_len = json.load(open(st_config))["max_seq_length"] if os.path.exists(st_config) else MAX_LEN
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = f2llm_model.load(args.model, device=device)
    if broken := [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]:
        raise SystemExit(f"{args.model}: non-finite weights in {len(broken)} tensors ({broken[0]}, ...): this model cannot be scored")
    tasks = args.tasks or builtin.tasks(os.path.join(builtin.CACHE, "stdlib-eval"))
    if args.dims and max(args.dims) > model.backbone.config.hidden_size:
        raise SystemExit(f"--dims {max(args.dims)}: the model's embeddings have {model.backbone.config.hidden_size} dimensions")
    results = evaluate(model, tokenizer, tasks, out=args.out, max_len=args.max_len, batch_size=args.batch_size, dims=args.dims)
    width = max(len(r["task"]) for r in results)
    print(f"{'task':<{width}}  {'metric':<16} score")
    for r in results:
        print(f"{r['task']:<{width}}  {r['main_score_name']:<16} {r['main_score']:.5f}")
    print(f"results in {args.out}/")


if __name__ == "__main__":
    launch.run(main)
