"""F2LLM's training data: one file per source, checked, tokenized once, batched one source per step.

Format of the released data (`codefuse-ai/F2LLM`): one parquet file per source with columns `query`,
`passage`, `negative_1` .. `negative_n` (jsonl with the same keys works too). The file name is the source
name and decides its task type:
    retrieval       hard negatives + in-batch negatives, 7 of the stored negatives sampled per query
    clustering      hard negatives only (in-batch texts often share the label), 7 sampled
    classification  hard negatives only, 1 (the other label name)
Every global step draws all its queries from one source, picked as the official loop picks it; all ranks take
disjoint shards of the same global batch, which is the same on any number of ranks (`Batches`).
"""
import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

# Source names from the official training code (utils.py); they decide the task type.
CLASSIFICATION = {"amazon_counterfactual", "amazon_polarity", "imdb", "toxic_conversations", "cola"}
CLUSTERING = {"amazon_reviews", "banking77", "emotion", "mtop_intent", "mtop_domain", "massive_scenario",
              "massive_intent", "tweet_sentiment_extraction", "twentynewsgroups",
              *(f"{site}_clustering_{kind}" for site in ("arxiv", "biorxiv", "medrxiv", "reddit", "stackexchange")
                for kind in ("p2p", "s2s"))}
RETRIEVAL = {"arguana", "snli", "mnli", "anli", "paq", "squad", "stackexchange", "msmarco", "natural_questions", "hotpotqa",
             "fever", "eli5", "fiqa", "bioasq", "nfcorpus", "miracl", "mrtidy", "scifact", "qqp", "stackoverflowdupquestions",
             "sts12", "sts22", "stsbenchmark", "amazon_qa", "cnn_dm", "coliee", "paq_part2", "pubmedqa", "s2orc_abstract_citation",
             "s2orc_title_abstract", "s2orc_title_citation", "sentence_compression", "specter", "triviaqa", "xsum",
             "stackexchange_part2", "stackexchangedupquestions_s2s", "stackexchangedupquestions_p2p"}
BUILTIN = {"stdlib_code_retrieval": "retrieval", "stdlib_code_clustering": "clustering"}  # our built-in sources, below
NEGATIVES = {"retrieval": 7, "clustering": 7, "classification": 1}  # sampled per query per step
TASK_TYPES = tuple(NEGATIVES)


class DataError(ValueError):
    pass


def task_type(source, overrides=None):
    """The type a source trains as. A name in none of the lists is retrieval here (see `unlisted`)."""
    if overrides and source in overrides:
        return overrides[source]
    if source in BUILTIN:
        return BUILTIN[source]
    return "classification" if source in CLASSIFICATION else "clustering" if source in CLUSTERING else "retrieval"


def unlisted(names, overrides=None):
    """Sources in none of the official lists and not typed by --task-type. We train them as retrieval; the
    official code gives its in-batch term to listed retrieval names only, so it trained them with hard negatives
    alone (as clustering)."""
    return [n for n in names if n not in {*CLASSIFICATION, *CLUSTERING, *RETRIEVAL, *BUILTIN, *(overrides or {})}]


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


def heldout_split(n, train_size=0.99, seed=0):
    """(train rows, held-out rows) of a source of n rows: the indices of the official code's
    `Dataset.train_test_split(train_size=0.99, shuffle=True, seed=0)` (datasets keeps floor(0.99 n) rows for
    training and holds out the first n - floor(0.99 n) of a seeded permutation). A source of one row, which
    datasets refuses to split, is trained on whole."""
    if n < 2:
        return np.arange(n), np.arange(0)
    n_test = n - math.floor(train_size * n)
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_test:], perm[:n_test]


class Batches:
    """Step -> this rank's share of the global batch, as the official loop forms it. Stateless given the step,
    so resuming needs only the step number, and the global batch does not depend on the number of ranks.

    - Every row, every epoch: a source's rows are shuffled each epoch and cut into global batches; the last one
      is filled by wrapping around to the epoch's first rows, as accelerate's sharded loaders do (even_batches),
      so a source smaller than a batch is still trained.
    - Which source, each step: the official MultiLoader, i.e. random.Random(epoch).choices over the sources with
      weights fixed to each source's number of batches; a draw that finds its source used up removes it and
      makes no step.
    - Which negatives: one draw of `n` slots among the stored negative columns per step, the same slots for every
      row of the global batch, as the official collate's random.sample(range(24), 7); classification takes
      negative_1. Seeded by the step (the official code draws from one global stream).
    """

    def __init__(self, sources, global_batch, world=1, rank=0, seed=0):
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by {world} ranks")
        self.sources, self.G, self.B, self.rank, self.world, self.seed = sources, global_batch, global_batch // world, rank, world, seed
        self.train, self.val = zip(*(heldout_split(len(s.query)) for s in sources))
        self.n_batches = [math.ceil(len(t) / self.G) for t in self.train]
        self.steps_per_epoch = sum(self.n_batches)
        if self.steps_per_epoch == 0:
            raise DataError("no source has a training row")
        self._epoch = None

    def plan(self, epoch):
        """(source, batch k) for every step of the epoch, and each source's row order for that epoch."""
        if self._epoch != epoch:
            rng, names, weights = random.Random(epoch), [s for s, n in enumerate(self.n_batches) if n], [n for n in self.n_batches if n]
            taken, self._plan = [0] * len(self.sources), []
            while names:  # the official MultiLoader.__iter__
                s = rng.choices(names, weights=weights)[0]
                if taken[s] == self.n_batches[s]:  # drawn empty: removed, no step
                    weights.pop(names.index(s))
                    names.remove(s)
                    continue
                self._plan.append((s, taken[s]))
                taken[s] += 1
            self._order = [t[np.random.default_rng([self.seed, epoch, s]).permutation(len(t))] for s, t in enumerate(self.train)]
            self._epoch = epoch
        return self._plan, self._order

    def __call__(self, step):
        plan, order = self.plan(step // self.steps_per_epoch)
        s, k = plan[step % self.steps_per_epoch]
        return self._batch(s, wrap(order[s], k, self.G), random.Random(f"{self.seed}/{step}"))

    def validation(self):
        """Every held-out row in global batches (the last one wrapped around, as the official validation loaders
        are sharded), the same on any number of ranks."""
        return [self._batch(s, wrap(rows, k, self.G), random.Random(f"{self.seed}/val/{s}/{k}"))
                for s, rows in enumerate(self.val) for k in range(math.ceil(len(rows) / self.G))]

    def _batch(self, s, rows, rng):
        src, n = self.sources[s], NEGATIVES[self.sources[s].kind]
        slots = [0] if src.kind == "classification" else rng.sample(range(src.negatives.shape[1]), n)
        picked = src.negatives[rows][:, slots]
        for i in np.flatnonzero((picked < 0).any(1)):  # a missing negative: the row's next stored ones take its place
            stored = src.negatives[rows[i]]
            spare = [t for j, t in enumerate(stored) if t >= 0 and j not in slots]
            picked[i] = [t if t >= 0 else spare.pop(0) for t in picked[i]]
        mine = slice(self.rank * self.B, (self.rank + 1) * self.B)
        seqs = [src.text(t) for t in src.query[rows[mine]]]
        for p, ns in zip(src.passage[rows[mine]], picked[mine]):
            seqs += [src.text(p)] + [src.text(t) for t in ns]
        return dict(seqs=seqs, n_queries=self.B, n_negatives=n, in_batch=src.kind == "retrieval", source=src.name, rows=rows[mine])


def wrap(rows, k, size):
    """Batch k of `size` rows, continuing from the first rows where `rows` runs out."""
    return rows[(k * size + np.arange(size)) % len(rows)]
