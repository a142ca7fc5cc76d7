"""What a run leaves in --out, written so that no crash loses it and no second run can clobber it.

    out/state.pt        the training state: fp32 weights, optimizer, step, RNG, bad-step count, settings and
                        what identifies the data; written aside and swapped in by one rename (atomic)
    out/state.json      its small summary (step, settings, data), read first so that --resume can refuse early
    out/checkpoint/     the model to use and upload: weights, config, tokenizer (EOS appended by its own
                        post-processor), the sentence-transformers files (last-token pooling, normalisation,
                        prompts) and a model card; `SentenceTransformer("out/checkpoint")` loads it right
    out/log.jsonl       one record per logged step, validation and evaluation (logs.py)
    out/tensorboard/    the same numbers as TensorBoard curves (logs.py)
    out/.lock           held by the running job, so two runs never share an --out

A kill at any moment leaves a loadable state.pt (the old or the new one) and nothing that blocks the next
save: stale `.tmp` files and folders are removed and a `checkpoint` missing after a kill between its two
renames is restored from `checkpoint.old`. Weights that are not finite are never written.
"""
import fcntl
import json
import os
import shutil

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

EOS = "<|im_end|>"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"  # F2LLM's MTEB wrapper


class CheckpointError(RuntimeError):
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
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_state(out, state, summary):
    """state.pt (everything --resume needs), then state.json (its summary). Refuses non-finite weights."""
    if broken := [k for k, v in state["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]:
        raise CheckpointError(f"not saving step {state['step']}: non-finite weights in {broken[:3]}; the last good checkpoint stays")
    write_atomic(os.path.join(out, "state.pt"), lambda p: torch.save(state, p))
    write_atomic(os.path.join(out, "state.json"), lambda p: json.dump(summary, open(p, "w"), indent=1))


def save(out, model, optimizer, tokenizer, progress, about):
    """Every rank gathers the full (unsharded, fp32) state; rank 0 writes the training state, then the model folder.
    progress: step and counters; about: settings, data and tokenizer identity (state.json), export (the model folder's
    base, max_len, instruction and data)."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=full)
    optim = get_optimizer_state_dict(model, optimizer, options=full)
    if not dist.is_initialized() or dist.get_rank() == 0:
        summary, export = {k: v for k, v in about.items() if k != "export"}, about["export"]
        save_state(out, dict(model=weights, optimizer=optim, rng=torch.get_rng_state(), **progress,
                             cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None), dict(step=progress["step"], **summary))
        encoder = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        card = model_card(export["base"], export["max_len"], export["instruction"], progress["step"], export["data"])
        export_model(out, encoder.backbone, {k.removeprefix("backbone."): v for k, v in weights.items()}, tokenizer, export["max_len"],
                     export["instruction"], card)
    if dist.is_initialized():
        dist.barrier()


def restore(out, model, optimizer, device):
    """Weights, optimizer state and RNG from out/state.pt into a wrapped model; returns (step, counters)."""
    state = load_state(out)
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


def load_state(out):
    """The training state; its own step and settings are the truth (state.json may lag one save behind it)."""
    return torch.load(os.path.join(out, "state.pt"), weights_only=False, map_location="cpu")


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
    """After a kill: drop what an interrupted save left half-written; restore a model folder moved aside."""
    for name in ("state.pt.tmp", "state.json.tmp"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
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
            raise SystemExit(f"--resume: no training state in {args.out} (state.json, state.pt); start without --resume")
        if changed := {k: (summary["args"].get(k), getattr(args, k)) for k in resume_keys if summary["args"].get(k) != getattr(args, k)}:
            raise SystemExit(f"--resume: settings differ from the checkpoint's (saved, given): {changed}")
        if args.stop_at is not None and args.stop_at <= summary["step"]:
            raise SystemExit(f"--stop-at {args.stop_at}: the checkpoint is already at step {summary['step']}")
    elif has_run and not args.overwrite:
        raise SystemExit(f"{args.out} holds another run (step {summary['step'] if summary else '?'}); --resume continues it, "
                         f"--overwrite deletes it, or pick another --out")
    elif has_run:
        for name in ("state.pt", "state.json", "log.jsonl"):
            if os.path.exists(os.path.join(args.out, name)):
                os.remove(os.path.join(args.out, name))
        for name in ("checkpoint", "eval", "tensorboard"):
            shutil.rmtree(os.path.join(args.out, name), ignore_errors=True)
    return summary


def save_tokenizer(tokenizer, folder, max_len):
    """The tokenizer as users should get it: it appends EOS itself (a TemplateProcessing post-processor), so a
    plain call, truncation included, gives exactly our ids (text truncated to max_len - 1, then EOS); no
    truncation left over from training; model_max_length set. Our own calls pass add_special_tokens=False."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    backend = tokenizer.backend_tokenizer.__class__.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    backend.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}",
                                                           special_tokens=[(EOS, tokenizer.convert_tokens_to_ids(EOS))])
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=tokenizer.pad_token, model_max_length=max_len,
                            padding_side="right").save_pretrained(folder)


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


def model_card(base, max_len, instruction, step, data):
    return f"""---
library_name: sentence-transformers
pipeline_tag: sentence-similarity
tags: [sentence-transformers, feature-extraction, f2llm]
base_model: {base}
---
# F2LLM embedding model

Trained from `{base}` with the F2LLM recipe (arXiv 2510.02294) for {step} steps on `{data}`.
Embedding: the hidden state at the EOS token `{EOS}` that the tokenizer appends, L2-normalised; cosine similarity;
up to {max_len} tokens.

```python
from sentence_transformers import SentenceTransformer
model = SentenceTransformer("path/to/this/folder")
queries = model.encode(["how do I sort a list"], prompt_name="query")   # Instruct: {instruction}\\nQuery: ...
documents = model.encode(["sorted(xs) returns a new sorted list"])      # documents: no prompt
```
For another task, pass `prompt="Instruct: <task instruction>\\nQuery: "` with the queries.
"""
