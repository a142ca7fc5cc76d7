import pytest
import torch
from conftest import ROOT  # noqa: F401  (puts the project on sys.path)

import loss as f2llm_loss
import model as f2llm_model
import speed


def test_real_qwen3_vocabulary(tokenizer):
    # Known ids of the Qwen2/2.5/3 BPE; eos <|im_end|> and pad <|endoftext|> as in the post-trained checkpoints.
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    assert tokenizer("Hello world 12345 café", add_special_tokens=False)["input_ids"] == [9707, 1879, 220, 16, 17, 18, 19, 20, 51950]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (151645, 151643)
    assert tokenizer.convert_tokens_to_ids(["<think>", "</think>"]) == [151667, 151668]


def test_eos_appended_after_truncation(tokenizer):
    seqs = f2llm_model.tokenize(tokenizer, ["one two three four five six seven eight nine ten", "hi"], max_len=5)
    assert [len(s) for s in seqs] == [5, 2]
    assert all(s[-1] == tokenizer.eos_token_id for s in seqs)
    full = tokenizer("one two three four five six seven eight nine ten", add_special_tokens=False)["input_ids"]
    assert seqs[0][:4] == full[:4]


def test_left_and_right_padding_give_the_same_embedding(tiny):
    model, tokenizer = tiny
    seqs = f2llm_model.tokenize(tokenizer, ["short", "a somewhat longer text with many more tokens than the first", "mid size text"], 64)
    with torch.no_grad():
        right = model(*f2llm_model.pad(seqs, tokenizer.pad_token_id, "right"))
        left = model(*f2llm_model.pad(seqs, tokenizer.pad_token_id, "left"))
        alone = torch.cat([model(*f2llm_model.pad([s], tokenizer.pad_token_id)) for s in seqs])
    torch.testing.assert_close(right, left, atol=1e-5, rtol=0)
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(right.norm(dim=1), torch.ones(3))


def test_pooling_is_right_when_eos_equals_pad(tiny):
    # -Base and Qwen3-Embedding tokenizers use one id for eos and pad: pooling must still take the appended EOS.
    model, tokenizer = tiny
    eos = tokenizer.eos_token_id
    seqs = [[9707, 1879, eos], [9707, eos]]
    with torch.no_grad():
        same = model(*f2llm_model.pad(seqs, pad_id=eos))
        other = model(*f2llm_model.pad(seqs, pad_id=tokenizer.pad_token_id))
        alone = model(*f2llm_model.pad(seqs[1:], pad_id=eos))
    torch.testing.assert_close(same, other, atol=1e-6, rtol=0)
    torch.testing.assert_close(same[1:], alone, atol=1e-6, rtol=0)


def test_encode_keeps_input_order_and_prompt(tiny):
    model, tokenizer = tiny
    texts = ["a long text " * 5, "b", "medium text here"]
    out = f2llm_model.encode(model, tokenizer, texts, batch_size=2)
    with torch.no_grad():
        ref = torch.cat([model(*f2llm_model.pad(f2llm_model.tokenize(tokenizer, [t], 512), tokenizer.pad_token_id)) for t in texts])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    prompted = f2llm_model.encode(model, tokenizer, ["b"], prompt=f2llm_model.query_prompt("find it"))
    with torch.no_grad():
        ref = model(*f2llm_model.pad(f2llm_model.tokenize(tokenizer, ["Instruct: find it\nQuery: b"], 512), tokenizer.pad_token_id))
    torch.testing.assert_close(prompted, ref, atol=1e-5, rtol=0)


def test_size_presets_have_qwen3_parameter_counts():
    counts = {}
    for size in ("0.6b", "1.7b", "4b"):
        config = f2llm_model.Qwen3Config(**f2llm_model.ARCHITECTURES[size], **f2llm_model.QWEN3_COMMON)
        with torch.device("meta"):
            counts[size] = sum(p.numel() for p in f2llm_model.Qwen3Model(config).parameters())
    assert counts == {"0.6b": 596_049_920, "1.7b": 1_720_574_976, "4b": 4_022_468_096}


def transformers_way(model, input_ids, attention_mask=None, position_ids=None, ends=None):
    """The embedding with the mask transformers builds itself from the 2D mask or the packed position ids."""
    if ends is None:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        position_ids, rows = (mask.cumsum(1) - 1).clamp(min=0), torch.arange(len(input_ids))
        ends = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)
        hidden = model.backbone(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False).last_hidden_state
    else:
        rows = torch.zeros_like(ends)
        hidden = model.backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    return torch.nn.functional.normalize(hidden[rows, ends].float(), dim=-1)


@pytest.mark.parametrize("attention", ["sdpa", "flex_attention"])
def test_own_attention_masks_give_transformers_embeddings(tokenizer, attention):
    # The encoder builds its masks from lengths it knows (no read back from the device); each real token must
    # see exactly what transformers' own mask shows it: right and left padding, none, packed rows. FlexAttention
    # forward only (no backward on CPU).
    model = f2llm_model.load("tiny")[0]  # its own copy: the attention is switched
    model.backbone.set_attn_implementation(attention)
    seqs = f2llm_model.tokenize(tokenizer, ["short", "a somewhat longer text with many more tokens than the first " * 12,
                                            "mid size text"], 512)
    inputs = [f2llm_model.pad(seqs, tokenizer.pad_token_id, "right"), f2llm_model.pad(seqs, tokenizer.pad_token_id, "left"),
              f2llm_model.pad([seqs[1][:6], seqs[1][6:12]], tokenizer.pad_token_id), speed.pack(seqs)]
    assert inputs[2][1] is None  # nothing padded: no mask, the plain causal kernel
    with torch.no_grad():
        for args in inputs:
            torch.testing.assert_close(model(*args), transformers_way(model, *args), atol=1e-6, rtol=0)


def test_a_forward_and_backward_never_read_the_device_back(tokenizer):
    # A host sync per forward lets the GPU drain while the host is still issuing the next kernels. On the meta
    # device a tensor has no values, so anything that reads one back (.item(), a tensor's truth value) raises: the
    # whole cached step, padded and packed chunks, runs there. transformers' own mask creation does read back.
    config = f2llm_model.Qwen3Config(**f2llm_model.ARCHITECTURES["tiny"], **f2llm_model.QWEN3_COMMON)
    config._attn_implementation = "sdpa"
    meta = torch.device("meta")
    with meta:
        model = f2llm_model.Encoder(f2llm_model.Qwen3Model(config))
    batch = dict(seqs=f2llm_model.tokenize(tokenizer, [f"text {i} " * (1 + i % 5) for i in range(12)], 64), n_queries=3,
                 n_negatives=2, in_batch=True)
    f2llm_loss.cached_step(model, batch, lambda s: f2llm_model.pad(s, tokenizer.pad_token_id, device=meta), lambda s: speed.chunk_by_length(s, 4))
    f2llm_loss.cached_step(model, batch, lambda s: speed.pack(s, meta), lambda s: speed.chunk_by_tokens(s, 40, meta))
    docs = torch.zeros(1, 300, dtype=torch.long, device=meta)
    assert type(speed.attention_masks("flex_attention", docs, None, 300, meta)["full_attention"]).__name__ == "BlockMask"
    with pytest.raises(RuntimeError, match="meta"):
        transformers_way(model, *f2llm_model.pad(batch["seqs"][:4], tokenizer.pad_token_id, device=meta))
    with pytest.raises(RuntimeError, match="meta"):
        transformers_way(model, *speed.pack(batch["seqs"][:4], meta))
