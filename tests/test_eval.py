import json
import random
import subprocess
import sys

import numpy as np
import pytest
import pytrec_eval
import torch
from conftest import ROOT, write_retrieval_task

import builtin
import eval as ev
import metrics

KS = (1, 3, 5, 10, 20, 100, 1000)


def test_mteb_reference_case():
    qrels = {"0": {"0": 1, "1": 1}, "1": {"1": 1}}
    run = {"0": {"0": 1.0, "1": 0.9, "2": 0.8}, "1": {"0": 0.0, "1": 1.0, "2": 0.0}}
    m = metrics.retrieval_metrics(qrels, run, ks=(1, 2, 3))
    assert [m[f"ndcg_at_{k}"] for k in (1, 2, 3)] == [1.0, 1.0, 1.0]
    assert [m[f"map_at_{k}"] for k in (1, 2, 3)] == [0.75, 1.0, 1.0]
    assert [m[f"recall_at_{k}"] for k in (1, 2, 3)] == [0.75, 1.0, 1.0]
    assert [m[f"precision_at_{k}"] for k in (1, 2, 3)] == [1.0, 0.75, 0.5]
    m = metrics.retrieval_metrics(qrels, run, ks=(1, 2, 3), ignore_identical_ids=True)
    assert [m[f"ndcg_at_{k}"] for k in (1, 2, 3)] == [0.5, 0.30657, 0.30657]
    assert [m[f"map_at_{k}"] for k in (1, 2, 3)] == [0.25, 0.25, 0.25]
    assert [m[f"recall_at_{k}"] for k in (1, 2, 3)] == [0.25, 0.25, 0.25]
    assert [m[f"precision_at_{k}"] for k in (1, 2, 3)] == [0.5, 0.25, 0.16667]


def random_judgements(seed):
    """Graded judgements, float32 score ties, queries with no relevant hit, judged docs never retrieved."""
    rng = random.Random(seed)
    docs = [f"d{i}" for i in range(1500)]
    qrels, run = {}, {}
    for q in range(40):
        judged = rng.sample(docs, rng.randint(1, 30))
        qrels[f"q{q}"] = {d: rng.choice([0, 1, 1, 2, 3]) for d in judged}
        if all(g == 0 for g in qrels[f"q{q}"].values()):
            qrels[f"q{q}"][judged[0]] = 1
        retrieved = rng.sample(docs, rng.randint(5, 1200))
        if q % 7 == 0:  # no relevant doc retrieved at all
            retrieved = [d for d in retrieved if qrels[f"q{q}"].get(d, 0) < 1]
        coarse = q % 2 == 0  # few distinct values -> many ties broken by doc id
        run[f"q{q}"] = {d: float(np.float32(rng.randint(0, 20) / 20 if coarse else rng.random())) for d in retrieved}
    run["unjudged"] = {"d1": 0.5}  # dropped: not in the judgements
    return qrels, run


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_metrics_equal_pytrec_eval(seed):
    qrels, run = random_judgements(seed)
    measures = {f"ndcg_cut.{','.join(map(str, KS))}", f"map_cut.{','.join(map(str, KS))}", f"recall.{','.join(map(str, KS))}",
                f"P.{','.join(map(str, KS))}", "success.1,5,10"}
    oracle = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    for q, ref in oracle.items():
        ours = metrics.query_metrics(qrels[q], run[q])
        for k in KS:
            for name, trec in (("ndcg", "ndcg_cut"), ("map", "map_cut"), ("recall", "recall"), ("precision", "P")):
                assert ours[f"{name}_at_{k}"] == pytest.approx(ref[f"{trec}_{k}"], abs=1e-6), (q, name, k)
        for k in (1, 5, 10):
            assert ours[f"hit_rate_at_{k}"] == ref[f"success_{k}"]
    mean = metrics.retrieval_metrics(qrels, run)
    assert mean["ndcg_at_10"] == round(np.mean([r["ndcg_cut_10"] for r in oracle.values()]), 5)
    assert mean["map_at_1000"] == round(np.mean([r["map_cut_1000"] for r in oracle.values()]), 5)


def test_mrr_and_search_by_chunks():
    qrels = {"a": {"x2": 1, "x5": 2}}
    run = {"a": {"x0": 0.9, "x1": 0.5, "x2": 0.5, "x5": 0.1}}  # tie: x2 ranks before x1 (doc id descending)
    m = metrics.query_metrics(qrels["a"], run["a"])
    assert (m["mrr_at_1"], m["mrr_at_3"], m["mrr_at_10"]) == (0, 0.5, 0.5)
    torch.manual_seed(0)
    q, d = torch.randn(7, 16), torch.randn(2500, 16)
    ids = [f"d{i}" for i in range(2500)]
    assert metrics.search(q, d, ids, top_k=100, chunk=300) == metrics.search(q, d, ids, top_k=100, chunk=5000)  # chunking changes nothing
    ref_s, ref_i = metrics.cos_sim(q, d).topk(100, dim=1)
    assert [list(r) for r in metrics.search(q, d, ids, top_k=100, chunk=300).values()] == [[ids[j] for j in row] for row in ref_i.tolist()]


@pytest.mark.parametrize("qrels, message", [
    ("q0\td0\t1\nq1\td9\t1\n", "test.tsv: line 3: unknown corpus id 'd9'"),
    ("q0\td0\t1\nq7\td1\t1\n", "test.tsv: line 3: unknown query id 'q7'"),
    ("q0\td0\thigh\n", "test.tsv: line 2: grade 'high' is not an integer"),
])
def test_bad_qrels_are_named(tmp_path, qrels, message):
    with pytest.raises(ev.TaskError, match=message):
        ev.load_task(write_retrieval_task(tmp_path / "t", qrels))


@pytest.mark.parametrize("file, content, message", [
    ("corpus.jsonl", '{"_id": "d0", "text": "a"}\n{"_id": "d1", "text": "b"}\n{"_id": "d0", "text": "c"}\n', "corpus.jsonl: line 3: _id 'd0' repeats line 1"),
    ("queries.jsonl", '{"_id": 1, "text": "a"}\n{"_id": "1", "text": "b"}\n', "queries.jsonl: line 2: _id '1' repeats line 1"),
    ("corpus.jsonl", '{"_id": "d0", "text": ["a"]}\n', "corpus.jsonl: line 1: text is list, expected a string"),
    ("queries.jsonl", b'{"_id": "q0", "text": "caf\xe9"}\n', "queries.jsonl: line 1: not UTF-8"),
    ("task.json", '{"type": "retrieval",}', "task.json: not valid JSON"),
    ("task.json", '{"type": "ranking"}', "task.json: expected an object whose type is one of"),
    ("qrels/test.tsv", None, "test.tsv: missing"),
], ids=["duplicate-doc", "duplicate-query", "non-string", "not-utf8", "bad-json", "bad-type", "no-qrels"])
def test_bad_task_files_are_named(tmp_path, file, content, message):
    folder = write_retrieval_task(tmp_path / "t", "q0\td0\t1\n")
    if content is None:
        (folder / file).unlink()
    else:
        (folder / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ev.TaskError, match=message) as e:
        ev.load_task(folder)
    assert str(folder) in str(e.value)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "task.json").write_text(json.dumps(dict(type="clustering")))
    (tmp_path / "c" / "test.jsonl").write_text('{"text": "a", "label": 1}\n{"label": 2}\n')
    with pytest.raises(ev.TaskError, match=r"test.jsonl: line 2: missing text"):
        ev.load_task(tmp_path / "c")


def test_model_paths_that_cannot_be_a_model_are_named(tmp_path):
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint" / "config.json").write_text("{}")
    for path, message in ((tmp_path / "run", "is a training run's folder; the model is .*checkpoint"),
                          (tmp_path / "nothing", "no such folder"), (tmp_path, "not a Hugging Face model folder")):
        with pytest.raises(SystemExit, match=message):
            ev.main(["--model", str(path)])


def test_a_model_with_non_finite_weights_is_refused(tmp_path, tiny):
    model, tokenizer = tiny
    state = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    state["layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    model.backbone.save_pretrained(tmp_path / "nan", state_dict=state)
    tokenizer.save_pretrained(tmp_path / "nan")
    with pytest.raises(SystemExit, match="non-finite weights in 1 tensors"):
        ev.main(["--model", str(tmp_path / "nan"), "--tasks", str(write_retrieval_task(tmp_path / "t", "q0\td0\t1\n"))])


def test_texts_and_length_as_f2llms_mteb_runs_embed_them():
    # F2LLM's MTEB wrapper: BEIR titles joined as (title + " " + text).strip(), up to 8192 tokens.
    seen = []
    def embed(texts, is_query):
        seen.append(texts)
        return torch.nn.functional.normalize(torch.randn(len(texts), 8), dim=1)
    corpus = [dict(_id="a", title="Adder", text="def add"), dict(_id="b", title="", text="  padded "), dict(_id="c", text="bare")]
    task = dict(type="retrieval", corpus=corpus, queries=[dict(_id="q", text="add")], query_ids=["q"], doc_ids=["a", "b", "c"],
                qrels={"q": {"a": 1}})
    ev.score_task(task, embed)
    assert seen == [["add"], ["Adder def add", "padded", "bare"]]
    assert ev.max_len_for({"size": "0.6b", "max_len": 1024}) == ev.max_len_for(None) == ev.MAX_LEN == 8192
    assert ev.max_len_for({"size": "tiny", "max_len": 96}) == 96  # the tiny model has seen nothing longer


def test_cli_end_to_end(tmp_path, tiny):
    model, tokenizer = tiny
    model.backbone.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    task = write_retrieval_task(tmp_path / "TinyRetrieval", "q0\td0\t1\nq1\td1\t2\n")
    done = subprocess.run([sys.executable, "eval.py", "--model", tmp_path / "ckpt", "--tasks", task, "--out", tmp_path / "res"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "TinyRetrieval" in done.stdout and "ndcg_at_10" in done.stdout
    result = json.loads((tmp_path / "res" / "TinyRetrieval.json").read_text())
    assert result["main_score_name"] == "ndcg_at_10" and 0 < result["main_score"] <= 1
    # the same numbers as scoring the model's embeddings directly
    emb = lambda texts, prompt=None: ev.f2llm_model.encode(model, tokenizer, texts, prompt)
    docs = emb(["def add(a, b): return a + b", "def read(path): return open(path).read()", "class Stack: pass"])
    queries = emb(["add two numbers", "read a file"], ev.f2llm_model.query_prompt("Find the matching function"))
    found = metrics.search(queries, docs, ["d0", "d1", "d2"])
    assert result["scores"] == metrics.retrieval_metrics({"q0": {"d0": 1}, "q1": {"d1": 2}}, {"q0": found[0], "q1": found[1]})
    # --dims: each dimension's scores from the first D coordinates, normalised again; the whole size is the plain run
    done = subprocess.run([sys.executable, "eval.py", "--model", tmp_path / "ckpt", "--tasks", task, "--out", tmp_path / "dims", "--dims", "128", "16"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "TinyRetrieval@16" in done.stdout, done.stderr[-3000:]
    assert json.loads((tmp_path / "dims" / "TinyRetrieval@128.json").read_text())["scores"] == result["scores"]
    at = lambda x: torch.nn.functional.normalize(x[:, :16], dim=-1)
    found = metrics.search(at(queries), at(docs), ["d0", "d1", "d2"])
    assert json.loads((tmp_path / "dims" / "TinyRetrieval@16.json").read_text())["scores"] == \
        metrics.retrieval_metrics({"q0": {"d0": 1}, "q1": {"d1": 2}}, {"q0": found[0], "q1": found[1]})


def test_builtin_tasks_are_never_trained_on(tmp_path):
    lines = lambda path: [json.loads(line) for line in open(path, encoding="utf-8")]
    train = builtin.training_data(str(tmp_path / "train"))
    seen = set()
    for name in ("stdlib_code_retrieval", "stdlib_code_clustering"):
        for row in lines(f"{train}/{name}.jsonl"):
            seen.update(v.split("\nQuery: ", 1)[-1] for v in row.values())
    trained = [f for f in builtin.stdlib_functions() if not builtin.heldout(f["module"]) and not builtin.heldout(f["module"], f["name"])]
    retrieval, clustering = builtin.tasks(str(tmp_path / "eval"))
    corpus = [d["text"] for d in lines(f"{retrieval}/corpus.jsonl")]
    queries = [q["text"] for q in lines(f"{retrieval}/queries.jsonl")]
    rows = lines(f"{clustering}/test.jsonl")
    assert len(corpus) > 200 and len(rows) > 200 and len({r["label"] for r in rows}) >= 20
    # A held-out text is in the training files only where a trained function has the very same text.
    assert (set(corpus + queries) | {r["text"] for r in rows}) & seen <= {t for f in trained for t in (f["code"], f["summary"])}
    # Retrieval: modules never seen in training; clustering: unseen code of modules seen in training.
    assert not {d["_id"].split(".")[0] for d in lines(f"{retrieval}/corpus.jsonl")} & {f["module"] for f in trained}
    assert {r["label"] for r in rows} <= {f["module"] for f in trained}
