import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, TIMEOUT, by_length, by_tokens, make_batch, uncached_step

import loss as f2llm_loss
import model as f2llm_model
import speed


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
        loss = f2llm_loss.f2llm_loss(*leaves, in_batch, f2llm_loss.Objective(in_batch_grad=in_batch_grad))[0]
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
    loss, hard, ib = f2llm_loss.cached_step(model, batch, collate, by_length(chunk_size), f2llm_loss.Objective(in_batch_grad=grad))
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    scale = max(g.abs().max().item() for g in ref.values())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-5 * scale, rtol=1e-4, msg=n)
    assert scale > 0
    model.zero_grad()


@pytest.mark.parametrize("chunk_tokens,filled", [(40, False), (150, False), (10_000, False), (40, True), (150, True)])
def test_packed_chunks_equal_padded(tiny, chunk_tokens, filled):
    # Sequences packed into one row, attention stopped at their boundaries: the same embeddings and gradients as
    # padded batches (fp32), under the gradient cache, for token budgets that split the batch unevenly or not at all;
    # filled: every row filled up to the budget, as train.py fills them for compiled kernels.
    model, tokenizer = tiny
    pack = lambda seqs: speed.pack(seqs, width=chunk_tokens if filled else None)
    batch = make_batch(tokenizer, 5, 3, True)
    model.zero_grad()
    ref_loss = uncached_step(model, batch, lambda seqs: f2llm_model.pad(seqs, tokenizer.pad_token_id))
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = f2llm_loss.cached_step(model, batch, pack, by_tokens(chunk_tokens))[0]
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    scale = max(g.abs().max().item() for g in ref.values())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-5 * scale, rtol=1e-4, msg=n)
    with torch.no_grad():
        packed = model(*pack(batch["seqs"][:5]))
        padded = model(*f2llm_model.pad(batch["seqs"][:5], tokenizer.pad_token_id))
    total = sum(map(len, batch["seqs"][:5]))
    assert pack(batch["seqs"][:5])[0].shape[1] == (max(chunk_tokens, total) if filled else total)  # sequences longer than it: no filling
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)
    model.zero_grad()


@pytest.mark.parametrize("chunk_tokens", [60, 200, 10_000])
def test_padded_token_chunks_equal_uncached(tiny, chunk_tokens):
    # --chunk-tokens N --padded: padded chunks of as many sequences as N tokens hold counting the padding (a longer
    # sequence alone); the gradient cache gives the uncached loss and gradients whatever the split.
    model, tokenizer = tiny
    batch = make_batch(tokenizer, 5, 3, True)
    chunks = by_tokens(chunk_tokens, padded=True)(batch["seqs"])
    assert sorted(i for c in chunks for i in c) == list(range(len(batch["seqs"])))
    for c in chunks:
        assert len(c) == 1 or len(c) * max(len(batch["seqs"][i]) for i in c) <= chunk_tokens
    assert (len(chunks) == 1) == (chunk_tokens == 10_000)
    collate = lambda seqs: f2llm_model.pad(seqs, tokenizer.pad_token_id)
    model.zero_grad()
    ref_loss = uncached_step(model, batch, collate)
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = f2llm_loss.cached_step(model, batch, collate, by_tokens(chunk_tokens, padded=True))[0]
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    scale = max(g.abs().max().item() for g in ref.values())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-5 * scale, rtol=1e-4, msg=n)
    model.zero_grad()


def test_flex_attention_packed_rows_embed_as_padded(tokenizer):
    # The packed path on GPUs without flash-attn: FlexAttention with the block mask the encoder builds from each
    # sequence's end. Forward only (FlexAttention has no backward on CPU; bench.py --gpu checks its gradient).
    assert speed.attention_implementation("cuda", packed=True) in ("flex_attention", "flash_attention_2")
    assert speed.attention_implementation("cpu", packed=True) == "sdpa"
    model = f2llm_model.load("tiny")[0]  # its own copy: the attention is switched
    batch = make_batch(tokenizer, 5, 3, True)
    with torch.no_grad():
        padded = model(*f2llm_model.pad(batch["seqs"], tokenizer.pad_token_id))
        model.backbone.set_attn_implementation("flex_attention")
        packed = model(*speed.pack(batch["seqs"]))
        filled = model(*speed.pack(batch["seqs"], width=sum(map(len, batch["seqs"])) + 300))  # as train.py fills rows for it
        whole = model(*speed.pack(batch["seqs"][:1] * 2))  # a sequence attending to its copy would move
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)
    torch.testing.assert_close(filled, padded, atol=1e-5, rtol=0)
    torch.testing.assert_close(whole[1], padded[0], atol=1e-5, rtol=0)


def test_compiled_layers_give_the_eager_gradient(tokenizer):
    # train.py --compile: each decoder layer through torch.compile (Inductor, here its CPU backend). The cached step's
    # loss and every gradient are the eager model's (fp32), for padded chunks of changing sizes (dynamic shapes) and
    # for packed rows, which train.py fills to --chunk-tokens: one shape, compiled once, whatever the chunks hold.
    import train
    eager = f2llm_model.load("tiny")[0]
    batches = [make_batch(tokenizer, 5, 3, True), make_batch(tokenizer, 4, 2, True, seed=1)]  # other lengths, other chunks
    for chunks in (dict(chunk_size=7), dict(chunk_tokens=128)):
        args = SimpleNamespace(liger=False, compile=True, precision="fp32", fsdp=False, chunk_tokens=chunks.get("chunk_tokens"), padded=False,
                               chunk_size=chunks.get("chunk_size"))
        compiled = speed.parallelize(f2llm_model.load("tiny")[0], args, 1, 0, torch.device("cpu"))  # same seed, same weights
        chunker = speed.chunker(args, torch.device("cpu"))
        collate, widths, graphs = train.collate_for(args, tokenizer, torch.device("cpu")), set(), []
        def seen(seqs, collate=collate, widths=widths):
            inputs = collate(seqs)
            widths.add(inputs[0].shape[1])
            return inputs
        torch._dynamo.utils.counters.clear()
        for batch in batches:
            (ref_loss, *_), ref = f2llm_loss.cached_step(eager, batch, collate, chunker), {n: p.grad.clone() for n, p in eager.named_parameters()}
            loss = f2llm_loss.cached_step(compiled, batch, seen, chunker)[0]
            torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
            scale = max(g.abs().max().item() for g in ref.values())
            for n, p in compiled.named_parameters():
                torch.testing.assert_close(p.grad, ref[n], atol=1e-5 * scale, rtol=1e-4, msg=n)
            eager.zero_grad()
            compiled.zero_grad()
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        assert graphs[0] > 0 and graphs[1] == graphs[0]  # it compiled, then the other batch needed nothing new
        if "chunk_tokens" in chunks:
            # Every row filled to the budget: two graphs (the no-grad pass, the pass with autograd) for every chunk. Rows
            # of their own lengths would compile a graph per length until dynamo's recompile limit, then run eagerly.
            assert widths == {128} and graphs[-1] == 2, (widths, graphs)
        else:
            assert len(widths) > 2  # padded chunks did change shape


def test_gradient_cache_under_bf16_mixed_precision(tmp_path):
    # FSDP2 with bf16 weights for compute (fp32 masters): the no-grad forward and the re-forward of each chunk embedded
    # twice give identical embeddings, so the cache stays exact; against one plain bf16 pass (other padding, other bf16
    # rounding) every gradient agrees to 2% of the largest.
    torchrun_free = subprocess.run([sys.executable, "tests/precision_worker.py", tmp_path / "bf16.pt"], cwd=ROOT, capture_output=True,
                                   text=True, timeout=TIMEOUT)
    assert torchrun_free.returncode == 0, torchrun_free.stderr[-3000:]
    saved = torch.load(tmp_path / "bf16.pt")
    assert saved["dtype"] == "torch.float32"  # the sharded masters; compute is bf16
    forwards = saved["forwards"]
    # 4 chunks: the first three embedded without autograd, the last with it (once), then the first three again
    assert len(forwards) == 7 and all(torch.equal(a, b) for a, b in zip(forwards[:3], forwards[4:]))
    scale = max(g.abs().max().item() for g in saved["plain"].values())
    for n, g in saved["cached"].items():
        torch.testing.assert_close(g, saved["plain"][n], atol=2e-2 * scale, rtol=0, msg=n)


def test_fsdp_weights_gathered_once_per_step_give_the_same_steps(tmp_path):
    # Under FSDP2 the cached step keeps each layer's gathered weights for the whole step instead of gathering them
    # for every forward and backward of every chunk. Three AdamW steps give bit-identical losses and gradients
    # either way (stale weights after an optimizer step would show), the weights did stay gathered between
    # forwards, and they are back to their shards when the step returns (the optimizer updates the shards).
    done = subprocess.run([sys.executable, "tests/gather_worker.py", tmp_path / "runs.pt"], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    once, default = torch.load(tmp_path / "runs.pt").values()
    assert torch.equal(once["losses"], default["losses"]) and once["losses"][2] < once["losses"][0]
    for n, g in default["grads"].items():
        assert torch.equal(once["grads"][n], g), n
    assert len(once["kept"]) == len(default["kept"]) == 3 * (2 * 4 - 1)  # 3 steps x 2 forwards x 4 chunks, the last embedded once
    assert all(once["kept"]) and not any(default["kept"])
    assert once["sharded_after"] and default["sharded_after"]


# ---- Matryoshka (F2LLM-v2, train.py --matryoshka) -----------------------------------------------------------------

class Accelerator:
    """What v2's loss functions ask of accelerate on one process: gather (a copy without gradient) and the rank."""
    process_index = 0

    @staticmethod
    def gather(x):
        return x.detach().clone()


def v2_inbatch_loss(query_embeddings, context_embeddings, criterion, accelerator, temperature=0.05, use_mrl=False, mrl_dims=None):
    """F2LLM-v2's utils.inbatch_loss, transcribed."""
    def _calculate_loss(q_emb, c_emb, labels):
        a_norm = torch.nn.functional.normalize(q_emb, p=2, dim=-1)
        b_norm_cross_gpus = torch.nn.functional.normalize(c_emb, p=2, dim=-1)
        student_logits = torch.matmul(a_norm, b_norm_cross_gpus.t()) / temperature
        return criterion(student_logits, labels).mean()
    bs = query_embeddings.size(0)
    b_cross_gpus = accelerator.gather(context_embeddings)
    labels = torch.arange(bs, device=b_cross_gpus.device) + bs * accelerator.process_index
    total_loss = 0.0
    dims = (mrl_dims + [query_embeddings.shape[-1]]) if use_mrl else [query_embeddings.shape[-1]]
    d = query_embeddings.shape[-1]
    n = 1
    for dim in sorted(dims)[::-1]:
        if dim > query_embeddings.shape[-1]:
            continue
        total_loss += _calculate_loss(query_embeddings[..., :dim], b_cross_gpus[..., :dim], labels) / (n * math.sqrt(d / dim))
        n += 1
    return total_loss


def v2_hard_loss(query_embeddings, context_embeddings, hard_neg_embeddings, criterion, accelerator, temperature=0.05, use_mrl=False,
                 mrl_dims=None):
    """F2LLM-v2's utils.hard_loss, transcribed."""
    def _calculate_loss(q_emb, passage_emb):
        bs = q_emb.size(0)
        a_norm = torch.nn.functional.normalize(q_emb, p=2, dim=-1)
        hard_norm = torch.nn.functional.normalize(passage_emb, p=2, dim=-1)
        logits = (a_norm.unsqueeze(1) * hard_norm).sum(-1) / temperature
        return criterion(logits, torch.zeros((bs), dtype=torch.long, device=logits.device)).mean()
    total_loss = 0.0
    dims = (mrl_dims + [query_embeddings.shape[-1]]) if use_mrl else [query_embeddings.shape[-1]]
    d = query_embeddings.shape[-1]
    hard_neg_embeddings = torch.concat([context_embeddings.unsqueeze(1), hard_neg_embeddings], dim=1)
    n = 1
    for dim in sorted(dims)[::-1]:
        if dim > query_embeddings.shape[-1]:
            continue
        total_loss += _calculate_loss(query_embeddings[..., :dim], hard_neg_embeddings[..., :dim]) / (n * math.sqrt(d / dim))
        n += 1
    return total_loss


@pytest.mark.parametrize("hidden", [128, 1024])
@pytest.mark.parametrize("in_batch", [True, False], ids=["retrieval", "clustering"])
def test_matryoshka_loss_is_f2llm_v2s(in_batch, hidden):
    # v2 scores the raw hidden states and normalises each truncation; ours takes the normalised embeddings the encoder
    # gives: the same function of the hidden states, so the same value and the same gradient with respect to them.
    torch.manual_seed(0)
    raw = [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in ((6, hidden), (6, hidden), (6, 7, hidden))]
    mrl_dims = [d for d in [2 ** i for i in range(3, 15)] if d < hidden]  # v2's run.py
    criterion = torch.nn.CrossEntropyLoss(reduction="none")
    theirs = v2_hard_loss(*raw, criterion, Accelerator, use_mrl=True, mrl_dims=mrl_dims)
    if in_batch:
        theirs = theirs + v2_inbatch_loss(raw[0], raw[1], criterion, Accelerator, use_mrl=True, mrl_dims=mrl_dims)
    theirs_grads = torch.autograd.grad(theirs, raw)
    objective = f2llm_loss.Objective(dims=f2llm_loss.matryoshka_dims(hidden))
    ours, hard, ib = f2llm_loss.f2llm_loss(*(torch.nn.functional.normalize(x, dim=-1) for x in raw), in_batch, objective)
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(torch.autograd.grad(ours, raw), theirs_grads):
        torch.testing.assert_close(a, b)
    assert (ib == 0) == (not in_batch) and objective.dims[0] == hidden and len(objective.dims) == len(mrl_dims) + 1
    weights = [w for _, w in f2llm_loss.matryoshka(hidden, objective.dims)]
    if hidden == 1024:  # the weights as v2's formula gives them for the 0.6B: 1, 0.354, 0.167, ... summed, not averaged
        assert [round(w, 3) for w in weights] == [1, 0.354, 0.167, 0.088, 0.05, 0.029, 0.018, 0.011] and round(sum(weights), 2) == 1.72


@pytest.mark.parametrize("chunks", ["7 sequences", "13 sequences", "40 tokens packed"])
def test_gradient_cache_equals_uncached_with_matryoshka(tiny, chunks):
    # The cache holds d loss / d embedding of the whole vectors, whatever the loss does with them.
    model, tokenizer = tiny
    batch, dims = make_batch(tokenizer, 5, 3, True), f2llm_loss.matryoshka_dims(128)
    padded = lambda seqs: f2llm_model.pad(seqs, tokenizer.pad_token_id)
    collate, chunker = (speed.pack, by_tokens(40)) if "packed" in chunks else (padded, by_length(int(chunks.split()[0])))
    model.zero_grad()
    ref_loss = uncached_step(model, batch, padded, dims=dims)
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = f2llm_loss.cached_step(model, batch, collate, chunker, f2llm_loss.Objective(dims=dims))[0]
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    scale = max(g.abs().max().item() for g in ref.values())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-5 * scale, rtol=1e-4, msg=n)
    assert ref_loss > uncached_step(model, batch, padded) * 1.3  # the terms of the smaller dimensions are there
    model.zero_grad()
