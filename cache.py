"""The tokenization cache: each distinct text of a data file tokenized once, kept as memory-mapped Arrow.

A file is read by `datasets` (one dataset per file: a folder read as one would merge every source's schema and lose
the source name, which decides the task type), checked row by row (checks.py), its distinct texts found in Arrow
and tokenized with `Dataset.map`. The cache folder is keyed by everything that decides its content (the file's
bytes, the tokenizer, the length, the task type the checks ran for, the tokenizing code), built in a folder of its
own and renamed into place, and verified on load (sizes and checksums); a damaged one is rebuilt, with a message.
A folder that a killed run was building is removed by the next run that finds it, never while its process lives.
"""
import glob
import json
import os
import shutil
import socket

import numpy as np

import checks

VERSION = 2  # bump when the cache's layout or the checks change


def tokenized(path, kind, need, tokenize, cache_dir, file_digest=None, progress=True):
    """(token chunks, chunk starts, query, passage, negatives) of a checked file: chunks are the (offsets, values) of
    each Arrow chunk of the tokenized distinct texts; rows hold text indices (-1: a missing negative). `tokenize`:
    texts -> token lists, a functools.partial of model.tokenize with its tokenizer and length; `need`: negatives a
    row of a `kind` source must have. Later runs and the other ranks read what the first one built."""
    from datasets.fingerprint import Hasher
    tokenizer, max_len = tokenize.args[0], tokenize.keywords["max_len"]
    key = Hasher.hash((file_digest or checks.digest(path), checks.tokenizer_digest(tokenizer), max_len, kind, tokenize.func.__code__.co_code,
                       VERSION))
    folder = os.path.join(cache_dir, f"{os.path.basename(path).rsplit('.', 1)[0][:64]}-{key[:16]}")
    remove_leftovers(cache_dir)
    if os.path.exists(folder) and not is_sound(folder, progress):
        shutil.rmtree(folder, ignore_errors=True)
    if not os.path.exists(folder):
        build(path, kind, need, tokenize, folder, key, progress)
    return open_folder(folder)


def download(data):
    """A hub dataset id (owner/name): its .parquet/.jsonl files, downloaded to the hub's cache; the local folder they are in."""
    parts = data.split("/")
    if os.path.exists(data) or len(parts) != 2 or data.startswith((".", "~")) or os.path.isdir(parts[0]) or not all(parts):
        raise checks.DataError(f"{data}: no such folder of F2LLM files (a hub dataset id looks like codefuse-ai/F2LLM)")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(data, repo_type="dataset", allow_patterns=["*.parquet", "*.jsonl"])
    except Exception as e:
        raise checks.DataError(f"{data}: not a local folder, and the hub dataset could not be fetched ({type(e).__name__}: {e})") from None


def read_rows(path, cache_dir):
    """The file as a memory-mapped Arrow table, read by `datasets` after the checks it would not make itself."""
    import datasets
    if path.endswith(".jsonl"):
        checks.check_jsonl(path)
    else:
        checks.check_parquet(path)
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        rows = datasets.load_dataset("json" if path.endswith(".jsonl") else "parquet", data_files=path, split="train", cache_dir=cache_dir)
    except Exception as e:  # an empty jsonl, a corrupt page, ...
        raise checks.DataError(f"{path}: could not be read ({type(e).__name__}: {e})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
        datasets.enable_progress_bars()
    return rows.data.table


def build(path, kind, need, tokenize, folder, key, progress):
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc
    table = read_rows(path, os.path.join(os.path.dirname(folder), "datasets"))
    names = ["query", "passage"] + [f"negative_{i}" for i in range(1, checks.check_rows(path, table, kind, need) + 1)]
    # Distinct texts in Arrow, never as Python strings: a text shared by many rows (negatives are) is tokenized once.
    texts = pc.unique(pa.chunked_array([c for n in names for c in table.column(n).cast(pa.large_string()).chunks])).drop_null()
    index = {n: pc.fill_null(pc.index_in(table.column(n).cast(pa.large_string()), value_set=texts), -1).to_numpy().astype(np.int64)
             for n in names}  # -1: a missing negative
    tmp = f"{folder}.tmp-{socket.gethostname()}-{os.getpid()}"  # whose it is: see remove_leftovers
    os.makedirs(tmp, exist_ok=True)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    if not progress:
        datasets.disable_progress_bars()
    try:
        datasets.Dataset(datasets.table.InMemoryTable(pa.table({"text": texts}))).map(
            lambda batch: {"input_ids": tokenize(batch["text"])}, batched=True, batch_size=4096, remove_columns=["text"], features=features,
            desc=f"tokenize {os.path.basename(path)}", cache_file_name=os.path.join(tmp, "tokens.arrow"), new_fingerprint=key)
    finally:
        datasets.enable_progress_bars()
    np.savez(os.path.join(tmp, "rows.npz"), query=index["query"], passage=index["passage"], negatives=np.stack([index[n] for n in names[2:]], 1))
    files = {f: [os.path.getsize(os.path.join(tmp, f)), checks.digest(os.path.join(tmp, f))] for f in ("tokens.arrow", "rows.npz")}
    with open(os.path.join(tmp, "meta.json"), "w") as f:  # written last: a folder without it is incomplete
        json.dump(dict(source=path, kind=kind, max_len=tokenize.keywords["max_len"], files=files), f)
    try:
        os.rename(tmp, folder)
    except OSError:  # another rank finished first: same content
        shutil.rmtree(tmp, ignore_errors=True)


def remove_leftovers(cache_dir):
    """Remove the folders that runs on this machine were building when they were killed (their process is gone). A
    folder of a process still running, or of another machine sharing the cache, is left alone."""
    for tmp in glob.glob(os.path.join(glob.escape(cache_dir), f"*.tmp-{glob.escape(socket.gethostname())}-*")):
        pid = tmp.rsplit("-", 1)[1]
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"removed {tmp}, left by a run that was killed while tokenizing", flush=True)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def is_sound(folder, progress=True):
    try:
        files = json.load(open(os.path.join(folder, "meta.json")))["files"]
        bad = [f for f, (size, h) in files.items() if os.path.getsize(os.path.join(folder, f)) != size or checks.digest(os.path.join(folder, f)) != h]
    except (OSError, ValueError, KeyError) as e:
        bad = [f"meta.json ({type(e).__name__})"]
    if bad and progress:
        print(f"tokenization cache {folder} is damaged ({', '.join(bad)} differ from what was written); rebuilding it", flush=True)
    return not bad


def open_folder(folder):
    import datasets
    tokens = datasets.Dataset.from_file(os.path.join(folder, "tokens.arrow")).data.table.column("input_ids").chunks
    rows = np.load(os.path.join(folder, "rows.npz"))
    return ([(c.offsets.to_numpy(), c.values.to_numpy()) for c in tokens], np.cumsum([0] + [len(c) for c in tokens[:-1]]),
            rows["query"], rows["passage"], rows["negatives"])
