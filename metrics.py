"""MTEB's scoring of each task type, on embeddings: the numbers mteb 2.26 gives for the same vectors.

Each function follows the procedure of mteb's own task class, its seeds and its tie rules included;
tests/test_mteb.py runs those classes on the same vectors and compares every shared metric. Scores are in [0, 1].
    retrieval           search + retrieval_metrics   main ndcg_at_10
    reranking           rerank + retrieval_metrics   main map_at_1000 (MindSmall: max_over_subqueries_map_at_1000)
    clustering          clustering_scores            main v_measure (v2, bootstrapped)
    classification      classification_scores        main accuracy
    sts                 sts_scores                   main cosine_spearman
    pair classification pair_classification_scores   main max_ap
    summarization       summarization_scores         main cosine_spearman
"""
import random
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

# scipy and sklearn are imported in the functions that use them: at the top they cost every process that imports
# this file (every training process does, through eval.py) about 0.8 s (`import train` 4.7-5.3 s -> 4.0-4.3 s), though
# only the non-retrieval scores need them.

SEED = 42  # MTEB's seed for every sampling step
KS = (1, 3, 5, 10, 20, 100, 1000)  # retrieval cut-offs; mteb retrieves max(KS) documents per query


def cos_sim(a, b):
    """mteb's cosine: both sides normalised again in float32, then a matrix product (this moves the last bits of a
    score, and with them the order of near-ties)."""
    a, b = (torch.as_tensor(x).float() for x in (a, b))
    return F.normalize(a.reshape(-1, a.shape[-1]), dim=1) @ F.normalize(b.reshape(-1, b.shape[-1]), dim=1).T


def pairwise_cos_sim(a, b):
    a, b = (torch.as_tensor(np.asarray(x)).float() for x in (a, b))
    return (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(-1)


# ---- retrieval and reranking: mteb's search, trec_eval's ranking and formulas ----------------------------------

def search(queries, corpus, doc_ids, top_k=max(KS), chunk=50_000):
    """{query index: {doc id: score}} with each query's top_k documents, exactly as mteb keeps them: per corpus chunk
    of 50,000, torch.topk(top_k + 1) of the scores; then the top_k largest (score, doc id) pairs of all chunks, so
    among documents tied at the cut the larger id stays (mteb merges through a heap of such pairs). One corpus
    chunk is in memory at a time, never a queries-by-corpus matrix."""
    id_rank = np.empty(len(doc_ids), dtype=np.int64)
    id_rank[np.argsort(np.array(doc_ids, dtype=str), kind="stable")] = np.arange(len(doc_ids))
    best_s, best_i = np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
    for start in range(0, len(corpus), chunk):
        s, i = cos_sim(queries, corpus[start:start + chunk]).topk(min(top_k + 1, min(chunk, len(corpus) - start)), dim=1)
        best_s, best_i = np.concatenate([best_s, s.numpy()], 1), np.concatenate([best_i, i.numpy() + start], 1)
        keep = np.lexsort((id_rank[best_i], best_s), axis=1)[:, ::-1][:, :top_k]  # (score, id), largest first
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return {n: {doc_ids[i]: float(s) for s, i in zip(row_s, row_i)} for n, (row_s, row_i) in enumerate(zip(best_s, best_i))}


def rerank(query, candidates, candidate_ids, top_k=max(KS)):
    """{doc id: score} of one query's given candidates (the top_k of them, as mteb's torch.topk picks)."""
    s, i = cos_sim(query, candidates)[0].topk(min(top_k, len(candidate_ids)))
    return {candidate_ids[j]: float(v) for v, j in zip(s.tolist(), i.tolist())}


def rank(run_q):
    """Doc ids in trec_eval's order: score (as float32) descending, ties broken by doc id descending."""
    ids = np.array(list(run_q.keys()), dtype=str)
    scores = np.array(list(run_q.values()), dtype=np.float32)
    return ids[np.lexsort((ids, scores))[::-1]].tolist()


def query_metrics(qrels_q, run_q, ks=KS):
    """nDCG (linear gain, ideal from all judged docs), MAP (/R), recall (/R), P (/k), hit rate: trec_eval's;
    MRR (1 / rank of the first doc graded > 0): mteb's own, over the same order."""
    grades = np.array([qrels_q.get(d, 0) for d in rank(run_q)], dtype=np.float64)
    relevant = grades >= 1
    R = sum(g >= 1 for g in qrels_q.values())
    hits = np.cumsum(relevant)
    dcg = np.cumsum(np.where(grades > 0, grades, 0) / np.log2(np.arange(2, len(grades) + 2)))
    ideal = np.sort(np.array([g for g in qrels_q.values() if g > 0], dtype=np.float64))[::-1]
    idcg = np.cumsum(ideal / np.log2(np.arange(2, len(ideal) + 2)))
    ap = np.cumsum(np.where(relevant, hits / np.arange(1, len(grades) + 1), 0))
    first = np.flatnonzero(grades > 0)
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
        out[f"mrr_at_{k}"] = 1.0 / (first[0] + 1) if len(first) and first[0] < k else 0.0
    return out


def retrieval_metrics(qrels, run, ks=KS, ignore_identical_ids=False):
    """Mean over the queries of `run` (those with judgements, as mteb keeps them): trec_eval's metrics rounded to
    5 decimals as mteb reports them, MRR unrounded as mteb leaves it."""
    if ignore_identical_ids:  # ArguAna, FiQA2018, ...: a query's own id is not a result
        run = {q: {d: s for d, s in docs.items() if d != q} for q, docs in run.items()}
    per_query = [query_metrics(qrels[q], run[q], ks) for q in run if q in qrels]
    if not per_query:
        raise ValueError("no query has both results and judgements")
    mean = {k: float(np.mean([m[k] for m in per_query])) for k in per_query[0]}
    return {k: v if k.startswith("mrr") else round(v, 5) for k, v in mean.items()}


def max_over_subqueries(qrels, run, ks=KS):
    """MindSmallReranking's main score: queries named "{base}_{n}" are merged, each document keeping its best
    score over the subqueries, and scored against the judgements of the base's last subquery (all the same)."""
    groups = defaultdict(list)
    for q in qrels:
        groups["_".join(q.split("_")[:-1])].append(q)
    merged_run, merged_qrels = {}, {}
    for base, subqueries in groups.items():
        merged_run[base] = {}
        for q in subqueries:
            for d, s in run[q].items():
                merged_run[base][d] = max(s, merged_run[base].get(d, s))
        merged_qrels[base] = qrels[subqueries[-1]]
    return {f"max_over_subqueries_{k}": v for k, v in retrieval_metrics(merged_qrels, merged_run, ks).items()}


# ---- clustering ------------------------------------------------------------------------------------------------

def clustering_scores(embed, texts, labels, fraction=0.04, n_runs=10, bootstrap_size=16_384, batch_size=512, max_depth=None):
    """MTEB v2 bootstrapped V-measure and AMI. `embed(texts)` is called once, on the documents sampled to embed:
    rng.sample of int(fraction * N) of them (drawn even for fraction 1.0; fraction None embeds all, in order).
    Per label level, MiniBatchKMeans with as many clusters as the level has labels, fit on n_runs bootstrap
    samples of that level's own documents. Means and stds pool the runs of every level. A document without a
    level gets the filler -1 there, dropped as mteb drops it: compared after numpy's array conversion, so with
    string labels the filler becomes "-1" and stays, a cluster of its own."""
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.metrics import adjusted_mutual_info_score, v_measure_score
    rng = random.Random(SEED)
    if fraction is not None:
        keep = rng.sample(range(len(texts)), min(len(texts), int(fraction * len(texts))))
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    emb = np.asarray(embed(texts))
    labels = [label if isinstance(label, list) else [label] for label in labels]
    depth = max(map(len, labels)) if max_depth is None else min(max_depth, max(map(len, labels)))
    runs = defaultdict(list)
    for level in range(depth):
        level_labels = np.array([label[level] if len(label) > level else -1 for label in labels])
        valid = np.array([label != -1 for label in level_labels])
        level_labels, level_emb = level_labels[valid], emb[valid]
        kmeans = MiniBatchKMeans(n_clusters=np.unique(level_labels).size, batch_size=batch_size, init="k-means++", n_init=1,
                                 random_state=SEED)
        for _ in range(n_runs):
            idx = rng.choices(range(len(level_emb)), k=bootstrap_size)
            assignment = kmeans.fit_predict(level_emb[idx])
            runs["v_measure"].append(float(v_measure_score(level_labels[idx], assignment)))
            runs["ami"].append(float(adjusted_mutual_info_score(level_labels[idx], assignment)))
    return {name: float(f(v)) for metric, v in runs.items() for name, f in ((metric, np.mean), (f"{metric}_std", np.std))}


# ---- classification ----------------------------------------------------------------------------------------

def classification_scores(embed, train_texts, train_labels, test_texts, test_labels, n_experiments=10, samples_per_label=8):
    """MTEB: n_experiments logistic regressions, each on the first samples_per_label rows per label of an index list
    that a fresh RandomState(42) shuffles again in every experiment (the list carries over). Only the training rows
    some experiment uses are embedded. Metrics on the predicted labels, averaged over experiments."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score, precision_score, recall_score
    idxs, chosen = list(range(len(train_labels))), []
    for _ in range(n_experiments):
        np.random.RandomState(SEED).shuffle(idxs)
        count, picked = defaultdict(int), []
        for i in idxs:
            if count[train_labels[i]] < samples_per_label:
                count[train_labels[i]] += 1
                picked.append(i)
        chosen.append(picked)
    union = sorted(set().union(*chosen))
    train_emb, test_emb = np.asarray(embed([train_texts[i] for i in union])), np.asarray(embed(test_texts))
    position = {i: p for p, i in enumerate(union)}
    runs = []
    for picked in chosen:
        clf = LogisticRegression(max_iter=100, random_state=SEED).fit(train_emb[[position[i] for i in picked]], [train_labels[i] for i in picked])
        pred = clf.predict(test_emb)
        run = dict(accuracy=accuracy_score(test_labels, pred))
        for name, f in (("f1", f1_score), ("precision", precision_score), ("recall", recall_score)):
            run[name], run[f"{name}_weighted"] = f(test_labels, pred, average="macro"), f(test_labels, pred, average="weighted")
        if len(np.unique(test_labels)) == 2:  # mteb: average precision of the predicted labels, binary tasks only
            run["ap"], run["ap_weighted"] = (average_precision_score(test_labels, pred, average=a) for a in ("macro", "weighted"))
        runs.append(run)
    return {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}


# ---- pairs: STS, pair classification, summarization ---------------------------------------------------------

def _correlations(gold, predicted):
    from scipy.stats import pearsonr, spearmanr
    return float(pearsonr(gold, predicted)[0]), float(spearmanr(gold, predicted)[0])


def sts_scores(emb1, emb2, gold):
    """Correlations of the gold scores with cosine (1 - sklearn's paired cosine distance: identical pairs give
    exactly 1.0), negated manhattan and euclidean distances, and the model's similarity (cosine, in torch)."""
    from sklearn.metrics.pairwise import paired_cosine_distances, paired_euclidean_distances, paired_manhattan_distances
    emb1, emb2 = np.asarray(emb1), np.asarray(emb2)
    out = {}
    for name, scores in (("cosine", 1 - paired_cosine_distances(emb1, emb2)), ("manhattan", -paired_manhattan_distances(emb1, emb2)),
                         ("euclidean", -paired_euclidean_distances(emb1, emb2)), ("", pairwise_cos_sim(emb1, emb2).numpy())):
        prefix = f"{name}_" if name else ""
        out[f"{prefix}pearson"], out[f"{prefix}spearman"] = _correlations(gold, scores.tolist())
    return out


def _best_threshold_metrics(scores, labels, higher_is_similar):
    """Best accuracy and best F1 (with its precision and recall) over thresholds between distinct scores."""
    rows = sorted(zip(scores, labels), key=lambda r: r[0], reverse=higher_is_similar)
    best = dict(accuracy=0.0, f1=0.0, precision=0.0, recall=0.0)
    positives, negatives_left, n_positive = 0, int(np.sum(labels == 0)), int(np.sum(labels))
    for i, (score, label) in enumerate(rows[:-1]):
        positives += label == 1
        negatives_left -= label == 0
        if score == rows[i + 1][0]:
            continue  # a threshold cannot split tied scores
        best["accuracy"] = max(best["accuracy"], (positives + negatives_left) / len(labels))
        if positives:
            precision, recall = positives / (i + 1), positives / n_positive
            f1 = 2 * precision * recall / (precision + recall)
            if f1 > best["f1"]:
                best.update(f1=f1, precision=precision, recall=recall)
    return best


def pair_classification_scores(emb1, emb2, labels):
    """For each similarity (float32, as mteb computes them): best-threshold accuracy, F1, precision, recall and
    average precision; max_* is the best over similarities."""
    from sklearn.metrics import average_precision_score
    from sklearn.metrics.pairwise import paired_cosine_distances, paired_euclidean_distances, paired_manhattan_distances
    emb1, emb2, labels = np.asarray(emb1), np.asarray(emb2), np.asarray(labels, dtype=np.int64)
    similarities = dict(similarity=(pairwise_cos_sim(emb1, emb2).numpy(), True), cosine=(1 - paired_cosine_distances(emb1, emb2), True),
                        manhattan=(paired_manhattan_distances(emb1, emb2), False), euclidean=(paired_euclidean_distances(emb1, emb2), False),
                        dot=(np.asarray([np.dot(a, b) for a, b in zip(emb1, emb2)]), True))
    out = {}
    for name, (scores, higher_is_similar) in similarities.items():
        scores = scores.tolist()
        metrics = _best_threshold_metrics(scores, labels, higher_is_similar)
        metrics["ap"] = average_precision_score(labels, np.array(scores) * (1 if higher_is_similar else -1))
        out.update({f"{name}_{k}": float(v) for k, v in metrics.items()})
    for metric in ("accuracy", "f1", "precision", "recall", "ap"):
        out[f"max_{metric}"] = max(out[f"{name}_{metric}"] for name in similarities)
    return out


def summarization_scores(human, machine, relevance):
    """Per text: each machine summary's best cosine (and dot product, and the model's similarity, which is cosine
    pair by pair) to the text's human summaries, correlated with its gold relevance; a text whose gold scores or
    predictions are all equal is skipped; mean over texts. Row by row, as mteb computes them."""
    kept = defaultdict(list)
    for h, m, gold in zip(human, machine, relevance):
        h, m = torch.as_tensor(np.asarray(h)).float(), torch.as_tensor(np.asarray(m)).float()
        cosine = [cos_sim(row, h).max().item() for row in m]
        dot = [(row[None] @ h.T).max().item() for row in m]
        similarity = [max(float(cos_sim(row, other)) for other in h) for row in m]
        if len(set(gold)) == 1 or len(set(dot)) == 1 or len(set(cosine)) == 1:
            continue
        for prefix, predicted in (("cosine_", cosine), ("dot_", dot), ("", similarity)):
            pearson, spearman = _correlations(gold, predicted)
            kept[f"{prefix}pearson"].append(pearson)
            kept[f"{prefix}spearman"].append(spearman)
    return {k: float(np.mean(v)) for k, v in kept.items()} if kept else dict(cosine_spearman=float("nan"))
