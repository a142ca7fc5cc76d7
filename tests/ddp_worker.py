"""Run by torchrun from test_ddp.py: for each kind of loss, one cached step of this rank's shard under DDP; rank 0
saves the gradients (ddp-<kind>.pt)."""
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from conftest import by_length, make_batch, objective_of, shard

import loss as f2llm_loss
import model as f2llm_model
import launch

out, kinds = sys.argv[1], sys.argv[2:]  # conftest.objective_of
with launch.process_group(int(os.environ["WORLD_SIZE"]), torch.device("cpu")):  # the trainer's own way in and out
    rank, world = dist.get_rank(), dist.get_world_size()
    for kind in kinds:
        model, tokenizer = f2llm_model.load("tiny")
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        reduced = []  # the gradient buckets DDP all-reduces, by index: each once means one all-reduce per step
        ddp.register_comm_hook(None, lambda group, bucket, reduced=reduced: (reduced.append(bucket.index()), allreduce_hook(group, bucket))[1])
        in_batch, objective = objective_of(kind)
        batch = make_batch(tokenizer, 6, 3, in_batch)
        collate = lambda seqs: f2llm_model.pad(seqs, tokenizer.pad_token_id)
        loss, _, _ = f2llm_loss.cached_step(ddp, shard(batch, rank, world), collate, by_length(5), objective)
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss)
        if rank == 0:
            torch.save(dict(grads={n: p.grad for n, p in model.named_parameters()}, loss=torch.stack(losses).mean(), reduced=reduced),
                       os.path.join(out, f"ddp-{kind}.pt"))
