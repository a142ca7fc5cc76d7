"""Run by test_loss.py in a process of its own (a process group lives in it): the gradient cache under FSDP2's
bf16 mixed precision on one process, as train.py runs it on GPUs. Saves every forward's embeddings and the
gradients, cached and plain."""
import sys

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from conftest import by_length, make_batch, uncached_step

import loss as f2llm_loss
import model as f2llm_model
import launch
import speed

with launch.process_group(1, torch.device("cpu"), needed=True):
    model, tokenizer = f2llm_model.load("tiny")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.backbone.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    forwards = []
    model.register_forward_hook(lambda module, inputs, output: forwards.append(output.detach().clone()))
    batch, collate = make_batch(tokenizer, 5, 3, True), lambda seqs: f2llm_model.pad(seqs, tokenizer.pad_token_id)
    with speed.gathered(model):  # as train.py's step runs it
        f2llm_loss.cached_step(model, batch, collate, by_length(7))
    grads = lambda: {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
    cached, cached_forwards = grads(), list(forwards)
    model.zero_grad()
    uncached_step(model, batch, collate)
    torch.save(dict(forwards=cached_forwards, cached=cached, plain=grads(),
                    dtype=str(next(iter(model.backbone.layers[0].parameters())).dtype)), sys.argv[1])
