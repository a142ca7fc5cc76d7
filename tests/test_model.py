import torch
from conftest import ROOT  # noqa: F401  (puts the project on sys.path)

import model as f2llm_model


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
