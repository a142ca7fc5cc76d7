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
    if source in CLASSIFICATION or source.endswith("_classification"):  # the suffix: how mine.py names its files
        return "classification"
    return "clustering" if source in CLUSTERING or source.endswith("_clustering") else "retrieval"


def unlisted(names, overrides=None):
    """Sources in none of the official lists and not typed by --task-type. We train them as retrieval; the
    official code gives its in-batch term to listed retrieval names only, so it trained them with hard negatives
    alone (as clustering)."""
    return [n for n in names if n not in {*CLASSIFICATION, *CLUSTERING, *RETRIEVAL, *BUILTIN, *(overrides or {})}
            and not n.endswith(("_classification", "_clustering"))]


def find_files(data):
    """A folder of .parquet/.jsonl files, or a hub dataset id (owner/name), downloaded to a local folder first."""
    if not os.path.isdir(data):
        parts = data.split("/")
        if os.path.exists(data) or len(parts) != 2 or data.startswith((".", "~")) or os.path.isdir(parts[0]) or not all(parts):
            raise DataError(f"{data}: no such folder of F2LLM files (a hub dataset id looks like codefuse-ai/F2LLM)")
        from huggingface_hub import snapshot_download
        try:
            data = snapshot_download(data, repo_type="dataset", allow_patterns=["*.parquet", "*.jsonl"])
        except Exception as e:
            raise DataError(f"{data}: not a local folder, and the hub dataset could not be fetched ({type(e).__name__}: {e})") from None
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(data) for f in fs if f.endswith((".parquet", ".jsonl")))
    if not files:
        raise DataError(f"{data}: no .parquet or .jsonl files")
    names = [source_name(f) for f in files]
    if len(set(names)) != len(names):
        raise DataError(f"{data}: two files share a source name: {sorted(n for n in names if names.count(n) > 1)}")
    return files


def source_name(path):
    return os.path.basename(path).rsplit(".", 1)[0]


def digest(path):
    """Content hash of a file (blake2b, streamed): what identifies a data file, whatever its name or date."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def tokenizer_digest(tokenizer):
    """Identifies a tokenizer by its vocabulary, rules and special ids, not by the truncation state that calls leave in
    it (cleared here; every call of ours sets its own)."""
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    text = backend.to_str() + f"|{tokenizer.eos_token_id}|{tokenizer.pad_token_id}"
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def json_lines(path, error=None):
    """(line number, object) for each non-blank line of a jsonl file; a line that is not UTF-8, not JSON or not an
    object raises `error` (DataError by default) naming the file and the line."""
    error = error or DataError
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{path}: line {n}: not UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}: line {n}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise error(f"{path}: line {n}: expected a JSON object")
            yield n, row


def check_jsonl(path):
    """A streaming pass over a jsonl file before datasets reads it (datasets would turn a number into a string and
    read bytes that are not UTF-8): every line an object with the first line's keys, text values only."""
    keys = None
    for n, row in json_lines(path):
        keys = keys or row.keys()
        if row.keys() != keys:
            raise DataError(f"{path}: line {n}: keys {sorted(row)} differ from the first row's {sorted(keys)}")
        for k, v in row.items():
            if not isinstance(v, str) and not (v is None and k.startswith("negative_")):
                raise DataError(f"{path}: line {n}: field {k!r} is {type(v).__name__}, expected a string")
    if keys is None:
        raise DataError(f"{path}: empty file")


def read_rows(path, cache_dir):
    """The file as a memory-mapped Arrow table, read by `datasets` (one dataset per file: a folder read as one would
    merge every source's schema and lose the source name, which decides the task type)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    if path.endswith(".jsonl"):
        check_jsonl(path)
    else:
        try:
            schema = pq.read_schema(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{path}: not a parquet file ({e})") from None
        for field in schema:
            if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type) or pa.types.is_null(field.type)):
                raise DataError(f"{path}: column {field.name!r} holds {field.type}, expected strings")
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        rows = datasets.load_dataset("json" if path.endswith(".jsonl") else "parquet", data_files=path, split="train", cache_dir=cache_dir)
    except Exception as e:  # an empty jsonl, a corrupt page, ...
        raise DataError(f"{path}: could not be read ({type(e).__name__}: {e})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
        datasets.enable_progress_bars()
    return rows.data.table


def check(path, table, kind):
    """Validate layout and every row, batch by batch over the Arrow data; returns the number of negative columns.
    Errors name file, row and field."""
    import pyarrow as pa
    import pyarrow.compute as pc
    if table.num_rows == 0:
        raise DataError(f"{path}: empty file")
    columns = table.column_names
    negatives = sorted((c for c in columns if c.startswith("negative_")), key=lambda c: int(c[9:]) if c[9:].isdigit() else -1)
    expected = ["query", "passage"] + [f"negative_{i}" for i in range(1, len(negatives) + 1)]
    if sorted(columns) != sorted(expected):
        raise DataError(f"{path}: unknown column layout {sorted(columns)}; expected query, passage, negative_1 .. negative_n")
    need = NEGATIVES[kind]
    if len(negatives) < need:
        raise DataError(f"{path}: {len(negatives)} negative columns, a {kind} source needs at least {need}")
    start = 0
    strings = pa.schema([(n, pa.large_string()) for n in expected])  # an all-null column has Arrow's null type
    for batch in table.select(expected).cast(strings).to_batches(max_chunksize=1 << 16):
        first = lambda mask: start + int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0]) if pc.any(mask).as_py() else None
        have = np.zeros(batch.num_rows, dtype=np.int64)
        for name, column in zip(expected, batch.columns):
            valid = pc.is_valid(column)
            if name.startswith("negative_"):
                have += valid.to_numpy(zero_copy_only=False)
            elif (row := first(pc.invert(valid))) is not None:
                raise DataError(f"{path}: row {row}: field {name!r} is missing (null)")
            if (row := first(pc.and_kleene(valid, pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)))) is not None:
                raise DataError(f"{path}: row {row}: field {name!r} is empty")
        if (short := np.flatnonzero(have < need)).size:
            raise DataError(f"{path}: row {start + short[0]}: {have[short[0]]} negatives, a {kind} source needs {need}")
        start += batch.num_rows
    return len(negatives)


@dataclass
class Source:
    """One tokenized source: texts are deduplicated; rows point into them (-1 = missing negative). Token ids live in
    the memory-mapped Arrow chunks written by datasets (values and offsets of each chunk, zero-copy)."""
    name: str
    kind: str
    chunks: list           # [(offsets, values)] per Arrow chunk of the tokenized texts
    starts: np.ndarray     # first text index of each chunk
    query: np.ndarray      # [N] text index
    passage: np.ndarray    # [N] text index
    negatives: np.ndarray  # [N, n] text index or -1

    def text(self, t):
        c = int(np.searchsorted(self.starts, t, side="right")) - 1
        offsets, values = self.chunks[c]
        i = t - self.starts[c]
        return values[offsets[i]:offsets[i + 1]].tolist()


CACHE_VERSION = 2  # bump when the cache's layout or the checks change


def identify(files):
    """What identifies each data file: its source name, size and content hash (recorded in checkpoints)."""
    return [dict(source=source_name(f), size=os.path.getsize(f), digest=digest(f)) for f in files]


def load_source(path, tokenizer, max_len, cache_dir, kind, tokenize, progress=True, file_digest=None):
    """Check a file and tokenize each of its distinct texts once; later runs (and the other ranks) read the cache.
    The cache folder is keyed by everything that decides its content (the file's bytes, the tokenizer, the
    length, the task type the checks ran for, the tokenizing code) and verified on load (sizes and checksums);
    a damaged one is rebuilt, with a message naming it."""
    from datasets.fingerprint import Hasher
    key = Hasher.hash((file_digest or digest(path), tokenizer_digest(tokenizer), max_len, kind, tokenize.__code__.co_code, CACHE_VERSION))
    folder = os.path.join(cache_dir, f"{source_name(path)[:64]}-{key[:16]}")
    if os.path.exists(folder) and not cache_is_sound(folder, progress):
        shutil.rmtree(folder, ignore_errors=True)
    if not os.path.exists(folder):
        build_cache(path, tokenizer, max_len, cache_dir, kind, tokenize, folder, key, progress)
    return open_cache(folder, source_name(path), kind)


def build_cache(path, tokenizer, max_len, cache_dir, kind, tokenize, folder, key, progress):
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc
    table = read_rows(path, os.path.join(cache_dir, "datasets"))
    n_neg = check(path, table, kind)
    names = ["query", "passage"] + [f"negative_{i}" for i in range(1, n_neg + 1)]
    # Distinct texts in Arrow, never as Python strings: a text shared by many rows (negatives are) is tokenized once.
    texts = pc.unique(pa.chunked_array([c for n in names for c in table.column(n).cast(pa.large_string()).chunks])).drop_null()
    index = {n: pc.fill_null(pc.index_in(table.column(n).cast(pa.large_string()), value_set=texts), -1).to_numpy().astype(np.int64)
             for n in names}  # -1: a missing negative
    tmp = f"{folder}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    encode = lambda batch: {"input_ids": tokenize(tokenizer, batch["text"], max_len)}
    if not progress:
        datasets.disable_progress_bars()
    try:
        datasets.Dataset(datasets.table.InMemoryTable(pa.table({"text": texts}))).map(
            encode, batched=True, batch_size=4096, remove_columns=["text"], features=features, desc=f"tokenize {source_name(path)}",
            cache_file_name=os.path.join(tmp, "tokens.arrow"), new_fingerprint=key)
    finally:
        datasets.enable_progress_bars()
    np.savez(os.path.join(tmp, "rows.npz"), query=index["query"], passage=index["passage"], negatives=np.stack([index[n] for n in names[2:]], 1))
    files = {f: [os.path.getsize(os.path.join(tmp, f)), digest(os.path.join(tmp, f))] for f in ("tokens.arrow", "rows.npz")}
    with open(os.path.join(tmp, "meta.json"), "w") as f:  # written last: a folder without it is incomplete
        json.dump(dict(source=path, kind=kind, max_len=max_len, files=files), f)
    try:
        os.rename(tmp, folder)
    except OSError:  # another rank finished first: same content
        shutil.rmtree(tmp, ignore_errors=True)


def cache_is_sound(folder, progress=True):
    try:
        files = json.load(open(os.path.join(folder, "meta.json")))["files"]
        bad = [f for f, (size, h) in files.items() if os.path.getsize(os.path.join(folder, f)) != size or digest(os.path.join(folder, f)) != h]
    except (OSError, ValueError, KeyError) as e:
        bad = [f"meta.json ({type(e).__name__})"]
    if bad and progress:
        print(f"tokenization cache {folder} is damaged ({', '.join(bad)} differ from what was written); rebuilding it", flush=True)
    return not bad


def open_cache(folder, name, kind):
    import datasets
    tokens = datasets.Dataset.from_file(os.path.join(folder, "tokens.arrow")).data.table.column("input_ids").chunks
    chunks = [(c.offsets.to_numpy(), c.values.to_numpy()) for c in tokens]
    starts = np.cumsum([0] + [len(c) for c in tokens[:-1]])
    rows = np.load(os.path.join(folder, "rows.npz"))
    return Source(name, kind, chunks, starts, rows["query"], rows["passage"], rows["negatives"])


def changes(saved, current):
    """What differs between the data a checkpoint was trained on and the data given now, in words."""
    old, new = {d["source"]: d for d in saved}, {d["source"]: d for d in current}
    notes = [f"{n}: not in the data now" for n in old.keys() - new.keys()] + [f"{n}: new" for n in new.keys() - old.keys()]
    notes += [f"{n}: content changed ({old[n]['size']:,} -> {new[n]['size']:,} bytes)" for n in old.keys() & new.keys()
              if old[n]["digest"] != new[n]["digest"]]
    return sorted(notes)


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
