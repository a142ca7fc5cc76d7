"""F2LLM's training data: one file per source, tokenized once, batched one source per step as the official loop does.

Format of the released data (`codefuse-ai/F2LLM`): one parquet file per source with columns `query`,
`passage`, `negative_1` .. `negative_n` (jsonl with the same keys works too). The file name is the source
name and decides its task type:
    retrieval       hard negatives + in-batch negatives, 7 of the stored negatives drawn per step
    clustering      hard negatives only (in-batch texts often share the label), 7 drawn per step
    classification  hard negatives only, 1 (the other label name)
Queries carry their instruction prompt ("Instruct: ...\nQuery: ...") in the file, as the released data's do: nothing
adds it in training, while evaluation and the exported model add it to queries (mine.py writes it).
Every global step draws all its queries from one source, picked as the official loop picks it; all ranks take
disjoint shards of the same global batch, which is the same on any number of ranks (`Batches`).
"""
import math
import os
import random
from dataclasses import dataclass

import numpy as np

import cache
from checks import DataError

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
BUILTIN = {"stdlib_code_retrieval": "retrieval", "stdlib_code_clustering": "clustering"}  # builtin.py's sources
NEGATIVES = {"retrieval": 7, "clustering": 7, "classification": 1}  # sampled per query per step (the official collate)
TASK_TYPES = tuple(NEGATIVES)


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
    data = data if os.path.isdir(data) else cache.download(data)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(data) for f in fs if f.endswith((".parquet", ".jsonl")))
    if not files:
        raise DataError(f"{data}: no .parquet or .jsonl files")
    names = [source_name(f) for f in files]
    if len(set(names)) != len(names):
        raise DataError(f"{data}: two files share a source name: {sorted(n for n in names if names.count(n) > 1)}")
    return files


def source_name(path):
    return os.path.basename(path).rsplit(".", 1)[0]


@dataclass
class Source:
    """One tokenized source: texts are deduplicated; rows point into them (-1 = missing negative). Token ids live in
    the memory-mapped Arrow chunks of the cache (values and offsets of each chunk, zero-copy)."""
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


def load_source(path, kind, tokenize, cache_dir, file_digest=None, progress=True):
    """One file, checked row by row and each distinct text tokenized once with `tokenize` (model.tokenize with its
    tokenizer and max_len, as a functools.partial). Cached: later runs and the other ranks read it (cache.py)."""
    return Source(source_name(path), kind, *cache.tokenized(path, kind, NEGATIVES[kind], tokenize, cache_dir, file_digest, progress))


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

    - Every row, every epoch: a source's rows are shuffled each epoch (seeded by seed, epoch and source) and cut into
      global batches; the last one is filled by wrapping around to the epoch's first rows, as accelerate's sharded
      loaders do (even_batches), so a source smaller than a batch is still trained.
    - Which source, each step: the official MultiLoader, i.e. random.Random(epoch).choices over the sources with
      weights fixed to each source's number of batches; a draw that finds its source used up removes it and
      makes no step. Seeded by the epoch alone, as there: --seed changes rows and negatives, not the sources' order.
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
        for i in np.flatnonzero((picked < 0).any(1)):  # a missing negative: the row's first unused ones (checks.py: enough)
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
