"""How a program ends when something goes wrong, tried as a user meets it: an error in one line, Ctrl-C as a request
to checkpoint, a disk that fills during a save, a damaged training state, a tokenization killed half-way."""
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest
from conftest import ROOT, TIMEOUT, read_log, write_source

import checkpoint


def flags(data_dir, tmp_path, *extra):
    return ["--data", data_dir, "--batch-size", 16, "--chunk-size", 48, "--max-len", 32, "--epochs", 1, "--eval-tasks", "--val-every", 0,
            "--no-tensorboard", "--cache-dir", tmp_path / "cache", *extra]


def program(*args, env=None):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT,
                          env=dict(os.environ, **(env or {})))


# ---- one line ----------------------------------------------------------------------------------------------------

def test_an_error_a_user_can_cause_is_one_line_in_each_program(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "qa.jsonl").write_text('{"query": "q", "passage": "p"}\n{not json\n')
    (tmp_path / "task").mkdir()
    cases = [(["train.py", "--data", bad, "--out", tmp_path / "run", "--cache-dir", tmp_path / "cache"], "train.py: ", "qa.jsonl: line 2: not valid JSON"),
             (["eval.py", "--model", "tiny", "--tasks", tmp_path / "task", "--out", tmp_path / "res"], "eval.py: ", "task: no task.json"),
             (["mine.py", tmp_path / "none.csv", "--name", "x", "--instruction", "y", "--out", tmp_path / "data"], "mine.py: ", "none.csv: no such file")]
    for args, prefix, message in cases:
        done = program(*args)
        last = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 1 and last.startswith(prefix) and message in last, done.stderr[-2000:]
        assert "Traceback" not in done.stderr, done.stderr[-2000:]
    shown = program(*cases[2][0], env=dict(F2LLM_TRACEBACK="1"))  # for debugging: the traceback
    assert shown.returncode == 1 and "Traceback" in shown.stderr and "MineError" in shown.stderr


# ---- Ctrl-C ------------------------------------------------------------------------------------------------------

def start(args, log):
    """train.py (or a script) in a process whose SIGINT is not ignored (a background job's would be), as at a terminal."""
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and not (log.exists() and sum('"loss"' in line for line in log.open()) >= 2):
        time.sleep(0.2)
    return proc


@contextmanager
def killed_after(proc, seconds=TIMEOUT):
    """While the test waits for a line: a stall kills the process, so its output ends and the test fails, not hangs."""
    timer = threading.Timer(seconds, proc.kill)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def test_ctrl_c_finishes_the_step_and_checkpoints_it(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = start(["train.py", *flags(data_dir, tmp_path, "--epochs", 50, "--out", out)], out / "log.jsonl")  # 600 steps: it never ends first
    proc.send_signal(signal.SIGINT)
    output = proc.communicate(timeout=TIMEOUT)[0]
    assert proc.returncode == 128 + signal.SIGINT, output[-2000:]  # what a shell expects of an interrupted program
    last = [r["step"] for r in read_log(out) if "loss" in r][-1]
    assert "Ctrl-C: finishing this step" in output and f"stopped after step {last}" in output and "Traceback" not in output
    assert checkpoint.load_state(out)["step"] == last and 2 <= last < 600


SLOW_SAVE = """import sys, time
import checkpoint, launch, train
save = checkpoint.save
def slow(*a, **k):  # a save that takes long: the second Ctrl-C arrives during it
    print("saving", flush=True)
    for _ in range(6000):  # short sleeps: a signal that lands before a sleep starts is handled at the next one, not in 600 s
        time.sleep(0.1)
    save(*a, **k)
checkpoint.save = slow
launch.run(lambda: train.main(sys.argv[1:]))
"""


def test_a_second_ctrl_c_stops_at_once(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = start(["-c", SLOW_SAVE, *flags(data_dir, tmp_path, "--epochs", 50, "--out", out)], out / "log.jsonl")
    proc.send_signal(signal.SIGINT)
    lines = []
    with killed_after(proc):
        for line in proc.stdout:  # the first one is taken: the step finishes, then the (slow) save starts
            lines.append(line)
            if line.startswith("saving"):
                break
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    output = "".join(lines) + proc.communicate(timeout=TIMEOUT)[0]
    assert time.time() - sent < 60 and proc.returncode == 128 + signal.SIGINT, output[-2000:]
    assert output.strip().splitlines()[-1] == "-c: stopped at once by a second Ctrl-C; --resume continues from the last checkpoint", output[-2000:]
    assert "Traceback" not in output and not list(out.glob("state*"))  # nothing half-written


# ---- a full disk ---------------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 420 MB filesystem: room for the tiny model's first save (a 240 MB training state and its 80 MB model folder),
    not for the second state beside it."""
    folder = tmp_path / "small"
    folder.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=420m", "tmpfs", str(folder)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here (mount -t tmpfs: {made.stderr.strip() or made.returncode}); needs root")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_during_a_save_is_one_line_and_loses_nothing(data_dir, tmp_path, small_disk):
    out = small_disk / "run"
    done = program("train.py", *flags(data_dir, tmp_path, "--out", out, "--save-every", 2, "--stop-at", 6))
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert last.startswith(f"train.py: saving step 4: writing {out}/state-00000004.pt failed: the disk is full (it needs about ") and \
        last.endswith("MiB are free); the state of step 2 is intact and --resume continues from it"), last
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoint", "log.jsonl", "state-00000002.pt", "state.json"]  # no part left
    assert checkpoint.load_state(out)["step"] == 2
    moved = tmp_path / "moved"  # on a disk with room, the run goes on from there
    subprocess.run(["cp", "-r", str(out), str(moved)], check=True)
    resumed = program("train.py", *flags(data_dir, tmp_path, "--out", moved, "--save-every", 2, "--stop-at", 6, "--resume"))
    assert resumed.returncode == 0 and "at step 2" in resumed.stdout, resumed.stderr[-2000:]
    assert [r["step"] for r in read_log(moved) if "loss" in r] == [1, 2, 3, 4, 5, 6]


# ---- a damaged training state --------------------------------------------------------------------------------------

def test_a_damaged_newest_state_is_named_and_resume_falls_back_to_the_one_before(data_dir, tmp_path):
    out = tmp_path / "run"
    assert program("train.py", *flags(data_dir, tmp_path, "--out", out, "--save-every", 2, "--stop-at", 4)).returncode == 0
    assert [s["step"] for s in checkpoint.states(out)] == [2, 4]  # --keep 2: the newest and the one before
    losses = lambda: [(r["step"], r["loss"]) for r in read_log(out) if "loss" in r]
    first = losses()
    newest = out / "state-00000004.pt"
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte, which torch.load reads without noticing
    newest.write_bytes(raw)
    done = program("train.py", *flags(data_dir, tmp_path, "--out", out, "--save-every", 2, "--stop-at", 6, "--resume"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{newest} is damaged (its bytes are not those written); falling back to the state before it" in done.stdout
    assert f"resumed from {out}/state-00000002.pt at step 2" in done.stdout
    assert losses()[:4] == first and len(losses()) == 6  # steps 3 and 4 trained again, as they were the first time
    assert [s["step"] for s in checkpoint.states(out)] == [4, 6] and checkpoint.load_state(out)["step"] == 6


# ---- a tokenization killed half-way --------------------------------------------------------------------------------

BLOCKED_TOKENIZATION = """import functools, sys, time
import builtin, data, model
def tokenize(tokenizer, texts, max_len):
    print("tokenizing", flush=True)
    time.sleep(600)
data.load_source(sys.argv[1], "retrieval", functools.partial(tokenize, builtin.qwen3_tokenizer(), max_len=32), sys.argv[2])
"""


def test_a_killed_tokenization_leaves_nothing_that_the_next_run_keeps(data_dir, tmp_path, tokenizer):
    import functools

    import data
    import model as f2llm_model
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", BLOCKED_TOKENIZATION, str(data_dir / "qa.jsonl"), str(cache)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    with killed_after(proc):
        assert proc.stdout.readline().startswith("tokenizing")
    proc.kill()
    proc.wait()
    left = [p for p in cache.iterdir() if ".tmp-" in p.name]
    assert len(left) == 1 and left[0].name.endswith(f"-{proc.pid}")
    alive = subprocess.Popen(["sleep", "600"])  # a folder whose process still runs is someone's work in progress
    busy = cache / left[0].name.replace(f"-{proc.pid}", f"-{alive.pid}")
    busy.mkdir()
    try:
        source = data.load_source(str(data_dir / "qa.jsonl"), "retrieval", functools.partial(f2llm_model.tokenize, tokenizer, max_len=32), str(cache))
        assert not left[0].exists() and busy.exists() and len(source.query) == 120
    finally:
        alive.kill()
