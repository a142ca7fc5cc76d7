import functools
import json
import math
import random

import numpy as np
import pytest
from conftest import write_source

import builtin
import data
import model as f2llm_model


def load(paths, tokenizer, tmp_path, overrides=None):
    tokenize = functools.partial(f2llm_model.tokenize, tokenizer, max_len=32)
    return [data.load_source(str(p), data.task_type(data.source_name(str(p)), overrides), tokenize, str(tmp_path / "cache"), progress=False)
            for p in paths]


@pytest.fixture
def sources(tmp_path, tokenizer):
    paths = [write_source(tmp_path / "msmarco.jsonl", 200, 9, seed=1), write_source(tmp_path / "banking77.jsonl", 120, 8, seed=2),
             write_source(tmp_path / "imdb.jsonl", 90, 1, seed=3)]
    return load(paths, tokenizer, tmp_path)


def test_task_types_from_source_names(sources):
    assert [s.kind for s in sources] == ["retrieval", "clustering", "classification"]
    assert data.task_type("banking77", {"banking77": "retrieval"}) == "retrieval"


def test_names_in_no_official_list_are_reported():
    names = ["msmarco", "qa", "banking77", "imdb", "stdlib_code_retrieval", "mine"]
    assert data.unlisted(names, {"mine": "clustering"}) == ["qa"]
    assert [data.task_type(n) for n in ("qa", "stdlib_code_clustering")] == ["retrieval", "clustering"]


def test_tokenized_once_and_cached(tmp_path, tokenizer):
    path, calls = write_rows(tmp_path / "msmarco.jsonl", [dict(GOOD, query=f"q{i % 7}") for i in range(50)]), []  # repeated texts
    def counted(*args, **kwargs):
        calls.append(len(args[1]))
        return f2llm_model.tokenize(*args, **kwargs)
    tokenize = functools.partial(counted, tokenizer, max_len=32)
    first = data.load_source(str(path), "retrieval", tokenize, str(tmp_path / "cache"), progress=False)
    assert first.text(first.query[0]) == f2llm_model.tokenize(tokenizer, [json.loads(path.open().readline())["query"]], 32)[0]
    n_texts = len({v for line in path.open() for v in json.loads(line).values()})
    assert sum(calls) == n_texts  # each distinct text once
    again = data.load_source(str(path), "retrieval", tokenize, str(tmp_path / "cache"), progress=False)
    assert sum(calls) == n_texts and np.array_equal(again.negatives, first.negatives)
    assert [again.text(t) for t in range(n_texts)] == [first.text(t) for t in range(n_texts)]


def test_one_source_per_step_on_all_ranks_and_disjoint_shards(sources):
    world = 4
    ranks = [data.Batches(sources, 16, world, r, seed=0) for r in range(world)]
    single = data.Batches(sources, 16, 1, 0, seed=0)
    assert ranks[0].steps_per_epoch == single.steps_per_epoch == math.ceil(198 / 16) + math.ceil(119 / 16) + math.ceil(89 / 16)
    for step in range(2 * single.steps_per_epoch):
        batches = [b(step) for b in ranks]
        whole = single(step)
        assert len({b["source"] for b in batches}) == 1 and whole["source"] == batches[0]["source"]
        rows = np.concatenate([b["rows"] for b in batches])
        assert rows.tolist() == whole["rows"].tolist()  # same global batch on any world size
        assert [q for b in batches for q in b["seqs"][:4]] == whole["seqs"][:16]  # queries: rank shards in order
        assert [d for b in batches for d in b["seqs"][4:]] == whole["seqs"][16:]  # and their groups


def test_every_training_row_every_epoch(tmp_path, tokenizer, sources):
    # accelerate's even_batches: a source's last batch wraps around to the epoch's first rows, so nothing is dropped,
    # not even a source smaller than one global batch (STS22 and COLIEE in the real data).
    small = load([write_source(tmp_path / "sts22.jsonl", 11, 8, seed=4)], tokenizer, tmp_path)
    b = data.Batches(sources + small, 16, 1, 0, seed=0)
    for epoch in range(2):
        seen = {s.name: [] for s in b.sources}
        for step in range(epoch * b.steps_per_epoch, (epoch + 1) * b.steps_per_epoch):
            x = b(step)
            seen[x["source"]] += x["rows"].tolist()
        for s, train, val in zip(b.sources, b.train, b.val):
            n = len(train)
            assert sorted(set(seen[s.name])) == sorted(train.tolist()) and len(seen[s.name]) == 16 * math.ceil(n / 16)
            assert not set(seen[s.name]) & set(val.tolist())  # held-out rows never trained
            assert sorted(seen[s.name][:n]) == sorted(train.tolist())  # each row once before any repeats
    assert [len(v) for v in b.val] == [2, 2, 1, 1]


def test_validation_covers_every_held_out_row_the_same_on_any_number_of_ranks(sources):
    whole = data.Batches(sources, 16, 1, 0, seed=0).validation()
    assert [sorted(set(b["rows"].tolist())) for b in whole] == [sorted(v.tolist()) for v in data.Batches(sources, 16).val]
    for world in (2, 4):
        shards = [data.Batches(sources, 16, world, r, seed=0).validation() for r in range(world)]
        for k, b in enumerate(whole):
            parts = [s[k] for s in shards]
            assert np.concatenate([p["rows"] for p in parts]).tolist() == b["rows"].tolist()
            assert [q for p in parts for q in p["seqs"][:p["n_queries"]]] == b["seqs"][:16]
            assert [d for p in parts for d in p["seqs"][p["n_queries"]:]] == b["seqs"][16:]


def test_held_out_rows_are_those_of_datasets_train_test_split():
    from datasets import Dataset
    for n in [2, 3, 50, 99, 100, 101, 150, 389, 454, 1001, 12345]:
        split = Dataset.from_dict({"row": list(range(n))}).train_test_split(train_size=0.99, shuffle=True, seed=0)
        train, val = data.heldout_split(n)
        assert train.tolist() == split["train"]["row"] and val.tolist() == split["test"]["row"], n
    assert [len(x) for x in data.heldout_split(1)] == [1, 0]  # datasets refuses to split one row; we train on it


class OfficialMultiLoader:
    """F2LLM's MultiLoader (run.py, v1), transcribed: the loaders are lists of batches."""

    def __init__(self, loader_dict):
        self.loader_dict = loader_dict

    def reset_epoch(self, epoch):
        self.rng = random.Random(epoch)
        self.iters = {k: iter(v) for k, v in self.loader_dict.items()}
        self.names = list(self.iters.keys())
        self.weights = [len(self.loader_dict[k]) for k in self.names]

    def __iter__(self):
        while self.names:
            name = self.rng.choices(self.names, weights=self.weights)[0]
            try:
                yield next(self.iters[name])
            except StopIteration:
                idx = self.names.index(name)
                self.names.pop(idx)
                self.weights.pop(idx)


def test_source_choice_is_the_official_multiloader(tmp_path, tokenizer):
    sizes = {"a": 700, "b": 40, "c": 3, "d": 260, "e": 2}  # rows; the global batch is 16
    paths = [write_source(tmp_path / f"{name}.jsonl", n, 8, seed=i) for i, (name, n) in enumerate(sizes.items())]
    b = data.Batches(load(paths, tokenizer, tmp_path), 16, 1, 0, seed=0)
    assert b.n_batches == [math.ceil(len(t) / 16) for t in b.train] == [44, 3, 1, 17, 1]
    official = OfficialMultiLoader({s.name: [(s.name, k) for k in range(n)] for s, n in zip(b.sources, b.n_batches)})
    for epoch in range(3):
        official.reset_epoch(epoch)
        ours = [b(step)["source"] for step in range(epoch * b.steps_per_epoch, (epoch + 1) * b.steps_per_epoch)]
        assert ours == [name for name, _ in official]
        assert [k for s, k in b.plan(epoch)[0] if s == 0] == list(range(b.n_batches[0]))  # a source's batches in order


def test_negatives_sampled_per_task_type(sources):
    b = data.Batches(sources, 8, 1, 0, seed=0)
    by_source = {}
    for step in range(b.steps_per_epoch):
        x = b(step)
        by_source[x["source"]] = x
    assert {k: v["n_negatives"] for k, v in by_source.items()} == {"msmarco": 7, "banking77": 7, "imdb": 1}
    assert {k: v["in_batch"] for k, v in by_source.items()} == {"msmarco": True, "banking77": False, "imdb": False}
    x = by_source["msmarco"]
    assert len(x["seqs"]) == 8 * (2 + 7)


def test_one_draw_of_negative_slots_per_step_for_the_whole_batch(sources):
    # The official collate: random.sample(range(24), 7) once per batch, the same slots for every row;
    # classification takes negative_1.
    b = data.Batches(sources, 8, 1, 0, seed=0)
    for step in range(b.steps_per_epoch):
        x = b(step)
        src = next(s for s in sources if s.name == x["source"])
        group = 1 + x["n_negatives"]
        negatives = [x["seqs"][8 + i * group + 1:8 + (i + 1) * group] for i in range(8)]
        slots = [[next(j for j in range(src.negatives.shape[1]) if src.text(src.negatives[r, j]) == t) for t in ns]
                 for r, ns in zip(x["rows"], negatives)]
        assert all(s == slots[0] for s in slots) and len(set(slots[0])) == x["n_negatives"]
        if src.kind == "classification":
            assert slots[0] == [0]
        else:
            assert slots[0] == random.Random(f"0/{step}").sample(range(src.negatives.shape[1]), 7)
    assert b(3)["seqs"] == data.Batches(sources, 8, 1, 0, seed=0)(3)["seqs"]  # a function of the step


def test_a_missing_negative_is_replaced_by_the_rows_next_stored_one(tmp_path, tokenizer):
    rows = [dict(GOOD, query=f"q{i}", negative_8="n8", negative_9="n9") for i in range(4)]
    rows[0].update(negative_2=None, negative_5=None)  # row 0 keeps 7 of its 9 negatives
    src = load([write_rows(tmp_path / "qa.jsonl", rows)], tokenizer, tmp_path)
    b = data.Batches(src, 4, 1, 0, seed=0)
    for step in range(6):
        x = b(step)
        slots = random.Random(f"0/{step}").sample(range(9), 7)
        negatives = lambda i: [tokenizer.decode(s[:-1]) for s in x["seqs"][4 + i * 8 + 1:4 + (i + 1) * 8]]
        first = x["rows"].tolist().index(0)
        spare = iter(f"n{j + 1}" for j in range(9) if j not in slots and j + 1 not in (2, 5))
        assert negatives(first) == [f"n{j + 1}" if j + 1 not in (2, 5) else next(spare) for j in slots], slots
        assert negatives(1 - min(first, 1)) == [f"n{j + 1}" for j in slots]  # a complete row keeps the drawn slots


def test_builtin_data_takes_the_same_path(tmp_path, tokenizer):
    folder = builtin.training_data(str(tmp_path / "builtin"))
    files = data.find_files(folder)
    srcs = load(files, tokenizer, tmp_path)
    assert [(s.name, s.kind) for s in srcs] == [("stdlib_code_clustering", "clustering"), ("stdlib_code_retrieval", "retrieval")]
    assert all(len(s.query) > 1000 for s in srcs)
    modules = {f["module"] for f in builtin.stdlib_functions()}
    assert any(builtin.heldout(m) for m in modules) and not all(builtin.heldout(m) for m in modules)
    row = json.loads(open(files[1]).readline())
    assert row["query"].startswith("Instruct: ") and "negative_24" in row


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = dict(query="q", passage="p", **{f"negative_{i}": f"n{i}" for i in range(1, 8)})


@pytest.mark.parametrize("rows, message", [
    ([], "empty file"),
    ([GOOD, {k: v for k, v in GOOD.items() if k != "query"}], "line 2: keys"),
    ([dict(GOOD, query="")], "row 0: field 'query' is empty"),
    ([GOOD, dict(GOOD, passage="  ")], "row 1: field 'passage' is empty"),
    ([GOOD, GOOD, dict(GOOD, passage=3)], "line 3: field 'passage' is int, expected a string"),
    ([dict(GOOD, negative_3=None)], "row 0: 6 negatives, a retrieval source needs 7"),
    ([{k: v for k, v in GOOD.items() if k != "negative_7"}], "6 negative columns, a retrieval source needs at least 7"),
    ([dict(GOOD, label="x")], "unknown column layout"),
    ([{k: v for k, v in GOOD.items() if k != "negative_2"}], "unknown column layout"),
], ids=["empty", "ragged", "empty-query", "blank-passage", "non-string", "null-negative", "few-negatives", "extra-column", "gap"])
def test_bad_input_is_named(tmp_path, tokenizer, rows, message):
    path = write_rows(tmp_path / "msmarco.jsonl", rows)
    with pytest.raises(data.DataError, match=message) as e:
        load([path], tokenizer, tmp_path)
    assert str(path) in str(e.value)
    assert not [p for p in (tmp_path / "cache").glob("*") if p.name != "datasets"]  # no tokenization cache, not even half-written


def test_bad_parquet_row_and_bad_json_line(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "imdb.parquet"
    pq.write_table(pa.table({"query": ["a", "b"], "passage": ["x", None], "negative_1": ["n", "m"]}), path)
    with pytest.raises(data.DataError, match=r"imdb.parquet: row 1: field 'passage' is missing \(null\)"):
        load([path], tokenizer, tmp_path)
    bad = tmp_path / "qa.jsonl"
    bad.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(data.DataError, match="qa.jsonl: line 2: not valid JSON"):
        load([bad], tokenizer, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="empty: no .parquet or .jsonl files"):
        data.find_files(str(tmp_path / "empty"))
    with pytest.raises(data.DataError, match="missing: no such folder of F2LLM files"):
        data.find_files(str(tmp_path / "missing"))
