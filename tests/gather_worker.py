"""Run by test_loss.py in a process of its own: FSDP2 with bf16 compute on one process, three AdamW steps with the
weights gathered once per step (cached_step's way) and gathered per forward and backward (FSDP2's default). Saves
each run's losses, last gradients, and whether a layer's weights were still gathered after each of its forwards."""
import sys

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from contextlib import nullcontext

from conftest import by_length, make_batch

import loss as f2llm_loss
import model as f2llm_model
import launch
import speed

runs = {}
with launch.process_group(1, torch.device("cpu"), needed=True):
    for name, once in (("once", True), ("per forward", False)):
        model, tokenizer = f2llm_model.load("tiny")
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.backbone.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        kept = []  # after FSDP2's own post-forward hook: a plain tensor registered means the gathered weights stayed
        model.backbone.layers[0].register_forward_hook(lambda m, i, o, kept=kept: kept.append(not isinstance(m.mlp.up_proj.weight, DTensor)))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        batch, collate = make_batch(tokenizer, 5, 3, True), lambda seqs, pad=tokenizer.pad_token_id: f2llm_model.pad(seqs, pad)
        losses = []
        for _ in range(3):
            with speed.gathered(model) if once else nullcontext():  # train.py's step gathers them once
                losses.append(f2llm_loss.cached_step(model, batch, collate, by_length(7))[0])
            grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
            sharded_after = all(isinstance(p, DTensor) for p in model.parameters())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        runs[name] = dict(losses=torch.stack(losses), grads=grads, kept=kept, sharded_after=sharded_after)
    torch.save(runs, sys.argv[1])
