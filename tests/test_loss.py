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


@pytest.mark.parametrize("in_batch_grad", [False, True])
def test_in_batch_term_trains_the_queries_only_unless_asked(in_batch_grad):
    # The released recipe: the gathered positives are a copy without gradient, so the in-batch term moves the
    # queries only; with in_batch_grad it moves the positives too. The loss value is the same either way.
    torch.manual_seed(0)
    q, p, negs = unit(6, 16), unit(6, 16), unit(6, 7, 16)
    grads = {}
    for in_batch in (True, False):
        leaves = [x.clone().requires_grad_() for x in (q, p, negs)]
        loss = f2llm_loss.f2llm_loss(*leaves, in_batch, in_batch_grad=in_batch_grad)[0]
        loss.backward()
        grads[in_batch] = [x.grad for x in leaves]
        if in_batch:
            torch.testing.assert_close(loss, reference_loss(q, p, negs, True))
    in_batch_term = [a - b for a, b in zip(grads[True], grads[False])]  # gradient of the in-batch term alone
    assert in_batch_term[0].abs().max() > 1e-3 and in_batch_term[2].abs().max() == 0
    assert (in_batch_term[1].abs().max() > 1e-3) == in_batch_grad


def test_loss_of_random_embeddings_is_near_chance():
    # Orthogonal-ish embeddings: each term is about log(number of candidates).
    torch.manual_seed(0)
    q, p, negs = unit(64, 4096), unit(64, 4096), unit(64, 7, 4096)
    _, hard, ib = f2llm_loss.f2llm_loss(q, p, negs, True)
    assert abs(hard.item() - math.log(8)) < 0.3 and abs(ib.item() - math.log(64)) < 0.3


@pytest.mark.parametrize("chunk_size", [7, 13, 1000])
@pytest.mark.parametrize("kind", ["retrieval", "retrieval-grad", "clustering"])
def test_gradient_cache_equals_uncached(tiny, chunk_size, kind):
    model, tokenizer = tiny
    collate = lambda seqs: f2llm_model.pad(seqs, tokenizer.pad_token_id)
    batch = make_batch(tokenizer, 5, 3, kind != "clustering")  # 25 sequences: 7 and 13 do not divide it
    grad = kind == "retrieval-grad"
    model.zero_grad()
    ref_loss = uncached_step(model, batch, collate, in_batch_grad=grad)
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss, hard, ib = f2llm_loss.cached_step(model, batch, collate, chunk_size, in_batch_grad=grad)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    scale = max(g.abs().max().item() for g in ref.values())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-5 * scale, rtol=1e-4, msg=n)
    assert scale > 0
    model.zero_grad()
