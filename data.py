"""F2LLM's training data: one file per source, checked, tokenized once, batched one source per step.

Format of the released data (`codefuse-ai/F2LLM`): one parquet file per source with columns `query`,
`passage`, `negative_1` .. `negative_n` (jsonl with the same keys works too). The file name is the source
name and decides its task type:
    retrieval       hard negatives + in-batch negatives, 7 of the stored negatives sampled per query
    clustering      hard negatives only (in-batch texts often share the label), 7 sampled
    classification  hard negatives only, 1 (the other label name)
Every global step draws all its queries from one source: all ranks pick the same source from the same
seeded plan and take disjoint shards of it. A source's chance to be picked is proportional to the batches it
has left, so an epoch is a random shuffle of all sources' batches, ending when every source is used up.
"""
import ast
import hashlib
import json
import os
import random
import shutil
import sysconfig
import zlib
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

# Source names from the official training code; everything else is retrieval.
CLASSIFICATION = {"amazon_counterfactual", "amazon_polarity", "imdb", "toxic_conversations", "cola"}
CLUSTERING = {"amazon_reviews", "banking77", "emotion", "mtop_intent", "mtop_domain", "massive_scenario",
              "massive_intent", "tweet_sentiment_extraction", "twentynewsgroups",
              *(f"{site}_clustering_{kind}" for site in ("arxiv", "biorxiv", "medrxiv", "reddit", "stackexchange")
                for kind in ("p2p", "s2s")),
              "stdlib_code_clustering"}  # our built-in source below
NEGATIVES = {"retrieval": 7, "clustering": 7, "classification": 1}  # sampled per query per step
TASK_TYPES = tuple(NEGATIVES)
HOLDOUT = 0.01  # 1% of each source is held out for validation loss, split with seed 0


class DataError(ValueError):
    pass


def task_type(source, overrides=None):
    if overrides and source in overrides:
        return overrides[source]
    return "classification" if source in CLASSIFICATION else "clustering" if source in CLUSTERING else "retrieval"


def find_files(data):
    """A folder of .parquet/.jsonl files, or a hub dataset id downloaded to a local folder first."""
    if not os.path.isdir(data):
        if os.path.exists(data) or data.count("/") != 1:
            raise DataError(f"{data}: not a folder of F2LLM files, nor a hub dataset id like codefuse-ai/F2LLM")
        from huggingface_hub import snapshot_download
        data = snapshot_download(data, repo_type="dataset", allow_patterns=["*.parquet", "*.jsonl"])
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(data) for f in fs if f.endswith((".parquet", ".jsonl")))
    if not files:
        raise DataError(f"{data}: no .parquet or .jsonl files")
    names = [source_name(f) for f in files]
    if len(set(names)) != len(names):
        raise DataError(f"{data}: two files share a source name: {sorted(n for n in names if names.count(n) > 1)}")
    return files


def source_name(path):
    return os.path.basename(path).rsplit(".", 1)[0]


def read_columns(path):
    """{column: list of values}. Parquet through pyarrow; jsonl line by line with line numbers in errors."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pydict()
    columns = None
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {i + 1}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {i + 1}: expected a JSON object")
            if columns is None:
                columns = {k: [] for k in row}
            if row.keys() != columns.keys():
                raise DataError(f"{path}: line {i + 1}: keys {sorted(row)} differ from the first row's {sorted(columns)}")
            for k, v in row.items():
                columns[k].append(v)
    return columns or {}


def check(path, columns, kind):
    """Validate layout and every row; returns the number of negative columns. Errors name file, row, field."""
    n_rows = len(next(iter(columns.values()), []))
    if n_rows == 0:
        raise DataError(f"{path}: empty file")
    negatives = sorted((c for c in columns if c.startswith("negative_")), key=lambda c: int(c[9:]) if c[9:].isdigit() else -1)
    expected = ["query", "passage"] + [f"negative_{i}" for i in range(1, len(negatives) + 1)]
    if sorted(columns) != sorted(expected):
        raise DataError(f"{path}: unknown column layout {sorted(columns)}; expected query, passage, negative_1 .. negative_n")
    need = NEGATIVES[kind]
    if len(negatives) < need:
        raise DataError(f"{path}: {len(negatives)} negative columns, a {kind} source needs at least {need}")
    for name in expected:
        for i, value in enumerate(columns[name]):
            if value is None and name.startswith("negative_"):
                continue  # a missing negative is allowed as long as enough remain (checked below)
            if not isinstance(value, str):
                raise DataError(f"{path}: row {i}: field {name!r} is {type(value).__name__}, expected a string")
            if not value.strip():
                raise DataError(f"{path}: row {i}: field {name!r} is empty")
    for i in range(n_rows):
        have = sum(columns[c][i] is not None for c in expected[2:])
        if have < need:
            raise DataError(f"{path}: row {i}: {have} negatives, a {kind} source needs {need}")
    return len(negatives)


@dataclass
class Source:
    """One tokenized source: texts are deduplicated; rows point into them (-1 = missing negative)."""
    name: str
    kind: str
    tokens: np.ndarray     # all token ids, concatenated (memory-mapped)
    offsets: np.ndarray    # text t is tokens[offsets[t]:offsets[t + 1]]
    query: np.ndarray      # [N] text index
    passage: np.ndarray    # [N] text index
    negatives: np.ndarray  # [N, n] text index or -1

    def text(self, t):
        return self.tokens[self.offsets[t]:self.offsets[t + 1]].tolist()


def load_source(path, tokenizer, max_len, cache_dir, kind, tokenize, progress=True):
    """Check and tokenize a file once; later runs (and other ranks) read the cache written atomically."""
    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{tokenizer.name_or_path}|{len(tokenizer)}|{tokenizer.eos_token_id}|{max_len}"
    folder = os.path.join(cache_dir, f"{source_name(path)}-{hashlib.sha1(key.encode()).hexdigest()[:12]}")
    if not os.path.exists(os.path.join(folder, "rows.npz")):
        columns = read_columns(path)
        n_neg = check(path, columns, kind)
        index, texts = {}, []
        def ids(values):
            out = []
            for v in values:
                if v is None:
                    out.append(-1)
                    continue
                if v not in index:
                    index[v] = len(texts)
                    texts.append(v)
                out.append(index[v])
            return np.array(out, dtype=np.int64)
        query, passage = ids(columns["query"]), ids(columns["passage"])
        negatives = np.stack([ids(columns[f"negative_{i}"]) for i in range(1, n_neg + 1)], 1)
        pieces = []
        for start in tqdm(range(0, len(texts), 4096), desc=f"tokenize {source_name(path)}", disable=not progress):
            pieces += tokenize(tokenizer, texts[start:start + 4096], max_len)
        offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(p) for p in pieces])
        tmp = f"{folder}.tmp{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        np.save(os.path.join(tmp, "tokens.npy"), np.fromiter((t for p in pieces for t in p), dtype=np.int32, count=offsets[-1]))
        np.savez(os.path.join(tmp, "rows.npz"), offsets=offsets, query=query, passage=passage, negatives=negatives)
        try:
            os.rename(tmp, folder)
        except OSError:  # another rank finished first: same content
            shutil.rmtree(tmp, ignore_errors=True)
    rows = np.load(os.path.join(folder, "rows.npz"))
    return Source(source_name(path), kind, np.load(os.path.join(folder, "tokens.npy"), mmap_mode="r"),
                  rows["offsets"], rows["query"], rows["passage"], rows["negatives"])


def load_sources(data, tokenizer, max_len, cache_dir, tokenize, overrides=None, progress=True):
    """Every source of a folder (or hub id), typed by name, checked and tokenized (cached)."""
    return [load_source(f, tokenizer, max_len, cache_dir, task_type(source_name(f), overrides), tokenize, progress)
            for f in find_files(data)]


class Batches:
    """Step -> this rank's batch. Stateless given the step, so resuming needs only the step number."""

    def __init__(self, sources, global_batch, world=1, rank=0, seed=0):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} ranks")
        self.sources, self.G, self.B, self.rank, self.seed = sources, global_batch, global_batch // world, rank, seed
        self.world = world
        self.train, self.val = [], []
        for s in sources:
            perm = np.random.default_rng(0).permutation(len(s.query))
            n_val = max(1, int(len(perm) * HOLDOUT)) if len(perm) > 1 else 0
            self.val.append(perm[:n_val])
            self.train.append(perm[n_val:])
        self.n_batches = [len(t) // self.G for t in self.train]
        self.steps_per_epoch = sum(self.n_batches)
        if self.steps_per_epoch == 0:
            raise DataError(f"no source has a full global batch of {self.G} rows")
        self._epoch = None

    def plan(self, epoch):
        """(source, batch k) for every step of the epoch, and each source's row order for that epoch."""
        if self._epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            plan = [(s, k) for s, n in enumerate(self.n_batches) for k in range(n)]
            self._plan = [plan[i] for i in rng.permutation(len(plan))]
            self._order = [t[rng.permutation(len(t))] for t in self.train]
            self._epoch = epoch
        return self._plan, self._order

    def __call__(self, step):
        plan, order = self.plan(step // self.steps_per_epoch)
        s, k = plan[step % self.steps_per_epoch]
        rows = order[s][k * self.G:(k + 1) * self.G]
        return self._batch(s, rows, np.random.default_rng([self.seed, step, 1]))

    def validation(self):
        """Fixed held-out batches of up to the global batch size, the same on any number of ranks: where the
        world does not divide a batch, it is padded with repeats of its last row, and `n_real` counts the rows."""
        out = []
        for s, rows in enumerate(self.val):
            size = min(self.G, len(rows))
            for k in range(len(rows) // size if size else 0):
                out.append(self._batch(s, rows[k * size:(k + 1) * size], np.random.default_rng([self.seed, k, 2])))
        return out

    def _batch(self, s, rows, rng):
        src, n_real, n = self.sources[s], len(rows), NEGATIVES[self.sources[s].kind]
        # Sample n of each row's stored negatives for the whole global batch, then keep this rank's shard:
        # the global batch is the same on any number of ranks.
        negs = src.negatives[rows]
        keys = np.where(negs >= 0, rng.random(negs.shape), np.inf)
        picked = np.take_along_axis(negs, np.argsort(keys, 1)[:, :n], 1)
        pad = -n_real % self.world  # validation only: training batches divide evenly
        rows, picked = np.concatenate([rows, np.repeat(rows[-1:], pad)]), np.concatenate([picked, np.repeat(picked[-1:], pad, 0)])
        B = len(rows) // self.world
        mine = slice(self.rank * B, (self.rank + 1) * B)
        seqs = [src.text(t) for t in src.query[rows[mine]]]
        for p, ns in zip(src.passage[rows[mine]], picked[mine]):
            seqs += [src.text(p)] + [src.text(t) for t in ns]
        return dict(seqs=seqs, n_queries=B, n_negatives=n, in_batch=src.kind == "retrieval", source=src.name, rows=rows[mine],
                    n_real=n_real)


# ---- Built-in data: the installed Python standard library, written in the F2LLM format ------------------

RETRIEVAL_INSTRUCTION = "Given a description of a Python function or class, retrieve its code"
CLUSTERING_INSTRUCTION = "Identify the Python standard-library module that the given code belongs to"
SKIP_MODULES = {"test", "idlelib", "lib2to3", "site-packages", "ensurepip", "turtledemo", "tkinter", "pydoc_data", "venv"}


def stdlib_functions():
    """Documented public top-level functions and classes of the standard library: module, summary, code."""
    root, out = sysconfig.get_paths()["stdlib"], []
    for name in sorted(os.listdir(root)):
        path, module = os.path.join(root, name), name.removesuffix(".py")
        if module.startswith("_") or module in SKIP_MODULES:
            continue
        if name.endswith(".py"):
            files = [path]
        elif os.path.isfile(os.path.join(path, "__init__.py")):
            files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) if "test" not in d for f in fs if f.endswith(".py"))
        else:
            continue
        for file in files:
            try:
                tree = ast.parse(open(file, encoding="utf-8").read())
            except (SyntaxError, UnicodeDecodeError):
                continue
            for node in tree.body:
                doc = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and ast.get_docstring(node)
                if not doc or node.name.startswith("_"):
                    continue
                summary = " ".join(doc.split("\n\n")[0].split())
                node.body = node.body[1:] or [ast.Pass()]  # the code without its docstring
                # Long classes are cut: a few thousand characters is more than a training sequence holds anyway.
                out.append(dict(module=module, name=node.name, summary=summary, code=ast.unparse(node)[:4000]))
    return out


def heldout(module, name=None):
    """Kept out of training, for evaluation, by a hash that is stable across Python versions: about one module in
    five (`heldout(module)`), and one function or class in five of the other modules (`heldout(module, name)`)."""
    return zlib.crc32(module.encode() if name is None else f"{module}.{name}".encode()) % 5 == 0


def write_jsonl(path, rows):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def write_builtin_data(folder, n_negatives=24):
    """Training sources from the code not held out: docstring summary -> code, and code -> module."""
    if all(os.path.exists(os.path.join(folder, f"{n}.jsonl")) for n in ("stdlib_code_retrieval", "stdlib_code_clustering")):
        return folder
    os.makedirs(folder, exist_ok=True)
    funcs = [f for f in stdlib_functions() if not heldout(f["module"]) and not heldout(f["module"], f["name"])]
    by_module = {}
    for i, f in enumerate(funcs):
        by_module.setdefault(f["module"], []).append(i)
    rng = random.Random(0)
    negative_columns = lambda texts: {f"negative_{j + 1}": t for j, t in enumerate(texts)}
    retrieval, clustering = [], []
    for i, f in enumerate(funcs):
        # Hard negatives: other code of the same module first, topped up with code from other modules.
        same = [j for j in by_module[f["module"]] if j != i]
        rng.shuffle(same)
        while len(same) < n_negatives:
            j = rng.randrange(len(funcs))
            if funcs[j]["module"] != f["module"] and j not in same:
                same.append(j)
        retrieval.append(dict(query=f"Instruct: {RETRIEVAL_INSTRUCTION}\nQuery: {f['summary']}", passage=f["code"],
                              **negative_columns(funcs[j]["code"] for j in same[:n_negatives])))
        if len(by_module[f["module"]]) > 1:
            positive = rng.choice([j for j in by_module[f["module"]] if j != i])
            others = set()
            while len(others) < n_negatives:
                j = rng.randrange(len(funcs))
                if funcs[j]["module"] != f["module"]:
                    others.add(j)
            clustering.append(dict(query=f"Instruct: {CLUSTERING_INSTRUCTION}\nQuery: {f['code']}", passage=funcs[positive]["code"],
                                   **negative_columns(funcs[j]["code"] for j in sorted(others))))
    write_jsonl(os.path.join(folder, "stdlib_code_retrieval.jsonl"), retrieval)
    write_jsonl(os.path.join(folder, "stdlib_code_clustering.jsonl"), clustering)
    return folder
