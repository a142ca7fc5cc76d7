"""Input checks and the run's identity: everything a user can get wrong is refused here, named by file, row and field,
before it can crash a run or train it silently on the wrong thing.

    json_lines, check_jsonl, check_parquet, check_rows   a data file, line by line or in Arrow batches
    digest, tokenizer_digest, identify, changes          what identifies data and tokenizer (for --resume)
    check_args                                           train.py's flags, before anything is loaded
"""
import hashlib
import json
import os

import numpy as np

import launch


class DataError(launch.UserError, ValueError):
    pass


# ---- data files ---------------------------------------------------------------------------------------------

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


def check_parquet(path):
    """A parquet file whose columns all hold strings."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a parquet file ({e})") from None
    for field in schema:
        if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type) or pa.types.is_null(field.type)):
            raise DataError(f"{path}: column {field.name!r} holds {field.type}, expected strings")


def check_rows(path, table, kind, need):
    """Validate layout and every row, batch by batch over the Arrow data; returns the number of negative columns
    (a `kind` source needs `need` per row). Errors name file, row and field."""
    import pyarrow as pa
    import pyarrow.compute as pc
    if table.num_rows == 0:
        raise DataError(f"{path}: empty file")
    columns = table.column_names
    negatives = sorted((c for c in columns if c.startswith("negative_")), key=lambda c: int(c[9:]) if c[9:].isdigit() else -1)
    expected = ["query", "passage"] + [f"negative_{i}" for i in range(1, len(negatives) + 1)]
    if sorted(columns) != sorted(expected):
        raise DataError(f"{path}: unknown column layout {sorted(columns)}; expected query, passage, negative_1 .. negative_n")
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


# ---- identity -------------------------------------------------------------------------------------------------

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


def identify(files, name):
    """What identifies each data file: its source name (`name(path)`), size and content hash (recorded in checkpoints)."""
    return [dict(source=name(f), size=os.path.getsize(f), digest=digest(f)) for f in files]


def changes(saved, current):
    """What differs between the data a checkpoint was trained on and the data given now, in words."""
    old, new = {d["source"]: d for d in saved}, {d["source"]: d for d in current}
    notes = [f"{n}: not in the data now" for n in old.keys() - new.keys()] + [f"{n}: new" for n in new.keys() - old.keys()]
    notes += [f"{n}: content changed ({old[n]['size']:,} -> {new[n]['size']:,} bytes)" for n in old.keys() & new.keys()
              if old[n]["digest"] != new[n]["digest"]]
    return sorted(notes)


# ---- train.py's flags ---------------------------------------------------------------------------------------------

# what must match the checkpoint for --resume to continue the same run
RESUME_KEYS = ("size", "model", "random_init", "data", "task_type", "max_len", "lr", "min_lr", "warmup", "schedule_world", "epochs",
               "batch_size", "weight_decay", "clip", "temperature", "in_batch_grad", "matryoshka", "matryoshka_dims", "precision", "seed")


def check_args(p, args, task_types):
    """Every setting that could crash after training starts, or train nothing, refused (p.error) before any loading."""
    for name, low in dict(batch_size=1, chunk_size=1, chunk_tokens=1, epochs=1, save_every=1, keep=1, log_every=1, max_len=2, schedule_world=1, warmup=0,
                          val_every=0, eval_every=0, stop_at=1, max_bad_steps=1).items():
        if getattr(args, name) is not None and getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}" + (" (one text token and the EOS)" if name == "max_len" else ""))
    for name in ("lr", "temperature", "clip"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.min_lr < 0 or args.weight_decay < 0:
        p.error("--min-lr and --weight-decay cannot be negative")
    if bad := [kv for kv in args.task_type if "=" not in kv]:
        p.error(f"--task-type takes SOURCE=TYPE, got {bad}")
    args.task_type = dict(kv.split("=", 1) for kv in args.task_type)
    if bad := {k: v for k, v in args.task_type.items() if v not in task_types}:
        p.error(f"--task-type: unknown types {bad}")
    if args.batch_size % args.schedule_world:
        p.error(f"--batch-size {args.batch_size} is not divisible by --schedule-world {args.schedule_world}")
    if args.padded and args.chunk_tokens is None:
        p.error("--padded says how --chunk-tokens fills a chunk; give --chunk-tokens too")
    if args.matryoshka_dims and (not args.matryoshka or min(args.matryoshka_dims) < 1):
        p.error("--matryoshka-dims takes dimensions of at least 1, and goes with --matryoshka")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out; --overwrite deletes it: pick one")
    args.data = os.path.normpath(args.data) if args.data and os.path.exists(args.data) else args.data  # dir/ == dir
