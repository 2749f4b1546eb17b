"""Llama, the base model that LoRA adapts and S-LoRA serves.

The architecture (Touvron et al. 2023) as in Hugging Face's LlamaForCausalLM, with the same module
names so that checkpoints load by name and LoRA adapter keys are the standard PEFT ones:
RMSNorm, rotary position embedding (RoPE), grouped-query attention (GQA), SwiGLU MLP.

Two forward passes share the same modules:
- `forward(tokens [B, T])`: dense and causal, for training and for `generate` (contiguous KV cache);
- `forward_paged(batch, pool)`: S-LoRA's ragged batch (section 5): the tokens of many requests,
  prefill and decode mixed, with K/V in pages of the unified pool (attention.py) and a per-token
  LoRA delta supplied by the serving engine (engine.py).

Checkpoints and the tokenizer are read and written by checkpoints.py.
Simplified: no KV-cache quantization, no sliding-window attention.
Demo: `python checkpoints.py --prompt "The capital of France is"` loads SmolLM2 into this model.

Letters (the README's glossary): B batch rows, T tokens per row, n keys (cached positions),
N tokens of a ragged batch, R requests, H model dim, nh query heads, nkv key/value heads,
hd head dim, g = nh // nkv, V vocabulary, L layers, P pool pages.
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import attention

# ------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class RopeScaling:
    """RoPE stretched to contexts longer than pre-training (on its frequencies: rope_inv_freq).
    linear: every frequency / factor (position interpolation, Chen et al. 2023);
    llama3: Llama 3.1's rule: wavelengths above original_max_len / low_freq_factor are divided by
    factor, those below original_max_len / high_freq_factor kept, the band between blended."""
    kind: str                       # "linear" or "llama3"
    factor: float
    low_freq_factor: float = 1.0    # llama3 only
    high_freq_factor: float = 4.0   # llama3 only
    original_max_len: int = 8192    # llama3 only: the pre-training context


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
    head_dim: Optional[int] = None   # hd; None: dim // n_heads
    qkv_bias: bool = False       # biases on q, k, v (Qwen2; Llama's attention_bias)
    o_bias: bool = False         # bias on o (Llama's attention_bias)
    mlp_bias: bool = False       # biases on gate, up, down
    rope_scaling: Optional[RopeScaling] = None
    name: Optional[str] = None   # the checkpoint's name (HF directory, GGUF general.name): metadata

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @staticmethod
    def tiny(vocab_size: int = 259, **kw) -> "ModelConfig":
        """A few-layer model with the same structure, for tests (259 = byte tokenizer)."""
        base = dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=vocab_size, ffn_dim=96,
                    max_seq_len=512, tie_embeddings=False)
        return ModelConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------ modules


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):  # x / sqrt(mean(x^2) + eps) * w, computed in float32
        xf = x.float()
        rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * rms).to(x.dtype) * self.weight


def rope_inv_freq(head_dim, theta, scaling: Optional[RopeScaling] = None):
    """RoPE's frequencies theta^(-2i/hd), i < hd/2 [hd/2], stretched as `scaling` says."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)    # [hd/2]
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    wavelen = 2 * math.pi / inv_freq                                   # llama3
    long_wave = scaling.original_max_len / scaling.low_freq_factor     # above: slow, stretched
    short_wave = scaling.original_max_len / scaling.high_freq_factor   # below: fast, kept
    lo, hi = scaling.low_freq_factor, scaling.high_freq_factor
    smooth = (scaling.original_max_len / wavelen - lo) / (hi - lo)    # 0: long_wave, 1: short_wave
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    return torch.where(wavelen > long_wave, inv_freq / scaling.factor,
                       torch.where(wavelen < short_wave, inv_freq, blended))


def rope_cos_sin(positions, head_dim, theta, scaling: Optional[RopeScaling] = None):
    """RoPE (Su et al. 2021) angles m * theta^(-2i/hd) for positions m: cos, sin [..., hd]."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)                        # [hd/2]
    angles = positions.float()[..., None] * inv_freq.to(positions.device)      # [..., hd/2]
    angles = torch.cat([angles, angles], dim=-1)                               # [..., hd]
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+hd/2}) by their position's angle (Hugging Face's half layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


def project(linear, x, lora, layer, name, reduce=None):
    """Base projection x W^T, plus the serving engine's per-token LoRA delta when one is given.
    `reduce`: set by tensor parallelism (tp.py) on row-parallel layers, the all-reduce of the
    partial sums; it comes after the delta, so the base all-reduce carries the LoRA output too
    (S-LoRA section 6)."""
    y = linear(x)
    delta = lora(x, layer, name) if lora is not None else None
    y = y if delta is None else y + delta
    return y if reduce is None else reduce(y)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)
        self.all_reduce: Optional[Callable] = None   # tp.py: sums o_proj's partial outputs

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        """x [B, T, H]; cos, sin [B, 1, T, hd]; mask [B, 1, T, n] (True = may attend)."""
        c, (B, T, _) = self.cfg, x.shape
        q = self.q_proj(x).view(B, T, c.n_heads, c.head_dim).transpose(1, 2)     # [B, nh, T, hd]
        k = self.k_proj(x).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)  # [B, nkv, T, hd]
        v = self.v_proj(x).view(B, T, c.n_kv_heads, c.head_dim).transpose(1, 2)  # [B, nkv, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(layer, k, v)                                       # [B, nkv, n, hd]
        # grouped-query attention: K/V head j serves query heads j g .. j g + g - 1 (g = nh / nkv),
        # read in place (enable_gqa) rather than copied g times
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           enable_gqa=c.n_heads != c.n_kv_heads)   # [B, nh, T, hd]
        o = o.transpose(1, 2).reshape(B, T, -1)                                    # [B, T, nh hd]
        return project(self.o_proj, o, None, layer, "o_proj", self.all_reduce)

    def kv_pool(self, pool_l):
        """The part of each page this layer's K/V use: g = nh / nkv tokens of kv_dim numbers (all
        H numbers, or this device's heads under tensor parallelism)."""
        return pool_l[:, :self.cfg.n_heads // self.cfg.n_kv_heads * self.cfg.kv_dim]

    def forward_paged(self, x, cos, sin, pool_l, layer, lora, plan: attention.AttentionPlan):
        """x [N, H]: write this step's K/V into the pool pages, attend over each request's pages
        (the step's plan: paged_attention_plan, made once for every layer)."""
        c, N = self.cfg, x.shape[0]
        q = project(self.q_proj, x, lora, layer, "q_proj").view(N, c.n_heads, c.head_dim)
        k = project(self.k_proj, x, lora, layer, "k_proj").view(N, c.n_kv_heads, c.head_dim)
        v = project(self.v_proj, x, lora, layer, "v_proj")                          # [N, kv_dim]
        q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
        kv_pool = self.kv_pool(pool_l)
        attention.paged_attention_write(kv_pool, k.reshape(N, c.kv_dim), v, plan)
        o = attention.paged_attention(q, kv_pool, plan)                               # [N, nh, hd]
        return project(self.o_proj, o.reshape(N, -1), lora, layer, "o_proj", self.all_reduce)  # [N, H]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=cfg.mlp_bias)
        self.all_reduce: Optional[Callable] = None   # tp.py: sums down_proj's partial outputs

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
    """Contiguous K/V buffers for batched generation: k, v [L, B, nkv, n_max, hd]."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype, device):
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0   # tokens stored (advanced by Llama.forward after all layers)

    def append(self, layer, k, v):  # k, v [B, nkv, T, hd] -> all keys so far [B, nkv, n, hd]
        s, T = self.length, k.shape[2]
        self.k[layer, :, :, s:s + T], self.v[layer, :, :, s:s + T] = k, v
        return self.k[layer, :, :, :s + T], self.v[layer, :, :, :s + T]


@dataclass
class Batch:
    """One serving step, built by engine.py: the tokens of R requests concatenated (N in all)."""
    tokens: torch.Tensor       # [N] token ids
    positions: torch.Tensor    # [N] position of each token in its request
    seq_ids: torch.Tensor      # [N] row of block_table that each token belongs to
    block_table: torch.Tensor  # [R, max_blocks, 2] int32: (K page, V page) of each g-token block
    seq_lens: torch.Tensor     # [R] tokens in each request's cache after this step
    last_index: torch.Tensor   # [R] index in N of each request's last token (logits returned)


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

    def forward(self, tokens, positions=None, cache: Optional[KVCache] = None, key_mask=None,
                select=None):
        """tokens [B, T] -> logits [B, T, V]. key_mask [B, n]: False for padding keys.
        select [B, T] bool: logits [M, V] of the M selected positions only (training scores
        targets; lm_head is a fifth of the model's multiply-adds, so prompt positions are skipped)."""
        c, (B, T) = self.config, tokens.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        q_idx = torch.arange(start, start + T, device=tokens.device)
        k_idx = torch.arange(start + T, device=tokens.device)
        mask = (k_idx[None, :] <= q_idx[:, None])[None, None]                # causal [1, 1, T, n]
        if key_mask is not None:  # a query always sees itself, so padded rows stay finite
            mask = mask & key_mask[:, None, None, :start + T] | (k_idx[None, :] == q_idx[:, None])
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, c.rope_scaling)  # [B, T, hd]
        cos, sin = cos[:, None], sin[:, None]                                # [B, 1, T, hd]
        x = self.model.embed_tokens(tokens)                                  # [B, T, H]
        for i, layer in enumerate(self.model.layers):
            x = x + layer.self_attn(layer.input_layernorm(x), cos, sin, mask, cache, i)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        if cache is not None:
            cache.length += T
        return self.lm_head(self.model.norm(x if select is None else x[select]))

    def forward_paged(self, batch: Batch, pool, lora: Optional[Callable] = None):
        """S-LoRA's ragged step: a batch of N tokens, pool [L, P, H] -> logits [R, V] of the
        requests' last tokens."""
        c, attn = self.config, self.model.layers[0].self_attn   # every layer's attention alike
        plan = attention.paged_attention_plan(attn.kv_pool(pool[0]), batch.block_table, batch.seq_ids,
                                            batch.positions, attn.cfg.n_kv_heads, c.head_dim)
        cos, sin = rope_cos_sin(batch.positions, c.head_dim, c.rope_theta, c.rope_scaling)  # [N, hd]
        x = self.model.embed_tokens(batch.tokens)                                         # [N, H]
        for i, layer in enumerate(self.model.layers):
            h = layer.input_layernorm(x)
            x = x + layer.self_attn.forward_paged(h, cos, sin, pool[i], i, lora, plan)
            x = x + layer.mlp(layer.post_attention_layernorm(x), lora, i)
        return self.lm_head(self.model.norm(x[batch.last_index]))                         # [R, V]

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, eos_id=None, temperature=0.0, seed=0):
        """Batched sampling with a KV cache; prompts are left-padded. Returns the new tokens."""
        B, T0 = len(prompts), max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0 or T0 + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompts must be non-empty and fit max_seq_len="
                             f"{self.config.max_seq_len} with {max_new_tokens} new tokens (longest prompt: {T0})")
        device = self.lm_head.weight.device
        tokens = torch.zeros(B, T0, dtype=torch.long, device=device)
        key_mask = torch.ones(B, T0 + max_new_tokens, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            tokens[i, T0 - len(p):] = torch.tensor(p)
            key_mask[i, :T0 - len(p)] = False
        positions = (key_mask[:, :T0].cumsum(1) - 1).clamp(min=0)          # pads do not count
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


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its next token (OpenAI's fields): greedy at temperature 0; else the
    top_k most likely tokens, then the smallest set whose probability reaches top_p (nucleus),
    renormalised, sampled with the request's own generator (seeded: the same text whatever else
    shares its batch)."""
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    seed: Optional[int] = None

    def check(self) -> Optional[str]:
        """The reason these parameters are invalid, or None."""
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            return f"temperature must be a finite number >= 0, got {self.temperature!r}"
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            return f"top_p must be in (0, 1], got {self.top_p!r}"
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            return f"top_k must be a positive integer, got {self.top_k!r}"
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -2 ** 63 <= self.seed < 2 ** 64):   # torch's seed range
            return f"seed must be an integer in [-2**63, 2**64), got {self.seed!r:.40}"
        return None


def sample_one(logits, params: SamplingParams, generator: Optional[torch.Generator] = None) -> int:
    """One request's next token from its logits [V]."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)           # [V]
    if params.top_k is not None and params.top_k < probs.numel():
        kth = probs.topk(params.top_k).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if params.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < params.top_p * sorted_p.sum()       # mass before < p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
