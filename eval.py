"""MTEB's scoring rules on local tasks, so our numbers equal MTEB's on the same embeddings.

    python eval.py                                           # latest checkpoint of `python train.py`, built-in tasks
    python eval.py --model out/checkpoint --tasks DIR [DIR ...] --out results/

A task is a folder with `task.json` ({"type": ..., "instruction": ...}) and its data:
    retrieval            BEIR layout: corpus.jsonl (_id, title, text), queries.jsonl (_id, text), qrels/test.tsv
    reranking            test.jsonl: query, positive [texts], negative [texts]          main map_at_1000
    clustering           test.jsonl: text, label (or a list of labels, one per level)  main v_measure
    classification       train.jsonl and test.jsonl: text, label                       main accuracy
    sts                  test.jsonl: sentence1, sentence2, score                       main cosine_spearman
    pair_classification  test.jsonl: sentence1, sentence2, label (0/1)                 main max_ap
    summarization        test.jsonl: human_summaries, machine_summaries, relevance     main cosine_spearman
Queries get F2LLM's prompt "Instruct: {instruction}\\nQuery: ", documents none; symmetric tasks prompt every text.
"""
import argparse
import json
import math
import os
import random
import time
from collections import Counter, defaultdict

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.cluster import MiniBatchKMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, v_measure_score

import model as f2llm_model

SEED = 42  # MTEB's seed for every sampling step
MAX_LEN = 8192  # F2LLM's own MTEB runs (mteb's codefuse wrapper) embed up to 8192 tokens, not the training 1024
KS = (1, 3, 5, 10, 20, 100, 1000)
MAIN_SCORE = dict(retrieval="ndcg_at_10", reranking="map_at_1000", clustering="v_measure", classification="accuracy",
                  sts="cosine_spearman", pair_classification="max_ap", summarization="cosine_spearman")


class TaskError(ValueError):
    pass


# ---- retrieval: exact search by corpus chunks, trec_eval's ranking and formulas -----------------------------

def search(queries, corpus, top_k=1000, chunk=50_000):
    """Top-k cosine scores (float32) of each query over the corpus, one corpus chunk in memory at a time."""
    best_s = torch.empty(len(queries), 0)
    best_i = torch.empty(len(queries), 0, dtype=torch.long)
    for start in range(0, len(corpus), chunk):
        s = queries.float() @ corpus[start:start + chunk].float().T
        s, i = s.topk(min(top_k, s.shape[1]), dim=1)
        best_s, order = torch.cat([best_s, s], 1).topk(min(top_k, best_s.shape[1] + s.shape[1]), dim=1)
        best_i = torch.cat([best_i, i + start], 1).gather(1, order)
    return best_s, best_i


def rank(run_q):
    """Doc ids in trec_eval's order: score (as float32) descending, ties broken by doc id descending."""
    ids = np.array(list(run_q.keys()), dtype=str)
    scores = np.array(list(run_q.values()), dtype=np.float32)
    return ids[np.lexsort((ids, scores))[::-1]].tolist()


def query_metrics(qrels_q, run_q, ks=KS):
    """nDCG (linear gain, ideal from all judged docs), MAP (/R), recall (/R), P (/k), hit rate, MRR@10."""
    grades = np.array([qrels_q.get(d, 0) for d in rank(run_q)], dtype=np.float64)
    relevant = grades >= 1
    R = sum(g >= 1 for g in qrels_q.values())
    hits = np.cumsum(relevant)
    dcg = np.cumsum(np.where(grades > 0, grades, 0) / np.log2(np.arange(2, len(grades) + 2)))
    ideal = np.sort(np.array([g for g in qrels_q.values() if g > 0], dtype=np.float64))[::-1]
    idcg = np.cumsum(ideal / np.log2(np.arange(2, len(ideal) + 2)))
    ap = np.cumsum(np.where(relevant, hits / np.arange(1, len(grades) + 1), 0))
    out = {}
    for k in ks:
        n = min(k, len(grades))
        at = lambda a: a[n - 1] if n else 0.0
        ideal_k = idcg[min(k, len(idcg)) - 1] if len(idcg) else 0.0
        out[f"ndcg_at_{k}"] = at(dcg) / ideal_k if ideal_k > 0 else 0.0
        out[f"map_at_{k}"] = at(ap) / R if R else 0.0
        out[f"recall_at_{k}"] = at(hits) / R if R else 0.0
        out[f"precision_at_{k}"] = at(hits) / k
        out[f"hit_rate_at_{k}"] = float(at(hits) > 0)
    first = np.flatnonzero(grades[:10] > 0)
    out["mrr_at_10"] = 1.0 / (first[0] + 1) if len(first) else 0.0
    return out


def retrieval_metrics(qrels, run, ks=KS, ignore_identical_ids=False):
    """Mean over queries in both run and judgements, rounded to 5 decimals as MTEB reports them."""
    if ignore_identical_ids:
        run = {q: {d: s for d, s in docs.items() if d != q} for q, docs in run.items()}
    per_query = [query_metrics(qrels[q], run[q], ks) for q in run if q in qrels]
    if not per_query:
        raise TaskError("no query has both results and judgements")
    return {k: round(float(np.mean([m[k] for m in per_query])), 5) for k in per_query[0]}


def run_from_search(scores, indices, query_ids, doc_ids):
    return {q: {doc_ids[i]: float(s) for s, i in zip(scores[n].tolist(), indices[n].tolist())} for n, q in enumerate(query_ids)}


# ---- other task types, each with MTEB v2's procedure and seeds -------------------------------------------

def clustering_v_measure(embed, texts, labels, fraction=0.04, n_runs=10, bootstrap_size=16384, batch_size=512):
    """MTEB v2 bootstrapped V-measure. `embed(texts)` is called once, on the documents sampled to embed."""
    rng = random.Random(SEED)
    labels = [lab if isinstance(lab, list) else [lab] for lab in labels]
    n = int(fraction * len(texts))
    if n < len(texts):
        keep = rng.sample(range(len(texts)), n)
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    emb = np.asarray(embed(texts))
    scores = defaultdict(list)
    for level in range(max(map(len, labels))):
        level_labels = np.array([lab[level] if len(lab) > level else -1 for lab in labels], dtype=object)
        valid = np.array([lab != -1 for lab in level_labels])
        level_labels, level_emb = level_labels[valid], emb[valid]
        kmeans = MiniBatchKMeans(n_clusters=len(set(level_labels)), batch_size=batch_size, init="k-means++", n_init=1, random_state=SEED)
        for _ in range(n_runs):
            idx = rng.choices(range(len(emb)), k=bootstrap_size)
            kmeans.fit(level_emb[idx])
            scores[level].append(v_measure_score(level_labels[idx], kmeans.predict(level_emb[idx])))
    return dict(v_measure=float(np.mean([np.mean(v) for v in scores.values()])),
                v_measure_std=float(np.mean([np.std(v) for v in scores.values()])))


def classification_scores(train_emb, train_labels, test_emb, test_labels, n_experiments=10, samples_per_label=8):
    """MTEB: 10 experiments, each on the first samples_per_label rows per label of a cumulatively shuffled index."""
    rng, idx = np.random.RandomState(SEED), np.arange(len(train_labels))
    train_emb, test_emb = np.asarray(train_emb), np.asarray(test_emb)
    runs = []
    for _ in range(n_experiments):
        rng.shuffle(idx)
        count, chosen = defaultdict(int), []
        for i in idx:
            if count[train_labels[i]] < samples_per_label:
                count[train_labels[i]] += 1
                chosen.append(i)
        clf = LogisticRegression(max_iter=100, random_state=SEED).fit(train_emb[chosen], [train_labels[i] for i in chosen])
        pred = clf.predict(test_emb)
        runs.append(dict(accuracy=accuracy_score(test_labels, pred), f1=f1_score(test_labels, pred, average="macro"),
                         f1_weighted=f1_score(test_labels, pred, average="weighted")))
    return {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}


def sts_scores(emb1, emb2, gold):
    cos = torch.nn.functional.cosine_similarity(torch.as_tensor(emb1), torch.as_tensor(emb2)).numpy()
    return dict(cosine_spearman=float(spearmanr(gold, cos).statistic), cosine_pearson=float(pearsonr(gold, cos).statistic))


def pair_classification_scores(emb1, emb2, labels):
    """Average precision of each similarity (distances negated); main is the best of them."""
    a, b = torch.as_tensor(emb1).double(), torch.as_tensor(emb2).double()
    sims = dict(cosine=torch.nn.functional.cosine_similarity(a, b), dot=(a * b).sum(1),
                euclidean=-(a - b).norm(dim=1), manhattan=-(a - b).abs().sum(1))
    out = {f"{name}_ap": float(average_precision_score(labels, s.numpy())) for name, s in sims.items()}
    out["max_ap"] = max(out.values())
    return out


def summarization_scores(human, machine, relevance):
    """Per text: spearman of gold relevance vs each machine summary's max cosine to the human summaries."""
    spearmans = []
    for h, m, rel in zip(human, machine, relevance):
        if len(set(rel)) == 1:
            continue  # a constant row has no rank correlation
        best = (torch.as_tensor(m) @ torch.as_tensor(h).T).max(1).values.numpy()
        spearmans.append(spearmanr(rel, best).statistic)
    return dict(cosine_spearman=float(np.mean(spearmans)))


# ---- tasks on disk --------------------------------------------------------------------------------------

def read_jsonl(path, fields):
    if not os.path.exists(path):
        raise TaskError(f"{path}: missing")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}: line {n}: not valid JSON ({e})") from None
            missing = [k for k in fields if k not in row or row[k] is None]
            if missing:
                raise TaskError(f"{path}: line {n}: missing {', '.join(missing)}")
            rows.append(row)
    if not rows:
        raise TaskError(f"{path}: no rows")
    return rows


def read_qrels(path, query_ids, doc_ids):
    qrels = defaultdict(dict)
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header[:3] != ["query-id", "corpus-id", "score"]:
            raise TaskError(f"{path}: line 1: expected the header query-id, corpus-id, score")
        for n, line in enumerate(f, 2):
            parts = line.rstrip("\n").split("\t")
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
    meta = json.load(open(meta_path))
    if meta.get("type") not in MAIN_SCORE:
        raise TaskError(f"{meta_path}: type must be one of {', '.join(MAIN_SCORE)}")
    meta.setdefault("name", os.path.basename(os.path.normpath(folder)))
    test = lambda *fields: read_jsonl(os.path.join(folder, "test.jsonl"), fields)
    kind = meta["type"]
    if kind == "retrieval":
        corpus = read_jsonl(os.path.join(folder, "corpus.jsonl"), ["_id", "text"])
        queries = read_jsonl(os.path.join(folder, "queries.jsonl"), ["_id", "text"])
        doc_ids, query_ids = [str(d["_id"]) for d in corpus], [str(q["_id"]) for q in queries]
        meta.update(corpus=corpus, queries=queries, doc_ids=doc_ids, query_ids=query_ids,
                    qrels=read_qrels(os.path.join(folder, "qrels", "test.tsv"), set(query_ids), set(doc_ids)))
    elif kind == "reranking":
        meta["rows"] = test("query", "positive", "negative")
    elif kind == "clustering":
        meta["rows"] = test("text", "label")
    elif kind == "classification":
        meta["train"] = read_jsonl(os.path.join(folder, "train.jsonl"), ["text", "label"])
        meta["rows"] = test("text", "label")
    elif kind in ("sts", "pair_classification"):
        meta["rows"] = test("sentence1", "sentence2", "score" if kind == "sts" else "label")
    else:
        meta["rows"] = test("human_summaries", "machine_summaries", "relevance")
    return meta


def score_task(task, embed):
    """embed(texts, is_query) -> float32 [n, H]. Returns MTEB-named scores of one task."""
    kind, rows = task["type"], task.get("rows")
    if kind == "retrieval":
        docs = embed([((d.get("title") or "") + " " + d["text"]).strip() for d in task["corpus"]], False)  # as F2LLM's wrapper
        queries = embed([q["text"] for q in task["queries"]], True)
        run = run_from_search(*search(queries, docs), task["query_ids"], task["doc_ids"])
        return retrieval_metrics(task["qrels"], run, ignore_identical_ids=task.get("ignore_identical_ids", False))
    if kind == "reranking":
        run, qrels = {}, {}
        for n, r in enumerate(rows):
            cands = r["positive"] + r["negative"]
            s = (embed([r["query"]], True) @ embed(cands, False).T)[0]
            ids = [f"{n}-{i}" for i in range(len(cands))]
            run[str(n)] = dict(zip(ids, s.tolist()))
            qrels[str(n)] = {d: int(i < len(r["positive"])) for i, d in enumerate(ids)}
        return retrieval_metrics(qrels, run)
    if kind == "clustering":
        return clustering_v_measure(lambda t: embed(t, True), [r["text"] for r in rows], [r["label"] for r in rows], task.get("fraction", 0.04))
    if kind == "classification":
        return classification_scores(embed([r["text"] for r in task["train"]], True), [r["label"] for r in task["train"]],
                                     embed([r["text"] for r in rows], True), [r["label"] for r in rows],
                                     samples_per_label=task.get("samples_per_label", 8))
    if kind in ("sts", "pair_classification"):
        e1, e2 = embed([r["sentence1"] for r in rows], True), embed([r["sentence2"] for r in rows], True)
        if kind == "sts":
            return sts_scores(e1, e2, [r["score"] for r in rows])
        return pair_classification_scores(e1, e2, [r["label"] for r in rows])
    return summarization_scores([embed(r["human_summaries"], True) for r in rows], [embed(r["machine_summaries"], True) for r in rows],
                                [r["relevance"] for r in rows])


def max_len_for(settings):
    """Tokens per text for a checkpoint trained with `settings` (train_args.json): MAX_LEN, except the tiny
    random-init model, which has seen nothing longer than its training length and would only run slower."""
    return settings["max_len"] if settings and settings.get("size") == "tiny" else MAX_LEN


def evaluate(model, tokenizer, task_dirs, out=None, max_len=MAX_LEN, batch_size=32, progress=True):
    """Score every task; write one MTEB-style JSON per task into `out` if given. Returns the result dicts."""
    results = []
    for folder in task_dirs:
        task, start = load_task(folder), time.time()
        prompt = f2llm_model.query_prompt(task["instruction"]) if task.get("instruction") else None
        embed = lambda texts, is_query: f2llm_model.encode(model, tokenizer, texts, prompt if is_query else None,
                                                          max_len=max_len, batch_size=batch_size, progress=progress)
        scores = score_task(task, embed)
        main = MAIN_SCORE[task["type"]]
        result = dict(task=task["name"], type=task["type"], main_score_name=main, main_score=scores[main], scores=scores,
                      evaluation_time=round(time.time() - start, 2))
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, f"{task['name']}.json"), "w") as f:
                json.dump(result, f, indent=2)
        results.append(result)
    return results


# ---- built-in tasks: standard-library code kept out of training ------------------------------------------

def builtin_tasks(folder):
    """Code retrieval (docstring summary -> code) on the modules held out of training, and clustering (code ->
    module) of the functions held out of the other modules: unseen code, labels seen in training, as MTEB's
    clustering sets share their categories with F2LLM's clustering data. Modules with fewer than 3 such
    functions are left out of the clustering."""
    import data  # the same extraction that builds the training sources
    retrieval, clustering = os.path.join(folder, "StdlibCodeRetrieval"), os.path.join(folder, "StdlibCodeClustering")
    if not os.path.exists(os.path.join(clustering, "task.json")):
        funcs = data.stdlib_functions()
        unseen = [f for f in funcs if data.heldout(f["module"])]
        held = [f for f in funcs if not data.heldout(f["module"]) and data.heldout(f["module"], f["name"])]
        count = Counter(f["module"] for f in held)
        os.makedirs(os.path.join(retrieval, "qrels"), exist_ok=True)
        os.makedirs(clustering, exist_ok=True)
        data.write_jsonl(os.path.join(retrieval, "corpus.jsonl"), [dict(_id=f"{f['module']}.{f['name']}#{i}", title="", text=f["code"]) for i, f in enumerate(unseen)])
        data.write_jsonl(os.path.join(retrieval, "queries.jsonl"), [dict(_id=f"q{i}", text=f["summary"]) for i, f in enumerate(unseen)])
        with open(os.path.join(retrieval, "qrels", "test.tsv"), "w") as f:
            f.write("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\t{g['module']}.{g['name']}#{i}\t1\n" for i, g in enumerate(unseen)))
        data.write_jsonl(os.path.join(clustering, "test.jsonl"), [dict(text=f["code"], label=f["module"]) for f in held if count[f["module"]] >= 3])
        json.dump(dict(type="retrieval", instruction=data.RETRIEVAL_INSTRUCTION), open(os.path.join(retrieval, "task.json"), "w"))
        # Our task is small (a few hundred functions), so every document is embedded, not MTEB's default 4%.
        json.dump(dict(type="clustering", instruction=data.CLUSTERING_INSTRUCTION, fraction=1.0), open(os.path.join(clustering, "task.json"), "w"))
    return [retrieval, clustering]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.path.join("out", "checkpoint"), help="checkpoint folder, size preset or hub id")
    p.add_argument("--tasks", nargs="*", help="task folders (default: the built-in ones)")
    p.add_argument("--out", default=os.path.join("out", "eval"), help="one JSON result file per task")
    p.add_argument("--max-len", type=int, help=f"tokens per text (default {MAX_LEN}, as F2LLM's MTEB runs; the tiny model's training length)")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    if not os.path.exists(args.model) and args.model.startswith(("out", ".", "/")):
        raise SystemExit(f"{args.model}: no checkpoint here; run `python train.py` first or pass --model")
    train_args = os.path.join(args.model, "train_args.json")
    if args.max_len is None:
        args.max_len = max_len_for(json.load(open(train_args)) if os.path.exists(train_args) else None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = f2llm_model.load(args.model, device=device)
    tasks = args.tasks or builtin_tasks(os.path.join(f2llm_model.CACHE, "stdlib-eval"))
    results = evaluate(model, tokenizer, tasks, out=args.out, max_len=args.max_len, batch_size=args.batch_size)
    width = max(len(r["task"]) for r in results)
    print(f"{'task':<{width}}  {'metric':<16} score")
    for r in results:
        print(f"{r['task']:<{width}}  {r['main_score_name']:<16} {r['main_score']:.5f}")
    print(f"results in {args.out}/")


if __name__ == "__main__":
    main()
