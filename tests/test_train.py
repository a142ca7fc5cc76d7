import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import (
    ROOT,
    TIMEOUT,
    read_log,
    run_train,
    two_sources,
    write_retrieval_task,
)
from safetensors.torch import load_file

import checkpoint
import data
import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return two_sources(tmp_path_factory.mktemp("data"), 400, 200)


def common(data_dir, tmp_path):
    return ["--data", data_dir, "--batch-size", 16, "--chunk-size", 48, "--max-len", 32, "--epochs", 1, "--eval-tasks",
            "--cache-dir", tmp_path / "cache", "--save-every", 1000]


def test_short_run_lowers_validation_loss(data_dir, tmp_path):
    out = tmp_path / "run"
    output = run_train(*common(data_dir, tmp_path), "--out", out, "--lr", 2e-3, "--warmup", 5, "--val-every", 0)
    assert "warning: source 'qa' is in none of F2LLM's lists" in output and "'banking77'" not in output
    val = [r["val_loss"] for r in read_log(out) if "val_loss" in r]
    assert len(val) == 2 and val[1] < 0.7 * val[0], val
    from transformers import AutoModel
    loaded = AutoModel.from_pretrained(out / "checkpoint")  # a plain Hugging Face folder
    assert loaded.config.hidden_size == 128


def test_resume_continues_exactly(data_dir, tmp_path):
    args = common(data_dir, tmp_path) + ["--val-every", 0]
    run_train(*args, "--out", tmp_path / "straight", "--stop-at", 6)
    run_train(*args, "--out", tmp_path / "stopped", "--stop-at", 3)
    assert [r["step"] for r in read_log(tmp_path / "stopped") if "loss" in r] == [1, 2, 3]
    run_train(*args, "--out", tmp_path / "stopped", "--resume", "--stop-at", 6)
    losses = lambda out: [(r["step"], r["loss"], r["lr"]) for r in read_log(out) if "loss" in r]
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")  # bit for bit
    a = load_file(tmp_path / "straight" / "checkpoint" / "model.safetensors")
    b = load_file(tmp_path / "stopped" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not os.path.exists(tmp_path / "stopped" / "checkpoint.tmp")
    with pytest.raises(AssertionError, match="settings differ from the checkpoint's.*'lr': \\(0.001, 0.002\\)"):
        run_train(*args, "--out", tmp_path / "stopped", "--resume", "--lr", 2e-3)


def test_compiled_packed_run_trains_as_the_eager_one(data_dir, tmp_path):
    # --compile with --chunk-tokens: each packed row filled to the budget, so the layers compile once, static; the
    # evaluation's padded batches of every shape run them eagerly instead of compiling for each. Same losses and
    # scores as the eager run (whose rows are not filled), and no compilation past the first shape.
    task = write_retrieval_task(tmp_path / "TinyRetrieval", "q0\td0\t1\nq1\td1\t2\n")
    args = common(data_dir, tmp_path) + ["--chunk-tokens", 128, "--val-every", 2, "--eval-every", 2, "--stop-at", 3, "--eval-tasks", task]
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        done = subprocess.run([sys.executable, "train.py", *map(str, args + extra + ["--out", tmp_path / name])], cwd=ROOT,
                              capture_output=True, text=True, timeout=TIMEOUT, env=dict(os.environ, TORCH_LOGS="recompiles"))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        runs[name] = read_log(tmp_path / name), done.stderr
    pick = lambda log, key: [v for r in log if key in r for v in (r[key].values() if key == "eval" else [r[key]])]
    for key in ("loss", "val_loss", "eval"):
        eager, compiled = pick(runs["eager"][0], key), pick(runs["compiled"][0], key)
        assert len(eager) >= 2 and compiled == pytest.approx(eager, rel=1e-4), (key, eager, compiled)
    log = runs["compiled"][1]  # dynamo's reasons for each recompilation (TORCH_LOGS=recompiles): grad mode, eval mode, never a size
    assert "Recompiling" in log and "size mismatch" not in log, log[-3000:]


def test_matryoshka_trains_resumes_exactly_and_is_scored_at_every_dimension(data_dir, tmp_path):
    task = write_retrieval_task(tmp_path / "TinyRetrieval", "q0\td0\t1\nq1\td1\t2\n")
    args = common(data_dir, tmp_path) + ["--matryoshka", "--val-every", 0, "--eval-tasks", task]
    run_train(*args, "--stop-at", 4, "--out", tmp_path / "straight")
    run_train(*args, "--stop-at", 2, "--out", tmp_path / "stopped")
    output = run_train(*args, "--stop-at", 4, "--out", tmp_path / "stopped", "--resume")
    assert "Matryoshka dimensions 128, 64, 32, 16, 8" in output
    losses = lambda out: [(r["step"], r["loss"], r["lr"]) for r in read_log(out) if "loss" in r]
    assert len(losses(tmp_path / "straight")) == 4 and losses(tmp_path / "stopped") == losses(tmp_path / "straight")  # bit for bit
    scored = [r["eval"] for r in read_log(tmp_path / "straight") if "eval" in r]
    assert len(scored) == 1 and list(scored[0]) == [f"TinyRetrieval@{d}" for d in (128, 64, 32, 16, 8)]  # before training (none at --stop-at)
    assert "Matryoshka loss at dimensions 128, 64, 32, 16, 8" in (tmp_path / "straight" / "checkpoint" / "README.md").read_text()
    # Validation stays at the full size, as in v2: before any step, the flag changes nothing in it.
    run_train(*common(data_dir, tmp_path), "--val-every", 0, "--stop-at", 1, "--out", tmp_path / "plain")
    val = lambda out: [r["val_loss"] for r in read_log(out) if "val_loss" in r][0]
    assert val(tmp_path / "straight") == val(tmp_path / "plain")


def test_presets():
    args = train.parse_args(["--size", "0.6b"])
    assert (args.lr, args.batch_size, args.max_len, args.epochs, args.warmup, args.schedule_world) == (1e-5, 512, 1024, 2, 500, 16)
    assert (train.parse_args(["--size", "1.7b"]).lr, train.parse_args(["--size", "4b"]).lr) == (9e-6, 8e-6)
    assert (args.in_batch_grad, train.parse_args(["--size", "4b"]).schedule_world) == (False, 32)
    with pytest.raises(SystemExit):
        train.parse_args(["--task-type", "imdb=ranking"])


def official_learning_rates(args, length, steps):
    """What the released runs did: transformers' cosine schedule over `length` per-GPU batches, stepped once per
    GPU per optimizer step by accelerate, and raised to min_lr after each step."""
    from transformers import get_scheduler
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=args.warmup, num_training_steps=length)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        for _ in range(args.schedule_world):
            scheduler.step()
        if optimizer.param_groups[0]["lr"] < args.min_lr:
            optimizer.param_groups[0]["lr"] = args.min_lr
    return rates


@pytest.mark.parametrize("size", ["0.6b", "4b"])
def test_learning_rate_is_the_released_runs(size):
    args = train.parse_args(["--size", size])  # schedule_world 16 and 32
    steps = 500
    length = args.schedule_world * steps - 5  # per-GPU batches; a bit short of W x steps, as the ceilings make it
    ours = [train.lr_at(step, args, length) for step in range(steps)]
    assert ours == pytest.approx(official_learning_rates(args, length, steps), rel=1e-12, abs=0)
    peak = math.ceil(500 / args.schedule_world)  # warmup ends after 32 (0.6b) or 16 (4b) optimizer steps
    assert ours[0] == 0 and ours[peak - 1] < args.lr and ours[peak] == pytest.approx(args.lr, rel=1e-3) and ours[-1] == args.min_lr


def test_a_runs_learning_rates_are_the_released_schedule(data_dir, tmp_path):
    # W = 16 on a 16-query batch: one row per GPU in the released run's terms, so the length is the rows trained.
    out = tmp_path / "run"
    run_train(*common(data_dir, tmp_path), "--out", out, "--schedule-world", 16, "--warmup", 100, "--val-every", 0, "--stop-at", 12)
    args = train.parse_args(["--schedule-world", "16", "--warmup", "100", "--batch-size", "16", "--epochs", "1"])
    length = sum(len(data.heldout_split(n)[0]) for n in (400, 200))
    logged = [r["lr"] for r in read_log(out) if "lr" in r]
    assert len(logged) == 12 and logged == pytest.approx(official_learning_rates(args, length, 12), rel=1e-12, abs=0)


def test_sigterm_checkpoints_the_finished_step(data_dir, tmp_path):
    # 50 epochs (1,800 steps): on any machine the signal arrives long before the run could end by itself.
    out, epochs = tmp_path / "run", ["--epochs", "50"]
    proc = subprocess.Popen([sys.executable, "train.py", *map(str, common(data_dir, tmp_path)), *epochs, "--out", str(out), "--val-every", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and not (log.exists() and sum('"loss"' in line for line in log.open()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=TIMEOUT)[0]
    assert proc.returncode == 0, output[-2000:]
    last = [json.loads(line)["step"] for line in log.open() if '"loss"' in line][-1]
    assert 2 <= last < 1800 and f"stopped after step {last}" in output
    assert checkpoint.load_state(out)["step"] == last
