"""mine.py against sentence-transformers' mine_hard_negatives on the same embeddings; the label recipes row by row;
bad input; and mined data through train.py and eval.py."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TIMEOUT, torchrun

import builtin
import checkpoint
import data
import mine


def fixed_vectors(texts, seed=0, dim=6):
    """Unit vectors with structure: a query and its positives close together, documents sharing vectors (ties)."""
    rng = np.random.default_rng(seed)
    base = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(40, dim)), dtype=torch.float32), dim=1)
    out = {}
    for n, t in enumerate(texts):
        v = base[n % 40] + (0.0 if n % 3 == 0 else 0.35 * torch.tensor(rng.normal(size=dim), dtype=torch.float32))
        out[t] = torch.nn.functional.normalize(v, dim=0)
    return out


def test_negatives_equal_sentence_transformers_mine_hard_negatives(tiny, tmp_path):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives
    rng = random.Random(1)
    corpus = [f"doc {i}" for i in range(300)]
    queries = [f"question {i}" for i in range(60)]
    pairs = [(q, rng.choice(corpus)) for q in queries] + [(queries[3], corpus[7]), (queries[3], corpus[8])]  # a query with 3 positives
    vectors = fixed_vectors(queries + corpus, seed=2)
    for q, p in pairs[:20]:  # some positives close to their query, so the margin rule bites
        vectors[p] = torch.nn.functional.normalize(vectors[q] + 0.3 * vectors[p], dim=0)
    model, tokenizer = tiny
    checkpoint.export_model(str(tmp_path), model.backbone, model.backbone.state_dict(), tokenizer, 32, "find", "")
    st = SentenceTransformer(str(tmp_path / "checkpoint"), device="cpu")
    lookup = lambda texts, **kw: np.stack([vectors[t].numpy() for t in texts])
    st.encode_query, st.encode_document = lookup, lookup
    settings = dict(range_min=5, range_max=100, max_score=0.8, relative_margin=0.05)
    theirs = mine_hard_negatives(Dataset.from_dict(dict(query=[q for q, _ in pairs], positive=[p for _, p in pairs])), st, corpus=corpus,
                                 num_negatives=24, sampling_strategy="top", output_format="n-tuple", verbose=False, **settings)
    embed = lambda texts, prompt: torch.stack([vectors[t] for t in texts])
    ours, report = mine.mine_retrieval([q for q, _ in pairs], [p for _, p in pairs], corpus, embed, "", negatives=24, **settings)
    assert 10 < len(ours) < len(pairs)  # some queries kept, some dropped for too few negatives
    assert report["dropped_too_few_negatives"] == len(pairs) - len(ours)
    theirs = [dict(query=r["query"], passage=r["positive"], **{f"negative_{j}": r[f"negative_{j}"] for j in range(1, 25)}) for r in theirs]
    assert ours == theirs  # every query, every negative, in order, ties included
    for row in ours:
        negatives = [row[f"negative_{j}"] for j in range(1, 25)]
        assert row["passage"] not in negatives and len(set(negatives)) == 24


def test_classification_and_clustering_rows():
    texts = [f"text {i}" for i in range(40)]
    binary, _ = mine.from_labels(texts, [i % 2 for i in range(40)], "classification", "P: ", label_names={"0": "negative", "1": "positive"})
    assert binary[1] == dict(query="P: text 1", passage="positive", negative_1="negative") and len(binary) == 40
    labels = [f"topic {i % 5}" for i in range(39)] + ["lonely"]
    rows, report = mine.from_labels(texts, labels, "clustering", "P: ", negatives=24)
    assert len(rows) == 39 and report["dropped_single_text_label"] == 1
    label = dict(zip(texts, labels))
    for row in rows:
        text = row["query"].removeprefix("P: ")
        assert row["passage"] != text and label[row["passage"]] == label[text]
        assert all(label[row[f"negative_{j}"]] != label[text] for j in range(1, 25))
    assert data.task_type("tickets_clustering") == "clustering" and data.task_type("reviews_classification") == "classification"


def test_bad_input_is_named_and_nothing_is_half_written(tmp_path):
    (tmp_path / "pairs.csv").write_text("question,answer\na,b\n")
    with pytest.raises(mine.MineError, match="pairs.csv: missing column\\(s\\) \\['query', 'positive'\\]"):
        mine.main([str(tmp_path / "pairs.csv"), "--name", "x", "--out", str(tmp_path / "out"), "--instruction", "i", "--model", "tiny"])
    (tmp_path / "few.csv").write_text("query,positive\n" + "".join(f"q{i},p{i}\n" for i in range(10)))  # 10 documents: never 24 negatives
    with pytest.raises(mine.MineError, match="no row survived"):
        mine.main([str(tmp_path / "few.csv"), "--name", "x", "--out", str(tmp_path / "out"), "--instruction", "i", "--model", "tiny",
                   "--cache-dir", str(tmp_path / "cache")])
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
    with pytest.raises(mine.MineError, match="all texts share one label"):
        mine.from_labels(["a", "b"], [1, 1], "clustering", "")


def test_mined_pairs_train_and_evaluate(tmp_path):
    # The built-in retrieval pairs (docstring summary -> code) mined with the tiny model, trained on, evaluated.
    funcs = [f for f in builtin.stdlib_functions() if not builtin.heldout(f["module"])][:400]
    with open(tmp_path / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(dict(query=x["summary"], positive=x["code"])) + "\n" for x in funcs)
    run = lambda *args: subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    done = run("mine.py", tmp_path / "pairs.jsonl", "--name", "stdlib_pairs", "--out", tmp_path / "data", "--model", "tiny", "--max-len", 64,
               "--instruction", builtin.RETRIEVAL_INSTRUCTION, "--max-score", 1.0, "--relative-margin", 0, "--cache-dir", tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rows out" in done.stdout and "negative scores" in done.stdout
    done = run("train.py", "--data", tmp_path / "data", "--out", tmp_path / "run", "--epochs", 1, "--batch-size", 16, "--max-len", 64,
               "--eval-tasks", "--cache-dir", tmp_path / "cache", "--no-tensorboard")
    assert done.returncode == 0, done.stderr[-3000:]
    done = run("eval.py", "--model", tmp_path / "run" / "checkpoint", "--out", tmp_path / "eval")
    assert done.returncode == 0 and "StdlibCodeRetrieval" in done.stdout, done.stderr[-3000:]


def test_two_ranks_mine_what_one_process_mines(tmp_path):
    # torchrun shards the embedding over ranks; the file written is the same.
    import pyarrow.parquet as pq
    funcs = [f for f in builtin.stdlib_functions() if not builtin.heldout(f["module"])][:150]
    with open(tmp_path / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(dict(query=x["summary"], positive=x["code"])) + "\n" for x in funcs)
    args = ["--model", "tiny", "--max-len", 48, "--instruction", "find", "--max-score", 1.0, "--relative-margin", 0, "--negatives", 8,
            "--range-max", 40]
    mine.main([str(tmp_path / "pairs.jsonl"), "--name", "one", "--out", str(tmp_path / "one"), "--cache-dir", str(tmp_path / "cache1"),
               *map(str, args)])
    torchrun("mine.py", tmp_path / "pairs.jsonl", "--name", "one", "--out", tmp_path / "two", "--cache-dir", tmp_path / "cache2", *args)
    one, two = pq.read_table(tmp_path / "one" / "one.parquet").to_pylist(), pq.read_table(tmp_path / "two" / "one.parquet").to_pylist()
    assert len(one) > 20 and one == two
