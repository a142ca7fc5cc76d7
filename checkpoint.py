"""What a run leaves in --out, written so that no crash loses it and no second run can clobber it.

    out/state-<step>.pt the training state: fp32 weights, optimizer, step, RNG, bad-step count; written aside and
                        renamed into place; the newest --keep (2) are kept
    out/state.json      the run's settings, what identifies its data and tokenizer, and the kept states with the
                        digest of each, so that each is verified on load; read first so that --resume can refuse early
    out/checkpoint/     the model to use and upload: weights, config, tokenizer (EOS appended by its own
                        post-processor), the sentence-transformers files (last-token pooling, normalisation,
                        prompts) and a model card; `SentenceTransformer("out/checkpoint")` loads it right
    out/log.jsonl       one record per logged step, validation and evaluation (logs.py)
    out/tensorboard/    the same numbers as TensorBoard curves (logs.py)
    out/.lock           held by the running job, so two runs never share an --out

A kill at any moment leaves a verifiable state (the old or the new one) and nothing that blocks the next save:
stale `.tmp` files and folders are removed and a `checkpoint` missing after a kill between its two renames is
restored from `checkpoint.old`. A failed write (a full disk) leaves no part behind and says so in one line; a damaged
newest state is named and --resume falls back to the one before. Weights that are not finite are never written.
"""
import errno
import fcntl
import functools
import glob
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

import checks
import launch

DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"  # F2LLM's MTEB wrapper


class CheckpointError(launch.UserError):
    pass


def lock(out):
    """Hold an exclusive lock on `out` for the life of the process (the kernel releases it when the process ends)."""
    os.makedirs(out, exist_ok=True)
    handle = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        raise CheckpointError(f"{out} is in use by another run (pid {handle.read().strip() or '?'}); give this run its own --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def write_atomic(path, write):
    """write(tmp_path), flushed to disk, then one rename: readers see the old file or the new one, never a part."""
    tmp = f"{path}.tmp"
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_folder(path)


def sync_folder(path):
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_state(out, state, summary, keep=2):
    """state-<step>.pt, hashed as it is written (no second read), then renamed into place; state.json lists it with its
    digest before it takes its name, so every state on disk can be verified; the oldest beyond `keep` go after.
    Refuses non-finite weights."""
    if broken := [k for k, v in state["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]:
        raise CheckpointError(f"not saving step {state['step']}: non-finite weights in {broken[:3]}; the last good checkpoint stays")
    step, name = state["step"], f"state-{state['step']:08d}.pt"
    path, listed = os.path.join(out, name), states(out)
    earlier, later = [s for s in listed if s["step"] < step], [s for s in listed if s["step"] > step]  # later: given up on a fallback
    with written_or_named(path, path + ".tmp", f"saving step {step}", need=tensor_bytes(state), kept=earlier):
        digest = save_hashed(state, path + ".tmp")
        write_summary(out, summary, earlier + [dict(file=name, step=step, digest=digest)])
        os.replace(path + ".tmp", path)
        sync_folder(path)
        write_summary(out, summary, (earlier + [dict(file=name, step=step, digest=digest)])[-keep:])
    for stale in earlier[:max(0, len(earlier) + 1 - keep)] + later:
        os.remove(os.path.join(out, stale["file"]))


def save_hashed(obj, path):
    """torch.save(obj) into path, flushed to disk; returns the blake2b digest of the bytes as they were written."""
    class Hashing:
        def __init__(self, f):
            self.f, self.h, self.error = f, hashlib.blake2b(digest_size=16), None

        def write(self, data):
            self.h.update(data)
            try:
                return self.f.write(data)
            except OSError as e:  # torch.save would turn it into a RuntimeError that no longer says why
                self.error = e
                raise

        def flush(self):
            self.f.flush()
    with open(path, "wb") as f:
        hashing = Hashing(f)
        try:
            torch.save(obj, hashing)
        except RuntimeError:
            if hashing.error:
                raise hashing.error from None
            raise
        f.flush()
        os.fsync(f.fileno())
    return hashing.h.hexdigest()


def write_summary(out, summary, kept):
    write_atomic(os.path.join(out, "state.json"), lambda p: json.dump(dict(summary, states=kept), open(p, "w"), indent=1))


@contextmanager
def written_or_named(path, tmp, what, need, kept):
    """A write that fails (a full disk, a folder turned read-only) leaves no part of itself behind and ends the run with
    one line: which file, why (for a full disk, how much it needed and how much was free), and what is still intact."""
    try:
        yield
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True) if os.path.isdir(tmp) else os.path.exists(tmp) and os.remove(tmp)
        if e.errno == errno.ENOSPC:
            why = f"the disk is full (it needs about {need / 2**20:,.0f} MiB; {shutil.disk_usage(os.path.dirname(path)).free / 2**20:,.0f} MiB are free)"
        else:
            why = e.strerror or str(e)
        intact = f"the state of step {kept[-1]['step']} is intact and --resume continues from it" if kept else "no earlier state was saved"
        raise CheckpointError(f"{what}: writing {path} failed: {why}; {intact}") from None


def tensor_bytes(obj):
    """Bytes of the tensors in a nested state: about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    return sum(tensor_bytes(v) for v in obj) if isinstance(obj, (list, tuple)) else 0


def save(out, model, optimizer, tokenizer, progress, about):
    """Every rank gathers the full (unsharded, fp32) state; rank 0 writes the training state, then the model folder.
    progress: step and counters; about: settings, data and tokenizer identity (state.json), export (the model folder's
    base, max_len, instruction, data and Matryoshka dimensions) and keep (how many training states stay)."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=full)
    optim = get_optimizer_state_dict(model, optimizer, options=full)
    if not dist.is_initialized() or dist.get_rank() == 0:
        summary, export = {k: v for k, v in about.items() if k not in ("export", "keep")}, about["export"]
        save_state(out, dict(model=weights, optimizer=optim, rng=torch.get_rng_state(), **progress,
                             cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None), dict(step=progress["step"], **summary),
                   about["keep"])
        encoder = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        card = model_card(export, progress["step"], tokenizer.eos_token)
        folder, backbone = os.path.join(out, "checkpoint"), {k.removeprefix("backbone."): v for k, v in weights.items()}
        with written_or_named(folder, folder + ".tmp", "writing the model folder", tensor_bytes(backbone), [dict(step=progress["step"])]):
            export_model(out, encoder.backbone, backbone, tokenizer, export["max_len"], export["instruction"], card)
    if dist.is_initialized():
        dist.barrier()


def restore(path, model, optimizer, device):
    """Weights, optimizer state and RNG from a training state into a wrapped model; returns (step, counters)."""
    state = torch.load(path, weights_only=False, map_location="cpu")
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=full)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=full)
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["counters"]


def read_summary(out):
    path = os.path.join(out, "state.json")
    return json.load(open(path)) if os.path.exists(path) else None


def states(out):
    """The kept training states, oldest first: file, step, digest."""
    return (read_summary(out) or {}).get("states", [])


def choose(out):
    """(path, step) of the newest kept state whose bytes are those written; each one that is not is named in one line."""
    for s in reversed(states(out)):
        path = os.path.join(out, s["file"])
        if os.path.exists(path) and checks.digest(path) == s["digest"]:
            return path, s["step"]
        problem = "is missing (a save was interrupted)" if not os.path.exists(path) else "is damaged (its bytes are not those written)"
        print(f"{path} {problem}; falling back to the state before it", flush=True)
    raise CheckpointError(f"no intact training state in {out} to resume from; start without --resume")


def load_state(out):
    """The newest intact training state; its own step is the truth (state.json's may be that of a save interrupted)."""
    return torch.load(choose(out)[0], weights_only=False, map_location="cpu")


def export_model(out, backbone, weights, tokenizer, max_len, instruction, card):
    """out/checkpoint as a Hugging Face and sentence-transformers model folder, written aside and swapped in."""
    folder = os.path.join(out, "checkpoint")
    tmp, old = folder + ".tmp", folder + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    backbone.save_pretrained(tmp, state_dict=weights)
    save_tokenizer(tokenizer, tmp, max_len)
    write_sentence_transformers_files(tmp, backbone.config.hidden_size, max_len, instruction)
    with open(os.path.join(tmp, "README.md"), "w") as f:
        f.write(card)
    shutil.rmtree(old, ignore_errors=True)  # a stale one from an earlier kill would block the rename below
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def recover(out):
    """After a kill (--out is locked, so no process is still writing): drop what an interrupted save left half-written
    and the states it had not yet listed or had dropped; restore a model folder moved aside."""
    summary, listed = read_summary(out), states(out)
    for path in glob.glob(os.path.join(out, "state*.tmp")) + [p for p in glob.glob(os.path.join(out, "state-*.pt"))
                                                               if os.path.basename(p) not in {s["file"] for s in listed}]:
        os.remove(path)
    if present := [s for s in listed if os.path.exists(os.path.join(out, s["file"]))]:
        if present != listed:  # listed, then killed before it took its name: the newest is the one before
            write_summary(out, {k: v for k, v in summary.items() if k != "states"}, present)
    folder = os.path.join(out, "checkpoint")
    shutil.rmtree(folder + ".tmp", ignore_errors=True)
    if not os.path.exists(folder) and os.path.exists(folder + ".old"):
        os.replace(folder + ".old", folder)
    shutil.rmtree(folder + ".old", ignore_errors=True)


def prepare(args, resume_keys):
    """Rank 0, before anything is loaded (--out is locked by now): mend what a kill left, and refuse to start over
    another run's checkpoint (or to resume a checkpoint that is not there, or is not this run's)."""
    recover(args.out)
    summary = read_summary(args.out)
    has_run = summary or os.path.exists(os.path.join(args.out, "checkpoint"))
    if args.resume:
        if not summary:
            raise SystemExit(f"--resume: no training state in {args.out} (state.json, state-<step>.pt); start without --resume")
        if changed := {k: (summary["args"].get(k), getattr(args, k)) for k in resume_keys if summary["args"].get(k) != getattr(args, k)}:
            raise SystemExit(f"--resume: settings differ from the checkpoint's (saved, given): {changed}")
        summary["resume"], summary["step"] = choose(args.out)  # the newest intact state, each damaged one named
        if args.stop_at is not None and args.stop_at <= summary["step"]:
            raise SystemExit(f"--stop-at {args.stop_at}: the checkpoint is already at step {summary['step']}")
    elif has_run and not args.overwrite:
        raise SystemExit(f"{args.out} holds another run (step {summary['step'] if summary else '?'}); --resume continues it, "
                         f"--overwrite deletes it, or pick another --out")
    elif has_run:
        for path in glob.glob(os.path.join(args.out, "state-*.pt")) + [os.path.join(args.out, n) for n in ("state.json", "log.jsonl")]:
            if os.path.exists(path):
                os.remove(path)
        for name in ("checkpoint", "eval", "tensorboard"):
            shutil.rmtree(os.path.join(args.out, name), ignore_errors=True)
    return summary


def save_tokenizer(tokenizer, folder, max_len):
    """The tokenizer as users should get it: it appends EOS itself (a TemplateProcessing post-processor), so a
    plain call, truncation included, gives exactly our ids (text truncated to max_len - 1, then EOS); no
    truncation left over from training; model_max_length set. Our own calls pass add_special_tokens=False."""
    os.makedirs(folder, exist_ok=True)
    for name, content in tokenizer_files(tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token, tokenizer.pad_token, max_len).items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(content)


@functools.lru_cache(maxsize=1)
def tokenizer_files(backend, eos, pad_token, max_len):
    """The files of save_tokenizer, built once for a run's every save (building them takes a second)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast
    backend = Tokenizer.from_str(backend)
    backend.no_truncation()
    backend.no_padding()
    backend.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B {eos}",
                                                           special_tokens=[(eos, backend.token_to_id(eos))])
    with tempfile.TemporaryDirectory() as tmp:
        PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=pad_token, model_max_length=max_len,
                                padding_side="right").save_pretrained(tmp)
        return {name: open(os.path.join(tmp, name), "rb").read() for name in os.listdir(tmp)}


def write_sentence_transformers_files(folder, hidden, max_len, instruction):
    """The files the released F2LLM repositories ship: Transformer, last-token Pooling, Normalize; the query prompt."""
    write_json = lambda name, obj: json.dump(obj, open(os.path.join(folder, name), "w"), indent=2)
    write_json("modules.json", [dict(idx=0, name="0", path="", type="sentence_transformers.models.Transformer"),
                                dict(idx=1, name="1", path="1_Pooling", type="sentence_transformers.models.Pooling"),
                                dict(idx=2, name="2", path="2_Normalize", type="sentence_transformers.models.Normalize")])
    write_json("sentence_bert_config.json", dict(max_seq_length=max_len, do_lower_case=False))
    os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
    os.makedirs(os.path.join(folder, "2_Normalize"), exist_ok=True)
    modes = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
    write_json(os.path.join("1_Pooling", "config.json"), dict(word_embedding_dimension=hidden, include_prompt=True,
                                                              **{f"pooling_mode_{m}": m == "lasttoken" for m in modes}))
    write_json("config_sentence_transformers.json", dict(prompts=dict(query=f"Instruct: {instruction}\nQuery: ", document=""),
                                                         default_prompt_name=None, similarity_fn_name="cosine"))


def model_card(export, step, eos):
    base, max_len, instruction, data, dims = (export[k] for k in ("base", "max_len", "instruction", "data", "dims"))
    matryoshka = f"""
Trained with F2LLM-v2's Matryoshka loss at dimensions {", ".join(map(str, dims))}: the first D coordinates of an embedding,
normalised again, are an embedding of D dimensions, as `eval.py --dims` scores them:
`SentenceTransformer("path/to/this/folder", truncate_dim={dims[-1]}).encode(texts, normalize_embeddings=True)`.
""" if dims else ""
    return f"""---
library_name: sentence-transformers
pipeline_tag: sentence-similarity
tags: [sentence-transformers, feature-extraction, f2llm{", matryoshka" if dims else ""}]
base_model: {base}
---
# F2LLM embedding model

Trained from `{base}` with the F2LLM recipe (arXiv 2510.02294) for {step} steps on `{data}`.
Embedding: the hidden state at the EOS token `{eos}` that the tokenizer appends, L2-normalised; cosine similarity;
up to {max_len} tokens.

```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("path/to/this/folder")
queries = model.encode(["how do I sort a list"], prompt_name="query")   # Instruct: {instruction}\\nQuery: ...
documents = model.encode(["sorted(xs) returns a new sorted list"])      # documents: no prompt
```
For another task, pass `prompt="Instruct: <task instruction>\\nQuery: "` with the queries.
{matryoshka}"""
