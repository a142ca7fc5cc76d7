import json
import os
import random
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import loss as f2llm_loss  # noqa: E402
import model as f2llm_model  # noqa: E402
import speed  # noqa: E402

WORDS = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "su", "ta", "vo", "ze") for b in ("rin", "dal", "pok", "mus", "tef", "gar")]


def write_source(path, n_rows, n_negatives, seed=0):
    """A learnable F2LLM file: the passage repeats the query's topic words; negatives are other topics."""
    rng = random.Random(seed)
    topics = [rng.sample(WORDS, 3) for _ in range(n_rows)]
    text = lambda t: " ".join(rng.sample(t, 3) + rng.sample(WORDS, 2))
    with open(path, "w") as f:
        for i, t in enumerate(topics):
            negs = [text(topics[(i + 1 + rng.randrange(n_rows - 1)) % n_rows]) for _ in range(n_negatives)]
            row = dict(query=f"Instruct: find the note\nQuery: {' '.join(t)}", passage=text(t))
            row.update({f"negative_{j + 1}": x for j, x in enumerate(negs)})
            f.write(json.dumps(row) + "\n")
    return path


def two_sources(folder, retrieval_rows, clustering_rows):
    """A retrieval source in no official list (qa) and a clustering one (banking77)."""
    write_source(folder / "qa.jsonl", retrieval_rows, 8, seed=1)
    write_source(folder / "banking77.jsonl", clustering_rows, 8, seed=2)
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """12 steps of 16 queries an epoch."""
    return two_sources(tmp_path_factory.mktemp("data"), 120, 60)


@pytest.fixture(scope="session")
def tiny():
    return f2llm_model.load("tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny):
    return tiny[1]


# Generous limits: a loaded 2-core CI machine can be several times slower than a quiet one, and a limit only
# needs to tell a hang from slow progress.
TIMEOUT = 900


def torchrun(script, *args, nproc=2, timeout=TIMEOUT, check=True, monitor_interval=None):
    """`torchrun --standalone` (a free port, a local rendezvous); with check=False the finished process is returned.
    monitor_interval: seconds between torchrun's looks at its workers (its default 0.1)."""
    launcher = [f"--monitor-interval={monitor_interval}"] if monitor_interval else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", *launcher, f"--nproc_per_node={nproc}", script, *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if not check:
        return done
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def torchrun_nodes(script, *args, nodes=2, timeout=TIMEOUT):
    """`nodes` torchrun agents of one process each, meeting at a c10d rendezvous on this machine: a multi-node job."""
    endpoint = f"localhost:{free_port()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", "--nproc_per_node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint={endpoint}", "--rdzv-id=test", script, *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    logs = [tempfile.TemporaryFile("w+") for _ in range(nodes)]  # not pipes: one read after another could fill the other's
    agents = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True) for log in logs]
    for agent in agents:
        agent.wait(timeout=timeout)
    outputs = [log.seek(0) or log.read() for log in logs]
    assert all(a.returncode == 0 for a in agents), "\n".join(o[-3000:] for o in outputs)
    return outputs


def run_train(*args, timeout=TIMEOUT):
    done = subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def make_batch(tokenizer, n_queries, n_negatives, in_batch, seed=0):
    """Random token sequences of varied lengths laid out as the loss expects: queries, then groups."""
    import torch
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 40, (n_queries * (2 + n_negatives),), generator=g).tolist()
    seqs = [torch.randint(0, 150_000, (k - 1,), generator=g).tolist() + [tokenizer.eos_token_id] for k in lengths]
    return dict(seqs=seqs, n_queries=n_queries, n_negatives=n_negatives, in_batch=in_batch)


def by_length(chunk_size):
    """Chunks of chunk_size sequences, grouped by length (train.py --chunk-size)."""
    return lambda seqs: speed.chunk_by_length(seqs, chunk_size)


def by_tokens(chunk_tokens, padded=False):
    """Chunks of chunk_tokens tokens (train.py --chunk-tokens, --padded)."""
    return lambda seqs: speed.chunk_by_tokens(seqs, chunk_tokens, padded=padded)


def objective_of(kind):
    """The loss of a test case: retrieval (the released in-batch term), retrieval-grad (--in-batch-grad), clustering (no
    in-batch term), matryoshka and matryoshka-grad (retrieval and retrieval-grad with --matryoshka, the tiny model's
    dimensions 128 down to 8)."""
    dims = f2llm_loss.matryoshka_dims(128) if kind.startswith("matryoshka") else ()
    return kind != "clustering", f2llm_loss.Objective(in_batch_grad=kind.endswith("-grad"), dims=dims)


def shard(batch, rank, world):
    """This rank's queries and their groups of the global batch."""
    B, group = batch["n_queries"] // world, 1 + batch["n_negatives"]
    queries = batch["seqs"][rank * B:(rank + 1) * B]
    docs = batch["seqs"][batch["n_queries"]:][rank * B * group:(rank + 1) * B * group]
    return dict(batch, seqs=queries + docs, n_queries=B)


def uncached_step(model, batch, collate, in_batch_grad=False, dims=()):
    """The plain reference: every sequence through autograd at once."""
    emb = model(*collate(batch["seqs"]))
    loss = f2llm_loss.f2llm_loss(*f2llm_loss.split_embeddings(emb, batch["n_queries"], batch["n_negatives"]), batch["in_batch"],
                                 f2llm_loss.Objective(in_batch_grad=in_batch_grad, dims=dims))[0]
    loss.backward()
    return loss.detach()


def write_retrieval_task(folder, qrels_lines):
    (folder / "qrels").mkdir(parents=True)
    (folder / "task.json").write_text(json.dumps(dict(type="retrieval", instruction="Find the matching function")))
    (folder / "corpus.jsonl").write_text("".join(json.dumps(dict(_id=f"d{i}", title="", text=t)) + "\n"
                                                 for i, t in enumerate(["def add(a, b): return a + b", "def read(path): return open(path).read()", "class Stack: pass"])))
    (folder / "queries.jsonl").write_text("".join(json.dumps(dict(_id=f"q{i}", text=t)) + "\n" for i, t in enumerate(["add two numbers", "read a file"])))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels_lines)
    return folder
