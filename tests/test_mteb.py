"""eval.py against mteb itself: mteb's own task classes, run end to end on in-memory data with an encoder that
returns fixed vectors, and eval.py's scoring of the same vectors (and, with a dimension, of their first coordinates
normalised again: eval.py --dims). Every metric both report must agree to 1e-5.
Each task type has cases built to hit mteb's edge rules (ties at the cut, duplicate vectors, identical pairs,
uneven label levels, rows without positives, constant rows) and an ordinary random case."""
import logging
import random

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from mteb.abstasks.classification import AbsTaskClassification
from mteb.abstasks.clustering import AbsTaskClustering
from mteb.abstasks.pair_classification import AbsTaskPairClassification
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.sts import AbsTaskSTS
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.abstasks.text import reranking as mteb_reranking
from mteb.abstasks.text.summarization import AbsTaskSummarization
from mteb.mocks.mock_tasks.retrieval import general_args
from mteb.models.abs_encoder import AbsEncoder

import eval as ev
import metrics

logging.getLogger("mteb").setLevel(logging.ERROR)
TOLERANCE = 1e-5
LARGEST = {}  # per task type, the largest difference seen (printed at the end of the module)


class FixedEncoder(AbsEncoder):
    """mteb's side: the vector of each text, whatever the prompt; cosine similarity (mteb's default)."""
    mteb_model_meta = None

    def __init__(self, vectors):
        self.vectors = vectors

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
        return np.stack([self.vectors[t] for batch in inputs for t in batch["text"]])


def our_embed(vectors):
    """eval.py's side: the same vectors, as float32 tensors (what model.encode returns)."""
    return lambda texts, is_query: torch.from_numpy(np.stack([vectors[t] for t in texts]))


def truncated(vectors, dim):
    """mteb's side at dimension `dim`: each vector's first `dim` coordinates, normalised again (a Matryoshka model's
    embedding of that size, as eval.py --dims takes it); None: the vectors as they are."""
    at = lambda v: torch.nn.functional.normalize(torch.from_numpy(v[:dim]), dim=-1).numpy()
    return vectors if dim is None else {t: at(v) for t, v in vectors.items()}


def unit_vectors(texts, dim=8, seed=0, levels=None):
    """Float32 unit vectors, as our model gives them; `levels` quantizes them first so exact ties occur."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(len(texts), dim))
    if levels:
        x = np.round(x * levels) / levels
    x = torch.nn.functional.normalize(torch.tensor(x, dtype=torch.float32), dim=1).numpy()
    return dict(zip(texts, x))


def compare(kind, ours, theirs, must_share):
    shared = [k for k in ours if k in theirs and isinstance(theirs[k], (int, float))]
    assert set(must_share) <= set(shared), set(must_share) - set(shared)
    diffs = {k: abs(ours[k] - theirs[k]) for k in shared if not (np.isnan(ours[k]) and np.isnan(theirs[k]))}
    LARGEST[kind] = max(LARGEST.get(kind, 0.0), max(diffs.values()))
    bad = {k: (ours[k], theirs[k]) for k, d in diffs.items() if not d <= TOLERANCE}
    assert not bad, bad


def run_mteb(task_class, vectors, data):
    task = task_class()
    task.dataset, task.data_loaded = data, True
    return task.evaluate(FixedEncoder(vectors), "test", encode_kwargs={"batch_size": 64, "show_progress_bar": False})["default"]


def metadata(kind, name, main):
    return TaskMetadata(type=kind, name=name, main_score=main, **general_args)


# ---- retrieval and reranking --------------------------------------------------------------------------------

class Retrieval(AbsTaskRetrieval):
    metadata = metadata("Retrieval", "OracleRetrieval", "ndcg_at_10")


class RetrievalIgnoringOwnId(Retrieval):
    ignore_identical_ids = True


class SubqueryReranking(AbsTaskRetrieval):  # as mteb's MindSmallReranking
    metadata = metadata("Reranking", "OracleMindSmall", "max_over_subqueries_map_at_1000")

    def task_specific_scores(self, scores, qrels, results, hf_split, hf_subset):
        return metrics.max_over_subqueries(qrels, results, self.k_values)


def retrieval_case(name):
    rng = random.Random(name)
    if name == "ties-at-the-cut":  # 1,500 documents over 40 distinct vectors: the 1000th score is tied many times
        texts = [f"doc {i}" for i in range(1500)]
        base = unit_vectors([str(i) for i in range(40)], seed=1)
        vectors = {t: base[str(rng.randrange(40))] for t in texts}
    else:
        texts = [f"doc {i}" for i in range(400)]
        vectors = unit_vectors(texts, seed=2, levels=2 if name == "near-ties" else None)
    ids = [f"x{i}" if name == "own-ids" else f"d{i:04d}" for i in range(len(texts))]
    rng.shuffle(ids)  # ids in no relation to corpus positions, so a tie-break by position shows
    corpus = [dict(id=i, title=rng.choice(["", "", "Title"]), text=t) for i, t in zip(ids, texts)]
    for d in corpus:
        joined = (d["title"] + " " + d["text"]).strip()
        vectors[joined] = vectors[d["text"]]
    queries = [dict(id=f"x{i}" if name == "own-ids" else f"q{i}", text=f"query {i}") for i in range(30)]
    vectors.update(unit_vectors([q["text"] for q in queries], seed=3, levels=2 if name == "near-ties" else None))
    qrels = {}
    for q in queries[:-3]:  # the last three have no judgements: dropped
        judged = rng.sample(corpus, rng.randint(1, 40))
        qrels[q["id"]] = {d["id"]: rng.choice([0, 1, 1, 2]) for d in judged}
    return corpus, queries, qrels, vectors


@pytest.mark.parametrize("name, dim", [("random", None), ("near-ties", None), ("ties-at-the-cut", None), ("own-ids", None), ("random", 5)])
def test_retrieval_equals_mteb(name, dim):
    corpus, queries, qrels, vectors = retrieval_case(name)
    data = {"default": {"test": RetrievalSplitData(queries=Dataset.from_list(queries), corpus=Dataset.from_list(corpus),
                                                    relevant_docs=qrels, top_ranked=None)}}
    theirs = run_mteb(RetrievalIgnoringOwnId if name == "own-ids" else Retrieval, truncated(vectors, dim), data)
    task = dict(type="retrieval", corpus=[dict(d, _id=d["id"]) for d in corpus], queries=[dict(q, _id=q["id"]) for q in queries],
                doc_ids=[d["id"] for d in corpus], qrels=qrels, ignore_identical_ids=name == "own-ids")
    ours = ev.score_task(task, ev.at_dim(our_embed(vectors), dim))
    compare("retrieval", ours, theirs, [f"{m}_at_{k}" for m in ("ndcg", "map", "recall", "precision", "mrr", "hit_rate") for k in metrics.KS])


def reranking_rows(name):
    rng = random.Random(name)
    texts = [f"text {i}" for i in range(120)]
    vectors = unit_vectors(texts, seed=4)
    rows = [dict(query=rng.choice(texts), positive=rng.sample(texts, rng.randint(1, 3)), negative=rng.sample(texts, rng.randint(1, 8)))
            for _ in range(25)]
    if name == "ties":  # the third positive again as the 10th negative: exactly tied, and the negative must rank first
        rows = [dict(r, positive=(p := rng.sample(texts, 3)), negative=rng.sample(texts, 9) + [p[2]]) for r in rows]
    rows[3]["positive"], rows[7]["negative"] = [], []  # dropped, as mteb drops them
    return rows, vectors


@pytest.mark.parametrize("name, dim", [("random", None), ("ties", None), ("random", 5)])
def test_reranking_equals_mteb(name, dim, monkeypatch):
    rows, vectors = reranking_rows(name)

    class Reranking(mteb_reranking.AbsTaskReranking):
        metadata = metadata("Reranking", f"OracleReranking{name}", "map_at_1000")
    monkeypatch.setattr(mteb_reranking, "OLD_FORMAT_RERANKING_TASKS", [Reranking.metadata.name])
    task_obj = Reranking()
    task_obj.transform_old_dataset_format(DatasetDict(test=Dataset.from_list(rows)))
    theirs = task_obj.evaluate(FixedEncoder(truncated(vectors, dim)), "test", encode_kwargs={"batch_size": 64, "show_progress_bar": False})["default"]
    ours = ev.score_task(dict(type="reranking", **ev.as_retrieval(rows)), ev.at_dim(our_embed(vectors), dim))
    compare("reranking", ours, theirs, ["map_at_1000", "mrr_at_10", "ndcg_at_10"])


def test_subquery_reranking_equals_mteb():
    # MindSmallReranking: impression "imp{i}" has subqueries "imp{i}_{n}" over the same candidates.
    rng = random.Random(5)
    docs = [dict(id=f"n{i}", title="", text=f"news {i}") for i in range(60)]
    queries, qrels, top_ranked = [], {}, {}
    for i in range(12):
        cands = rng.sample(docs, 10)
        judged = {d["id"]: int(j < 2) for j, d in enumerate(cands)}
        for n in range(rng.randint(1, 3)):
            q = f"imp{i}_{n}"
            queries.append(dict(id=q, text=f"history {i} {n}"))
            qrels[q], top_ranked[q] = judged, [d["id"] for d in cands]
    vectors = unit_vectors([d["text"] for d in docs] + [q["text"] for q in queries], seed=6)
    data = {"default": {"test": RetrievalSplitData(queries=Dataset.from_list(queries), corpus=Dataset.from_list(docs), relevant_docs=qrels,
                                                    top_ranked=top_ranked)}}
    theirs = run_mteb(SubqueryReranking, vectors, data)
    task = dict(type="reranking", corpus=[dict(d, _id=d["id"]) for d in docs], queries=[dict(q, _id=q["id"]) for q in queries],
                doc_ids=[d["id"] for d in docs], qrels=qrels, top_ranked=top_ranked, main_score="max_over_subqueries_map_at_1000")
    ours = ev.score_task(task, our_embed(vectors))
    compare("reranking", ours, theirs, ["max_over_subqueries_map_at_1000", "map_at_1000", "max_over_subqueries_mrr_at_10"])


# ---- clustering -------------------------------------------------------------------------------------------

def clustering_case(name):
    rng = np.random.default_rng(7)
    n = 600 if name == "default-fraction" else 150
    centers = rng.normal(size=(6, 8))
    level0 = rng.integers(0, 6, n)
    texts = [f"doc {i}" for i in range(n)]
    x = centers[level0] + 0.9 * rng.normal(size=(n, 8))
    vectors = dict(zip(texts, torch.nn.functional.normalize(torch.tensor(x, dtype=torch.float32), dim=1).numpy()))
    if name.startswith("uneven"):  # ArXivHierarchical-like: two levels, some documents have only the first
        labels = [[int(a), int(a) * 10 + int(i % 3)] if i % 4 else [int(a)] for i, a in enumerate(level0)]
        if name == "uneven-strings":
            labels = [[f"L{x}" for x in label] for label in labels]
    else:
        labels = [int(a) for a in level0]
    return texts, labels, vectors


@pytest.mark.parametrize("name, fraction, dim", [("random", 1.0, None), ("uneven-ints", 1.0, None), ("uneven-strings", 1.0, None),
                                                 ("default-fraction", 0.04, None), ("all-documents", None, None), ("random", 1.0, 5)])
def test_clustering_equals_mteb(name, fraction, dim):
    texts, labels, vectors = clustering_case(name)

    class Clustering(AbsTaskClustering):
        metadata = metadata("Clustering", f"OracleClustering{name}", "v_measure")
        max_fraction_of_documents_to_embed = fraction
    theirs = run_mteb(Clustering, truncated(vectors, dim), DatasetDict(test=Dataset.from_dict(dict(sentences=texts, labels=labels))))
    rows = [dict(text=t, label=label) for t, label in zip(texts, labels)]
    ours = ev.score_task(dict(type="clustering", rows=rows, fraction=fraction), ev.at_dim(our_embed(vectors), dim))
    compare("clustering", ours, theirs, ["v_measure", "v_measure_std", "ami", "ami_std"])


# ---- classification ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, dim", [("three-labels", None), ("binary", None), ("string-labels", None), ("three-labels", 5)])
def test_classification_equals_mteb(name, dim):
    rng = np.random.default_rng(8)
    n_labels = 2 if name == "binary" else 3
    label = lambda i: f"class {i}" if name == "string-labels" else i
    train_y, test_y = rng.integers(0, n_labels, 120), rng.integers(0, n_labels, 80)
    x = rng.normal(size=(200, 8)) + 1.5 * np.eye(n_labels, 8)[np.concatenate([train_y, test_y])]
    texts = [f"example {i}" for i in range(200)]
    vectors = dict(zip(texts, torch.nn.functional.normalize(torch.tensor(x, dtype=torch.float32), dim=1).numpy()))
    train = dict(text=texts[:120], label=[label(int(y)) for y in train_y])
    test = dict(text=texts[120:], label=[label(int(y)) for y in test_y])

    class Classification(AbsTaskClassification):
        metadata = metadata("Classification", f"OracleClassification{name}", "accuracy")
    theirs = run_mteb(Classification, truncated(vectors, dim), DatasetDict(train=Dataset.from_dict(train), test=Dataset.from_dict(test)))
    task = dict(type="classification", train=[dict(text=t, label=y) for t, y in zip(*train.values())],
                rows=[dict(text=t, label=y) for t, y in zip(*test.values())])
    ours = ev.score_task(task, ev.at_dim(our_embed(vectors), dim))
    compare("classification", ours, theirs, ["accuracy", "f1", "f1_weighted", "precision", "recall"] + (["ap"] if name == "binary" else []))


# ---- STS, pair classification, summarization ---------------------------------------------------------------

def pairs(name, n=80):
    rng = random.Random(name)
    texts = [f"sentence {i}" for i in range(60)]
    vectors = unit_vectors(texts, seed=9, levels=1 if name == "ties" else None)
    s1 = [rng.choice(texts) for _ in range(n)]
    s2 = [a if name == "identical" and i % 3 == 0 else rng.choice(texts) for i, a in enumerate(s1)]
    return s1, s2, vectors, rng


class STS(AbsTaskSTS):
    metadata = metadata("STS", "OracleSTS", "cosine_spearman")


@pytest.mark.parametrize("name, dim", [("random", None), ("identical", None), ("ties", None), ("random", 5)])
def test_sts_equals_mteb(name, dim):
    s1, s2, vectors, rng = pairs(name)
    gold = [float(rng.randint(0, 10)) / 2 for _ in s1]
    theirs = run_mteb(STS, truncated(vectors, dim), DatasetDict(test=Dataset.from_dict(dict(sentence1=s1, sentence2=s2, score=gold))))
    rows = [dict(sentence1=a, sentence2=b, score=g) for a, b, g in zip(s1, s2, gold)]
    ours = ev.score_task(dict(type="sts", rows=rows), ev.at_dim(our_embed(vectors), dim))
    compare("sts", ours, theirs, ["cosine_spearman", "cosine_pearson", "euclidean_spearman", "manhattan_spearman", "spearman", "pearson"])


class PairClassification(AbsTaskPairClassification):
    metadata = metadata("PairClassification", "OraclePairClassification", "max_ap")


@pytest.mark.parametrize("name, dim", [("random", None), ("identical", None), ("ties", None), ("random", 5)])
def test_pair_classification_equals_mteb(name, dim):
    s1, s2, vectors, rng = pairs(name)
    labels = [int(a == b or rng.random() < 0.4) for a, b in zip(s1, s2)]
    data = DatasetDict(test=Dataset.from_dict(dict(sentence1=s1, sentence2=s2, labels=labels)))
    theirs = run_mteb(PairClassification, truncated(vectors, dim), data)
    rows = [dict(sentence1=a, sentence2=b, label=y) for a, b, y in zip(s1, s2, labels)]
    ours = ev.score_task(dict(type="pair_classification", rows=rows), ev.at_dim(our_embed(vectors), dim))
    compare("pair_classification", ours, theirs, [f"{s}_{m}" for s in ("cosine", "dot", "euclidean", "manhattan", "similarity", "max")
                                                  for m in ("accuracy", "f1", "precision", "recall", "ap")])


class Summarization(AbsTaskSummarization):
    metadata = metadata("Summarization", "OracleSummarization", "cosine_spearman")
    min_score, max_score = 0, 5


@pytest.mark.parametrize("name, dim", [("random", None), ("constant-rows", None), ("random", 5)])
def test_summarization_equals_mteb(name, dim):
    rng = random.Random(name)
    texts = [f"summary {i}" for i in range(100)]
    vectors = unit_vectors(texts, seed=10)
    rows = []
    for i in range(20):
        human, machine = rng.sample(texts, 3), rng.sample(texts, 5)
        relevance = [rng.randint(0, 5) for _ in machine]
        if name == "constant-rows" and i % 5 == 0:
            relevance = [3] * 5  # constant gold: skipped
        if name == "constant-rows" and i % 5 == 1:
            machine = [machine[0]] * 5  # constant predictions: skipped
        rows.append(dict(text=f"article {i}", human_summaries=human, machine_summaries=machine, relevance=relevance))
    theirs = run_mteb(Summarization, truncated(vectors, dim), DatasetDict(test=Dataset.from_list(rows)))
    ours = ev.score_task(dict(type="summarization", rows=rows), ev.at_dim(our_embed(vectors), dim))
    compare("summarization", ours, theirs, ["cosine_spearman", "cosine_pearson", "dot_spearman", "dot_pearson", "spearman", "pearson"])


def test_print_largest_differences():
    print("\nlargest difference against mteb per task type: " + ", ".join(f"{k} {v:.1e}" for k, v in sorted(LARGEST.items())))
