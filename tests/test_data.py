import json

import numpy as np
import pytest
from conftest import write_source

import data
import model as f2llm_model


def load(paths, tokenizer, tmp_path, overrides=None):
    return [data.load_source(str(p), tokenizer, 32, str(tmp_path / "cache"), data.task_type(data.source_name(str(p)), overrides),
                             f2llm_model.tokenize, progress=False) for p in paths]


@pytest.fixture
def sources(tmp_path, tokenizer):
    paths = [write_source(tmp_path / "msmarco.jsonl", 200, 9, seed=1), write_source(tmp_path / "banking77.jsonl", 120, 8, seed=2),
             write_source(tmp_path / "imdb.jsonl", 90, 1, seed=3)]
    return load(paths, tokenizer, tmp_path)


def test_task_types_from_source_names(sources):
    assert [s.kind for s in sources] == ["retrieval", "clustering", "classification"]
    assert data.task_type("banking77", {"banking77": "retrieval"}) == "retrieval"


def test_tokenized_once_and_cached(tmp_path, tokenizer, sources):
    path = tmp_path / "msmarco.jsonl"
    first = sources[0]
    assert first.text(first.query[0]) == f2llm_model.tokenize(tokenizer, [json.loads(path.open().readline())["query"]], 32)[0]
    calls = []
    again = data.load_source(str(path), tokenizer, 32, str(tmp_path / "cache"), "retrieval", lambda *a: calls.append(a), progress=False)
    assert calls == [] and np.array_equal(again.tokens, first.tokens) and np.array_equal(again.negatives, first.negatives)


def test_one_source_per_step_on_all_ranks_and_disjoint_shards(sources):
    world = 4
    ranks = [data.Batches(sources, 16, world, r, seed=0) for r in range(world)]
    single = data.Batches(sources, 16, 1, 0, seed=0)
    seen = {s.name: set() for s in sources}
    assert ranks[0].steps_per_epoch == single.steps_per_epoch == (198 // 16) + (119 // 16) + (90 - 1) // 16
    for step in range(2 * single.steps_per_epoch):
        batches = [b(step) for b in ranks]
        whole = single(step)
        assert len({b["source"] for b in batches}) == 1 and whole["source"] == batches[0]["source"]
        rows = np.concatenate([b["rows"] for b in batches])
        assert len(set(rows.tolist())) == 16 and rows.tolist() == whole["rows"].tolist()  # same global batch on any world size
        assert [q for b in batches for q in b["seqs"][:4]] == whole["seqs"][:16]  # queries: rank shards in order
        if step < single.steps_per_epoch:
            assert not seen[whole["source"]] & set(rows.tolist())  # no row twice in an epoch
            seen[whole["source"]] |= set(rows.tolist())
    held_out = {s.name: set(v.tolist()) for s, v in zip(sources, single.val)}
    assert all(not seen[n] & held_out[n] for n in seen) and [len(v) for v in held_out.values()] == [2, 1, 1]


def test_validation_batches_are_the_same_on_any_number_of_ranks(sources):
    whole = data.Batches(sources, 16, 1, 0, seed=0).validation()
    assert [b["n_real"] for b in whole] == [2, 1, 1]
    for world in (2, 4):
        shards = [data.Batches(sources, 16, world, r, seed=0).validation() for r in range(world)]
        for k, b in enumerate(whole):
            parts, group = [s[k] for s in shards], 1 + b["n_negatives"]
            rows = np.concatenate([p["rows"] for p in parts])
            assert len(rows) % world == 0 and parts[0]["n_real"] == b["n_real"] and rows[:b["n_real"]].tolist() == b["rows"].tolist()
            queries = [q for p in parts for q in p["seqs"][:p["n_queries"]]]
            docs = [d for p in parts for d in p["seqs"][p["n_queries"]:]]
            assert queries[:b["n_real"]] == b["seqs"][:b["n_queries"]] and docs[:b["n_real"] * group] == b["seqs"][b["n_queries"]:]


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


def test_builtin_data_takes_the_same_path(tmp_path, tokenizer):
    folder = data.write_builtin_data(str(tmp_path / "builtin"))
    files = data.find_files(folder)
    srcs = load(files, tokenizer, tmp_path)
    assert [(s.name, s.kind) for s in srcs] == [("stdlib_code_clustering", "clustering"), ("stdlib_code_retrieval", "retrieval")]
    assert all(len(s.query) > 1000 for s in srcs)
    modules = {f["module"] for f in data.stdlib_functions()}
    assert any(data.heldout(m) for m in modules) and not all(data.heldout(m) for m in modules)
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
    ([GOOD, GOOD, dict(GOOD, passage=3)], "row 2: field 'passage' is int, expected a string"),
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
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())  # nothing half-written


def test_bad_parquet_row_and_bad_json_line(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "imdb.parquet"
    pq.write_table(pa.table({"query": ["a", "b"], "passage": ["x", None], "negative_1": ["n", "m"]}), path)
    with pytest.raises(data.DataError, match=r"imdb.parquet: row 1: field 'passage' is NoneType"):
        load([path], tokenizer, tmp_path)
    bad = tmp_path / "qa.jsonl"
    bad.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(data.DataError, match="qa.jsonl: line 2: not valid JSON"):
        load([bad], tokenizer, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="empty: no .parquet or .jsonl files"):
        data.find_files(str(tmp_path / "empty"))
    with pytest.raises(data.DataError, match="not a folder of F2LLM files"):
        data.find_files(str(tmp_path / "missing"))
