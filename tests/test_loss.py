import math

import pytest
import torch
from conftest import make_batch, uncached_step

import loss as f2llm_loss
import model as f2llm_model


def reference_loss(q, p, negs, in_batch, tau=0.05):
    """The F2LLM objective written out query by query."""
    total = 0.0
    for i in range(len(q)):
        cands = [p[i]] + list(negs[i])
        logits = torch.stack([q[i] @ c for c in cands]) / tau
        total = total - (logits[0] - torch.logsumexp(logits, 0))
        if in_batch:
            logits = torch.stack([q[i] @ p[j] for j in range(len(p))]) / tau
            total = total - (logits[i] - torch.logsumexp(logits, 0))
    return total / len(q)


def unit(*shape):
    return torch.nn.functional.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("in_batch", [True, False], ids=["retrieval", "clustering"])
def test_loss_equals_reference(in_batch):
    torch.manual_seed(0)
    q, p, negs = unit(6, 16), unit(6, 16), unit(6, 7, 16)
    loss, hard, ib = f2llm_loss.f2llm_loss(q, p, negs, in_batch)
    torch.testing.assert_close(loss, reference_loss(q, p, negs, in_batch))
    torch.testing.assert_close(hard + ib, loss)
    assert (ib == 0) == (not in_batch)


def test_loss_of_random_embeddings_is_near_chance():
    # Orthogonal-ish embeddings: each term is about log(number of candidates).
    torch.manual_seed(0)
    q, p, negs = unit(64, 4096), unit(64, 4096), unit(64, 7, 4096)
    _, hard, ib = f2llm_loss.f2llm_loss(q, p, negs, True)
    assert abs(hard.item() - math.log(8)) < 0.3 and abs(ib.item() - math.log(64)) < 0.3


@pytest.mark.parametrize("chunk_size", [7, 13, 1000])
@pytest.mark.parametrize("in_batch", [True, False], ids=["retrieval", "clustering"])
def test_gradient_cache_equals_uncached(tiny, chunk_size, in_batch):
    model, tokenizer = tiny
    collate = lambda seqs: f2llm_model.pad(seqs, tokenizer.pad_token_id)
    batch = make_batch(tokenizer, 5, 3, in_batch)  # 25 sequences: 7 and 13 do not divide it
    model.zero_grad()
    ref_loss = uncached_step(model, batch, collate)
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss, hard, ib = f2llm_loss.cached_step(model, batch, collate, chunk_size)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    scale = max(g.abs().max().item() for g in ref.values())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-5 * scale, rtol=1e-4, msg=n)
    assert scale > 0
    model.zero_grad()
