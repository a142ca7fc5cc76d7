"""Each fault a cluster or a user inflicts, injected, with the outcome it must have: resumable, nothing
overwritten, or a clear error before any step."""
import functools
import json
import os
import shutil

import pytest
import torch
from conftest import write_source

import checkpoint
import data
import loss as f2llm_loss
import model as f2llm_model
import train


def args_for(data_dir, tmp_path, *extra, curves=False):
    return ["--data", str(data_dir), "--batch-size", "16", "--chunk-size", "48", "--max-len", "32", "--epochs", "1", "--eval-tasks",
            "--val-every", "0", "--cache-dir", str(tmp_path / "cache"), *([] if curves else ["--no-tensorboard"]), *map(str, extra)]


def steps_logged(out):
    return [r["step"] for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "loss" in r]


# ---- lost work: a kill at any moment of a save ------------------------------------------------------------

class Killed(BaseException):
    """What a SIGKILL is to the code under test: it stops right there."""


def save_once(out, model, tokenizer, step):
    weights = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    checkpoint.save_state(out, dict(model=weights, step=step), dict(step=step))
    checkpoint.export_model(out, model.backbone, model.backbone.state_dict(), tokenizer, 32, "find it", f"step {step}")


def operations(monkeypatch, kill_at=None):
    """Count (and at kill_at, interrupt) the file operations a save is made of; a kill inside a deletion leaves it half done."""
    calls = []
    for owner, name in ((torch, "save"), (os, "replace"), (os, "fsync"), (os, "remove"), (shutil, "rmtree"), (checkpoint, "save_tokenizer"),
                        (checkpoint, "write_sentence_transformers_files")):
        real = getattr(owner, name)

        def wrapped(*a, _real=real, _name=name, **k):
            calls.append(_name)
            if len(calls) == kill_at:
                if _name == "rmtree" and os.path.isdir(a[0]) and os.listdir(a[0]):
                    os.remove(os.path.join(a[0], sorted(os.listdir(a[0]))[-1]))  # part of the tree is gone
                raise Killed(f"killed at {_name}")
            return _real(*a, **k)
        monkeypatch.setattr(owner, name, wrapped)
    return calls


def test_a_kill_at_any_phase_of_a_save_leaves_a_resumable_state_and_saving_working(tmp_path, tiny, monkeypatch):
    model, tokenizer = tiny
    out = str(tmp_path / "out")
    os.makedirs(out)
    with monkeypatch.context() as m:
        calls = operations(m)
        save_once(out, model, tokenizer, 1)
        n_ops = len(calls)
    assert n_ops >= 8
    phases, step = [], 1
    for kill_at in range(1, n_ops + 1):
        with monkeypatch.context() as m:
            calls = operations(m, kill_at)
            with pytest.raises(Killed):
                save_once(out, model, tokenizer, step + 1)
            phases.append(calls[-1])
        checkpoint.recover(out)
        assert checkpoint.load_state(out)["step"] in (step, step + 1)  # the newest complete training state, never a partial one
        assert checkpoint.read_summary(out)["step"] in (step, step + 1)
        assert f2llm_model.load(os.path.join(out, "checkpoint"))[0] is not None  # a model folder to use
        step += 2
        save_once(out, model, tokenizer, step)  # and saving goes on working
        kept = [s["file"] for s in checkpoint.states(out)]
        assert checkpoint.load_state(out)["step"] == step and sorted(os.listdir(out)) == sorted(["checkpoint", "state.json", *kept]) and len(kept) == 2
    assert {"save", "replace", "rmtree", "fsync", "save_tokenizer"} <= set(phases), phases


# ---- NaN: skipped, counted, stopped; never saved -----------------------------------------------------------

def nan_steps(monkeypatch, bad):
    real, calls = f2llm_loss.cached_step, []

    def step(model, *a, **k):
        calls.append(1)
        out = real(model, *a, **k)
        if len(calls) in bad:
            for p in model.parameters():
                p.grad.fill_(float("nan"))
            return (torch.tensor(float("nan")),) + out[1:]
        return out
    monkeypatch.setattr(f2llm_loss, "cached_step", step)


def test_a_non_finite_step_changes_nothing_and_is_logged(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        nan_steps(m, {3, 4})
        train.main(args_for(data_dir, tmp_path, "--out", out, "--stop-at", 4))
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log if "skipped" in r] == [3, 4] and steps_logged(out) == [1, 2]
    state = checkpoint.load_state(out)
    assert state["counters"] == dict(bad_in_a_row=2, bad=2)
    train.main(args_for(data_dir, tmp_path, "--out", tmp_path / "two", "--stop-at", 2))
    two = checkpoint.load_state(tmp_path / "two")
    assert all(torch.equal(state["model"][k], two["model"][k]) for k in two["model"])  # skipped steps changed nothing
    # The count of bad steps in a row survives a resume: 2 before, 3 more, and the default limit of 5 stops the run.
    with monkeypatch.context() as m:
        nan_steps(m, {1, 2, 3})
        with pytest.raises(RuntimeError, match="5 steps in a row with a non-finite loss or gradient norm, up to step 7"):
            train.main(args_for(data_dir, tmp_path, "--out", out, "--resume"))
    assert checkpoint.load_state(out)["step"] == 4  # the last good state stays


def test_non_finite_weights_are_never_saved(tmp_path, tiny):
    model, tokenizer = tiny
    bad = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    bad["norm.weight"][0] = float("inf")
    with pytest.raises(checkpoint.CheckpointError, match="non-finite weights"):
        checkpoint.save_state(str(tmp_path), dict(model=bad, step=7), dict(step=7))
    assert not list(tmp_path.glob("state*"))


# ---- one run per --out -------------------------------------------------------------------------------------

def no_model_loading(monkeypatch):
    monkeypatch.setattr(f2llm_model, "load", lambda *a, **k: pytest.fail("a model was loaded before the error"))


def test_a_fresh_run_never_overwrites_and_two_runs_never_share_an_out(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train.main(args_for(data_dir, tmp_path, "--out", out, "--stop-at", 2))
    before = {p.name: p.read_bytes() for p in out.glob("state-*.pt")}
    with monkeypatch.context() as m:
        no_model_loading(m)
        with pytest.raises(SystemExit, match="holds another run \\(step 2\\); --resume continues it, --overwrite deletes it"):
            train.main(args_for(data_dir, tmp_path, "--out", out, "--stop-at", 1))
        held = checkpoint.lock(str(out))
        with pytest.raises(checkpoint.CheckpointError, match=f"{out} is in use by another run \\(pid {os.getpid()}\\)"):
            train.main(args_for(data_dir, tmp_path, "--out", out, "--resume"))
        held.close()
    assert {p.name: p.read_bytes() for p in out.glob("state-*.pt")} == before
    train.main(args_for(data_dir, tmp_path, "--out", out, "--stop-at", 1, "--overwrite"))
    assert steps_logged(out) == [1] and checkpoint.load_state(out)["step"] == 1


# ---- silently wrong: the cache, the data, the flags -------------------------------------------------------

def test_the_cache_is_keyed_by_task_type_and_rebuilt_when_damaged(tmp_path, tokenizer, capsys):
    path = write_source(tmp_path / "imdb.jsonl", 20, 1, seed=3)  # one negative: fine as classification only
    load = lambda kind: data.load_source(str(path), kind, functools.partial(f2llm_model.tokenize, tokenizer, max_len=32), str(tmp_path / "cache"))
    expected = [load("classification").text(t) for t in range(5)]
    with pytest.raises(data.DataError, match="1 negative columns, a retrieval source needs at least 7"):
        load("retrieval")  # not the cached classification rows without their checks
    folder = next(p for p in (tmp_path / "cache").iterdir() if p.name.startswith("imdb-"))
    tokens = folder / "tokens.arrow"
    for damage in (lambda raw: raw[:-100] + bytes(b ^ 0xFF for b in raw[-100:]), lambda raw: raw[:1000]):  # same size; truncated
        raw = tokens.read_bytes()
        tokens.unlink()  # a new file: the earlier Source keeps its own mapping of the old one
        tokens.write_bytes(damage(raw))
        capsys.readouterr()
        assert [load("classification").text(t) for t in range(5)] == expected
        assert f"tokenization cache {folder} is damaged (tokens.arrow differ" in capsys.readouterr().out


def test_resume_refuses_changed_data_and_keeps_its_cache(data_dir, tmp_path, monkeypatch):
    folder = tmp_path / "data"
    shutil.copytree(data_dir, folder)
    out = tmp_path / "run"
    train.main(args_for(folder, tmp_path, "--out", out, "--stop-at", 2))
    caches = sorted(os.listdir(tmp_path / "cache"))
    train.main(args_for(str(folder) + "/", tmp_path, "--out", out, "--resume", "--stop-at", 3))  # dir/ is dir
    assert sorted(os.listdir(tmp_path / "cache")) == caches  # nothing tokenized again
    write_source(folder / "qa.jsonl", 120, 8, seed=9)  # regenerated: same name, other rows
    with monkeypatch.context() as m:
        no_model_loading(m)
        with pytest.raises(SystemExit, match="the data differs from the checkpoint's: qa: content changed"):
            train.main(args_for(folder, tmp_path, "--out", out, "--resume"))
        (folder / "qa.jsonl").unlink()
        with pytest.raises(SystemExit, match="qa: not in the data now"):
            train.main(args_for(folder, tmp_path, "--out", out, "--resume"))


@pytest.mark.parametrize("flags, message", [
    (["--save-every", "0"], "--save-every must be at least 1"), (["--log-every", "0"], "--log-every must be at least 1"),
    (["--max-len", "1"], "--max-len must be at least 2"), (["--batch-size", "-4"], "--batch-size must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"), (["--temperature", "0"], "--temperature must be positive"),
    (["--temperature", "-1"], "--temperature must be positive"), (["--clip", "0"], "--clip must be positive"),
    (["--lr", "0"], "--lr must be positive"), (["--chunk-size", "0"], "--chunk-size must be at least 1"),
    (["--task-type", "foo"], "--task-type takes SOURCE=TYPE"), (["--resume", "--overwrite"], "pick one"),
    (["--padded"], "give --chunk-tokens too"),
])
def test_bad_flags_are_refused_before_anything_is_loaded(flags, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(flags)
    assert message in capsys.readouterr().err


def test_errors_that_say_what_is_wrong(data_dir, tmp_path, monkeypatch):
    no_model_loading(monkeypatch)
    with pytest.raises(SystemExit, match="--task-type names no source of .*: \\['msmarco'\\]"):
        train.main(args_for(data_dir, tmp_path, "--out", tmp_path / "a", "--task-type", "msmarco=retrieval"))
    with pytest.raises(SystemExit, match="--resume: no training state in"):
        train.main(args_for(data_dir, tmp_path, "--out", tmp_path / "b", "--resume"))
    monkeypatch.undo()
    train.main(args_for(data_dir, tmp_path, "--out", tmp_path / "c", "--stop-at", 3))
    with pytest.raises(SystemExit, match="--stop-at 2: the checkpoint is already at step 3"):
        train.main(args_for(data_dir, tmp_path, "--out", tmp_path / "c", "--resume", "--stop-at", 2))
    sources = lambda folder: [data.load_source(f, "retrieval", functools.partial(f2llm_model.tokenize, f2llm_model.load("tiny")[1], max_len=32),
                                               str(tmp_path / "cache")) for f in data.find_files(folder)]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "qa.jsonl").write_bytes(b'{"query": "caf\xe9", "passage": "p"}\n')
    with pytest.raises(data.DataError, match="qa.jsonl: line 1: not UTF-8"):
        sources(str(bad))
    (bad / "qa.jsonl").unlink()
    (bad / "imdb.parquet").write_text("not parquet")
    with pytest.raises(data.DataError, match="imdb.parquet: not a parquet file"):
        sources(str(bad))
    with pytest.raises(data.DataError, match="nothere/data: no such folder"):
        data.find_files(str(tmp_path / "nothere" / "data"))
    long = "x" * 240  # a source name longer than a cache folder name may be
    (tmp_path / "long").mkdir()
    path = write_source(tmp_path / "long" / f"{long}.jsonl", 20, 8, seed=4)
    assert sources(str(tmp_path / "long"))[0].name == long


def test_the_log_and_the_curves_after_a_crash_are_the_history_of_the_checkpoint(data_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    real, calls = f2llm_loss.cached_step, []

    def crash_in_step_5(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise Killed("crash")
        return real(*a, **k)
    monkeypatch.setattr(f2llm_loss, "cached_step", crash_in_step_5)
    with pytest.raises(Killed):
        train.main(args_for(data_dir, tmp_path, "--out", out, "--save-every", 3, curves=True))
    assert steps_logged(out) == [1, 2, 3, 4]  # checkpoint at 3, step 4 logged but lost
    monkeypatch.undo()
    train.main(args_for(data_dir, tmp_path, "--out", out, "--save-every", 3, "--resume", "--stop-at", 6, curves=True))
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert steps_logged(out) == [1, 2, 3, 4, 5, 6]
    curves = EventAccumulator(str(out / "tensorboard")).Reload()  # TensorBoard's own reader, which honours the purge
    loss = curves.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in log if "loss" in r])
    assert {"train/lr", "train/grad_norm", "train/tok_per_s", "val/loss", "val/qa", "val/banking77"} <= set(curves.Tags()["scalars"])
