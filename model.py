"""The F2LLM encoder: a bare Qwen3 decoder whose embedding is the hidden state at an appended EOS.

F2LLM (arXiv 2510.02294, section 2) keeps Qwen3's causal attention and adds no head: a text is tokenized
without special tokens, truncated to max_len - 1, the tokenizer's EOS id is appended, and the final
hidden state (after the last norm) at that EOS is the embedding. Similarity is cosine.

    model, tokenizer = load("0.6b")            # Qwen/Qwen3-0.6B from the hub or its cache
    model, tokenizer = load("tiny")            # small random Qwen3, real vocabulary, no download
    vectors = encode(model, tokenizer, texts, prompt=query_prompt(instruction))
"""
import os

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer, Qwen3Config, Qwen3Model

import builtin
import speed

# The public Qwen3 configs (each checkpoint's config.json). The post-trained checkpoints, not -Base: their
# tokenizer has eos <|im_end|> and pad <|endoftext|>. "tiny" is the same architecture, small enough for 2 CPU cores.
HUB_IDS = {"0.6b": "Qwen/Qwen3-0.6B", "1.7b": "Qwen/Qwen3-1.7B", "4b": "Qwen/Qwen3-4B"}
ARCHITECTURES = {
    "0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128, intermediate_size=3072),
    "1.7b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128, intermediate_size=6144),
    "4b": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=9728),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=384),
}
QWEN3_COMMON = dict(vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                    tie_word_embeddings=True, attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645)


def query_prompt(instruction):
    """F2LLM's query prompt; documents get none."""
    return f"Instruct: {instruction}\nQuery: "


def load(name="tiny", random_init=False, device="cpu", seed=0, packed=False):
    """Returns (Encoder, tokenizer). `name`: a size preset, a local Hugging Face folder or a hub id; `packed`: the
    attention for packed rows (train.py --chunk-tokens)."""
    attn = speed.attention_implementation(device, packed)
    if name in ARCHITECTURES and (random_init or name == "tiny"):
        config = Qwen3Config(**ARCHITECTURES[name], **QWEN3_COMMON)
        config._attn_implementation = attn
        with torch.random.fork_rng(), torch.device(device):  # built where it runs: a 4B initialises in seconds on a GPU
            torch.manual_seed(seed)
            backbone = Qwen3Model(config)
        tokenizer = builtin.qwen3_tokenizer()
    else:
        path = HUB_IDS.get(name, name)
        backbone = AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{name}: the tokenizer has no EOS token, which F2LLM pools")
    return Encoder(backbone).to(device), tokenizer


def tokenize(tokenizer, texts, max_len):
    """Token ids without special tokens, truncated to max_len - 1, then EOS: every sequence ends in EOS."""
    ids = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_len - 1)["input_ids"]
    return [x + [tokenizer.eos_token_id] for x in ids]


def pad(seqs, pad_id, side="right", device="cpu"):
    """Batch token lists: (input_ids, attention_mask). The mask comes from the lengths, never from comparing ids with
    pad_id: with an eos that equals pad (Qwen3-Base, Qwen3-Embedding) that would mask the very EOS that is pooled.
    None when no sequence is padded: attention then takes the plain causal kernel."""
    width = max(len(s) for s in seqs)
    if all(len(s) == width for s in seqs):
        return speed.to_device(torch.tensor(seqs, dtype=torch.long), device), None
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        input_ids[i, span] = torch.tensor(s)
        attention_mask[i, span] = 1
    return speed.to_device(input_ids, device), speed.to_device(attention_mask, device)


class Encoder(nn.Module):
    """Qwen3Model -> hidden state at the last real token -> L2-normalised float32 embedding."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids, attention_mask=None, position_ids=None, ends=None):
        """A padded batch (pad): one embedding per row. Sequences packed into one row (speed.pack) come with their
        own position_ids and ends (each sequence's last index): one embedding per sequence."""
        n, width = input_ids.shape
        packed = ends is not None
        if not packed:
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # real tokens only: left and right padding give the same angles
            ends = width - 1 - mask.flip(1).int().argmax(1)  # the last real token, the appended EOS
        masks = speed.masks_for(self.backbone, attention_mask, ends, packed, width)  # causal, and never across sequences
        hidden = self.backbone(input_ids=input_ids, attention_mask=masks, position_ids=position_ids, use_cache=False).last_hidden_state
        at = torch.arange(n, device=ends.device) * width + ends  # row r at ends[r]; a packed row (n = 1): each sequence's end
        return F.normalize(hidden.flatten(0, 1)[at].float(), dim=-1)


@torch.no_grad()
def encode(model, tokenizer, texts, prompt=None, max_len=512, batch_size=32):
    """Embeddings of `texts` (prompt prepended), float32 on CPU, in input order. Batches by length; a progress bar on
    rank 0 in a terminal."""
    device = next(model.parameters()).device
    seqs = tokenize(tokenizer, [(prompt or "") + t for t in texts], max_len)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = torch.empty(len(seqs), model.backbone.config.hidden_size)
    was_training = model.training
    model.eval()
    bar = None if os.environ.get("RANK", "0") == "0" else True  # tqdm: None shows it in a terminal only
    for start in tqdm(range(0, len(order), batch_size), desc="encode", disable=bar, leave=False):
        idx = order[start:start + batch_size]
        with speed.autocast(device):
            out[idx] = model(*pad([seqs[i] for i in idx], tokenizer.pad_token_id, device=device)).cpu()
    model.train(was_training)
    return out
