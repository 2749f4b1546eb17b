"""S-LoRA kernels: batched LoRA for many adapters, and paged attention, over one page pool.

S-LoRA (Sheng et al. 2023, arXiv 2311.03285) serves many adapters from one batch. Section 4
(Unified Paging) keeps the KV cache and the adapter weights in one pool of pages of H numbers;
section 5 computes the LoRA part of each projection beside the base GEMM with two gathered
kernels that read the adapter weights straight from those non-contiguous pages:

    y = x W + scale[a] * (x A[a]) B[a]           a = adapter slot of the token
    shrink   z[t, :r_a] = x[t] . A[a]^T           A[a]   [r_a, H]
    expand   y[t]      += scale[a] * z[t, :r_a] . B[a]^T    (B stored as B^T [r_a, O])

MBGMV is the decode shape (one token per request, any adapter per token); MBGMM the prefill
shape (segments of tokens that share an adapter). Tokens of slot 0 (rank 0, the base model)
get exact zeros, so base-model requests mix freely with adapted ones in a batch.

Pool layout, defined here once (paging.py allocates it, model.py and these kernels read it):

    pool [L, P, H]: allocating page p reserves pool[l, p, :] in every layer l; pool[l] is [P, H].
                 <------------------------------- H numbers ------------------------------->
    page 17   | K tok 0 of req 2 | K tok 1 of req 2 | K tok 2 of req 2 |  kv_dim each, g = H/kv_dim
    page  4   | V tok 0 of req 2 | V tok 1 of req 2 | V tok 2 of req 2 |  block_table[2, 0] = (17, 4)
    page  9   | row j of A (q_proj of adapter 5)                       |  A [r, H]: r pages
    page 30   | column j of B (q_proj), o_proj likewise                |  B^T [r, H]: r pages
    page 12   | column j of B (v_proj) | unused: H - kv_dim numbers    |  B^T [r, kv_dim]: r pages
    (pages of any owner lie anywhere, in any order)

KV element (token slot s < g, kv head h, dim d) of a page sits at s*kv_dim + h*D + d. With GQA
(g = n_heads / n_kv_heads) a page holds the K (or V) of g tokens, so a KV page wastes nothing;
one token per page would leave 1 - 1/g of it empty (2/3 for SmolLM2, g = 3). The price is on the
adapter side: the B^T pages of k_proj/v_proj use kv_dim of their H numbers and waste the rest.
Adapter slot s of one target: A rows are pages page_ids[a_start[s] + j], B^T rows are pages
page_ids[b_start[s] + j], j < ranks[s]; scales[s] = alpha / r.

Shape letters: N tokens, H pool width (model dim), P pages, S adapter slots, r rank of one adapter,
Rm max_rank, O out_dim, G segments, T tokens of one segment, R requests, MB blocks per request,
nh query heads, nkv KV heads, D head dim, g tokens per page, n cached positions.

Each Triton kernel sits beside plain-PyTorch references `name_ref` that take the same arguments
as the public `name`. The public function checks its arguments (index ranges in one host sync),
allocates the output and runs the kernel on a GPU and the reference on a CPU; use_triton=True
runs the kernel on a CPU too when TRITON_INTERPRET=1 was set before triton was imported (the
tests do this). The server checks a step's tables once (plan_lora) and runs all L layers through
lora_apply: the two kernels on a GPU; on a CPU one pair of matrix products per run of tokens that
share an adapter, on views of the pool rows (an adapter's pages are allocated together, so in
place) - the same bytes a kernel reads. Simplified: prefill attention runs one program per query
token (no tiling of queries as in FlashAttention); tiles are multiplied in float32 (no tensor
cores), which is cheap next to the base GEMM because r << H.
Demo: `python kernels.py --small` times the gathered kernels against the padded-bmm baseline
and a per-token loop.
"""
import argparse
import math
import os
import time
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # triton.jit reads it when decorating


# ---------------------------------------------------------------- LoRA: shrink z = x A^T, expand
# Both kernels work on segments: tokens seg_starts[G]..seg_starts[G+1]-1 share adapter slot
# seg_adapter[G]. Prefill (MBGMM) launches BLOCK_T = 16 tokens of a segment per program, so each
# adapter tile read from the pool serves 16 tokens in a small matrix product; decode (MBGMV)
# makes every token its own segment and launches BLOCK_T = 1, a vector-matrix product.
@triton.jit
def _shrink_kernel(x_ptr, pool_ptr, page_ids_ptr, a_start_ptr, ranks_ptr, seg_starts_ptr,
                   seg_adapter_ptr, z_ptr, H, max_rank, stride_x, stride_pool, stride_z,
                   BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program (seg, k, i): z for the k-th BLOCK_T tokens of segment seg and the BLOCK_R rank
    rows of block i (rows past the adapter's rank, up to max_rank, get zeros)."""
    seg = tl.program_id(0)
    t = tl.load(seg_starts_ptr + seg) + tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = t < tl.load(seg_starts_ptr + seg + 1)
    j = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    a = tl.load(seg_adapter_ptr + seg)
    rank = tl.load(ranks_ptr + a)
    row_ok = j < rank
    a0 = tl.load(a_start_ptr + a)
    pages = tl.load(page_ids_ptr + a0 + j, mask=row_ok, other=0).to(tl.int64)  # rows j of A[a]
    acc = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
    h_end = tl.where(tl.program_id(2) * BLOCK_R < rank, H, 0)   # no live row: skip the loop
    for h0 in range(0, h_end, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        X = tl.load(x_ptr + t[:, None] * stride_x + h[None, :],
                    mask=tok_ok[:, None] & (h[None, :] < H), other=0.0).to(tl.float32)  # [BT, BH]
        A = tl.load(pool_ptr + pages[:, None] * stride_pool + h[None, :],
                    mask=row_ok[:, None] & (h[None, :] < H), other=0.0).to(tl.float32)  # [BR, BH]
        if BLOCK_T == 1:
            acc += tl.sum(X[:, None, :] * A[None, :, :], axis=2)   # [1, 1, BH] * [1, BR, BH]
        else:
            acc = tl.dot(X, tl.trans(A), acc, input_precision="ieee")  # [BT, BH] @ [BH, BR]
    tl.store(z_ptr + t[:, None] * stride_z + j[None, :], acc,
             mask=tok_ok[:, None] & (j[None, :] < max_rank))


@triton.jit
def _expand_kernel(z_ptr, pool_ptr, page_ids_ptr, b_start_ptr, ranks_ptr, scales_ptr,
                   seg_starts_ptr, seg_adapter_ptr, out_ptr, out_dim, stride_z, stride_pool,
                   stride_out, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr):
    """Program (seg, k, i): delta for the k-th BLOCK_T tokens of segment seg, BLOCK_O outputs."""
    seg = tl.program_id(0)
    t = tl.load(seg_starts_ptr + seg) + tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = t < tl.load(seg_starts_ptr + seg + 1)
    o = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)
    a = tl.load(seg_adapter_ptr + seg)
    rank = tl.load(ranks_ptr + a)
    b0 = tl.load(b_start_ptr + a)
    acc = tl.zeros([BLOCK_T, BLOCK_O], dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):    # rank 0 (base model): no iteration, zeros stored
        j = r0 + tl.arange(0, BLOCK_R)
        row_ok = j < rank
        pages = tl.load(page_ids_ptr + b0 + j, mask=row_ok, other=0).to(tl.int64)
        Z = tl.load(z_ptr + t[:, None] * stride_z + j[None, :],
                    mask=tok_ok[:, None] & row_ok[None, :], other=0.0)                # [BT, BR]
        Bt = tl.load(pool_ptr + pages[:, None] * stride_pool + o[None, :],
                     mask=row_ok[:, None] & (o[None, :] < out_dim), other=0.0).to(tl.float32)
        if BLOCK_T == 1:
            acc += tl.sum(Z[:, :, None] * Bt[None, :, :], axis=1)   # [1, BR, 1] * [1, BR, BO]
        else:
            acc = tl.dot(Z, Bt, acc, input_precision="ieee")      # [BT, BR] @ [BR, BO]
    acc = acc * tl.load(scales_ptr + a)
    tl.store(out_ptr + t[:, None] * stride_out + o[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=tok_ok[:, None] & (o[None, :] < out_dim))


def _rows(page_list, start, r):
    """Index of the r pool rows on pages page_list[start:start + r]: a slice (pool_l[rows] is a view)
    when those pages are consecutive, as the pool allocates an adapter's pages, else the page list
    (pool_l[rows] is a gathered copy)."""
    first = page_list[start]
    run = page_list[start:start + r]
    return slice(first, first + r) if run == list(range(first, first + r)) else run


def lora_shrink_segments_ref(x, pool_l, page_ids, a_start, ranks, seg_starts, seg_adapter,
                             max_rank):
    """MBGMM: z[t, :r_a] = x[t] A[a]^T for the tokens t of each segment (adapter a), one matmul
    per segment with A's rows gathered from their pages; zeros past r_a and for rank 0."""
    z = torch.zeros(x.shape[0], max_rank, dtype=torch.float32, device=x.device)
    pages, bounds, starts, rank_of = page_ids.tolist(), seg_starts.tolist(), a_start.tolist(), ranks.tolist()
    for i, a in enumerate(seg_adapter.tolist()):
        r, t0, t1 = rank_of[a], bounds[i], bounds[i + 1]
        if r and t1 > t0:
            A = pool_l[_rows(pages, starts[a], r)]                                   # [r, H]
            z[t0:t1, :r] = x[t0:t1].float() @ A.float().T                           # [T, H] @ [H, r]
    return z


def lora_expand_segments_ref(z, pool_l, page_ids, b_start, ranks, scales, seg_starts, seg_adapter,
                             out_dim):
    """MBGMM: delta[t] = scale[a] z[t, :r_a] B[a]^T, B^T's rows gathered from their pages."""
    delta = torch.zeros(z.shape[0], out_dim, dtype=torch.float32, device=z.device)
    pages, bounds, starts, rank_of = page_ids.tolist(), seg_starts.tolist(), b_start.tolist(), ranks.tolist()
    for i, a in enumerate(seg_adapter.tolist()):
        r, t0, t1 = rank_of[a], bounds[i], bounds[i + 1]
        if r and t1 > t0:
            Bt = pool_l[_rows(pages, starts[a], r)][:, :out_dim]                     # [r, O]
            delta[t0:t1] = scales[a] * (z[t0:t1, :r] @ Bt.float())                   # [T, r] @ [r, O]
    return delta.to(pool_l.dtype)


def _as_segments(adapter_ids):
    """MBGMV's per-token adapters as MBGMM segments: the token order that groups equal adapters,
    the segment bounds [G+1] and the adapter of each segment [G]."""
    order = torch.argsort(adapter_ids, stable=True)
    seg_adapter, counts = torch.unique_consecutive(adapter_ids[order], return_counts=True)
    return order, torch.cat([counts.new_zeros(1), counts.cumsum(0)]), seg_adapter


def lora_shrink_ref(x, pool_l, page_ids, a_start, ranks, adapter_ids, max_rank):
    """MBGMV: z[t, :r_a] = x[t] A[a]^T for a = adapter_ids[t]; tokens are grouped by adapter
    so that each adapter's rows are gathered once."""
    order, seg_starts, seg_adapter = _as_segments(adapter_ids)
    z = torch.empty(x.shape[0], max_rank, dtype=torch.float32, device=x.device)
    z[order] = lora_shrink_segments_ref(x[order], pool_l, page_ids, a_start, ranks, seg_starts, seg_adapter,
                                        max_rank)
    return z


def lora_expand_ref(z, pool_l, page_ids, b_start, ranks, scales, adapter_ids, out_dim):
    """MBGMV: delta[t] = scale[a] z[t, :r_a] B[a]^T for a = adapter_ids[t]; zeros for rank 0."""
    order, seg_starts, seg_adapter = _as_segments(adapter_ids)
    delta = torch.empty(z.shape[0], out_dim, dtype=pool_l.dtype, device=z.device)
    delta[order] = lora_expand_segments_ref(z[order], pool_l, page_ids, b_start, ranks, scales, seg_starts,
                                            seg_adapter, out_dim)
    return delta


def lora_shrink(x, pool_l, page_ids, a_start, ranks, adapter_ids, max_rank, *,
                out=None, use_triton: Optional[bool] = None):
    """MBGMV shrink: x [N, H], adapter_ids [N] -> z [N, max_rank] float32."""
    one_each = torch.arange(x.shape[0] + 1, dtype=torch.int32, device=x.device)
    return _shrink(x, pool_l, page_ids, a_start, ranks, one_each, adapter_ids, max_rank, out,
                   use_triton, per_token=True)


def lora_shrink_segments(x, pool_l, page_ids, a_start, ranks, seg_starts, seg_adapter, max_rank,
                         *, out=None, use_triton: Optional[bool] = None):
    """MBGMM shrink: x [N, H], segments seg_starts [G+1], seg_adapter [G] -> z [N, max_rank]."""
    return _shrink(x, pool_l, page_ids, a_start, ranks, seg_starts, seg_adapter, max_rank, out,
                   use_triton, per_token=False)


def _shrink(x, pool_l, page_ids, a_start, ranks, seg_starts, seg_adapter, max_rank, out,
            use_triton, per_token):
    _check_lora("x", x, _FLOATS, pool_l, page_ids, ranks, ("a_start", a_start))
    if pool_l.dtype != x.dtype or pool_l.shape[1] != x.shape[1]:
        raise ValueError(f"pool_l {tuple(pool_l.shape)} {pool_l.dtype} does not fit x "
                         f"{tuple(x.shape)} {x.dtype}: the same dtype and width H are needed")
    if not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive int, got {max_rank!r}")
    longest = _check_segments(seg_starts, seg_adapter, per_token, x.shape[0], pool_l, page_ids,
                              ranks, ("a_start", a_start), max_rank)
    z = _output(out, (x.shape[0], max_rank), torch.float32, x.device)
    if not _want_triton(use_triton, x):
        return z.copy_(lora_shrink_segments_ref(x, pool_l, page_ids, a_start, ranks, seg_starts,
                                                seg_adapter, max_rank))
    return _launch_shrink(x, pool_l, page_ids, a_start, ranks, seg_starts, seg_adapter, max_rank,
                          longest, per_token, z)


def _launch_shrink(x, pool_l, page_ids, a_start, ranks, seg_starts, seg_adapter, max_rank, longest,
                   per_token, z):
    x, block_t = x.contiguous(), 1 if per_token else 16
    grid = (seg_adapter.shape[0], triton.cdiv(max(longest, 1), block_t), triton.cdiv(max_rank, 16))
    _shrink_kernel[grid](x, pool_l, page_ids, a_start, ranks, seg_starts, seg_adapter, z,
                         x.shape[1], max_rank, x.stride(0), pool_l.stride(0), z.stride(0),
                         BLOCK_T=block_t, BLOCK_R=16, BLOCK_H=128 if block_t == 1 else 64)
    return z


def lora_expand(z, pool_l, page_ids, b_start, ranks, scales, adapter_ids, out_dim, *,
                out=None, use_triton: Optional[bool] = None):
    """MBGMV expand: z [N, >= max rank] float32 -> delta [N, out_dim] in the pool's dtype."""
    one_each = torch.arange(z.shape[0] + 1, dtype=torch.int32, device=z.device)
    return _expand(z, pool_l, page_ids, b_start, ranks, scales, one_each, adapter_ids, out_dim,
                   out, use_triton, per_token=True)


def lora_expand_segments(z, pool_l, page_ids, b_start, ranks, scales, seg_starts, seg_adapter,
                         out_dim, *, out=None, use_triton: Optional[bool] = None):
    """MBGMM expand: z [N, >= max rank] float32, segments -> delta [N, out_dim]."""
    return _expand(z, pool_l, page_ids, b_start, ranks, scales, seg_starts, seg_adapter, out_dim,
                   out, use_triton, per_token=False)


def _expand(z, pool_l, page_ids, b_start, ranks, scales, seg_starts, seg_adapter, out_dim, out,
            use_triton, per_token):
    _check_lora("z", z, (torch.float32,), pool_l, page_ids, ranks, ("b_start", b_start))
    _check_tensor("scales", scales, 1, (torch.float32,), z.device, ranks.shape[0])
    if not isinstance(out_dim, int) or not 1 <= out_dim <= pool_l.shape[1]:
        raise ValueError(f"out_dim must be an int in [1, {pool_l.shape[1]}], got {out_dim!r}")
    longest = _check_segments(seg_starts, seg_adapter, per_token, z.shape[0], pool_l, page_ids,
                              ranks, ("b_start", b_start), z.shape[1])
    delta = _output(out, (z.shape[0], out_dim), pool_l.dtype, z.device)
    if not _want_triton(use_triton, z):
        return delta.copy_(lora_expand_segments_ref(z, pool_l, page_ids, b_start, ranks, scales,
                                                    seg_starts, seg_adapter, out_dim))
    return _launch_expand(z, pool_l, page_ids, b_start, ranks, scales, seg_starts, seg_adapter,
                          out_dim, longest, per_token, delta)


def _launch_expand(z, pool_l, page_ids, b_start, ranks, scales, seg_starts, seg_adapter, out_dim,
                   longest, per_token, delta):
    z, block_t = z.contiguous(), 1 if per_token else 16
    grid = (seg_adapter.shape[0], triton.cdiv(max(longest, 1), block_t), triton.cdiv(out_dim, 64))
    _expand_kernel[grid](z, pool_l, page_ids, b_start, ranks, scales, seg_starts, seg_adapter,
                         delta, out_dim, z.stride(0), pool_l.stride(0), delta.stride(0),
                         BLOCK_T=block_t, BLOCK_R=16, BLOCK_O=64)
    return delta


# ---------------------------------------------------------------- one serving step, checked once
@dataclass
class LoRAStep:
    """The LoRA launches of one target for one serving step, checked once and then run for each of
    the L layers by lora_apply (the public functions above check every call, a host sync each: too
    many at 2 x 4 x L calls per step). `runs` serves the CPU: (t0, t1, A rows, B^T rows, scale) for
    each run of consecutive tokens that share an adapter, rows as returned by _rows."""
    page_ids: torch.Tensor     # the adapter tables of kernel_tables (layout above)
    a_start: torch.Tensor
    b_start: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor
    seg_starts: torch.Tensor   # [G + 1]
    seg_adapter: torch.Tensor  # [G]
    max_rank: int
    longest: int               # tokens of the longest segment (the grid of the kernels)
    per_token: bool            # MBGMV (decode: one token per segment) or MBGMM (prefill)
    runs: list
    n_tokens: int


def plan_lora(pool_l, page_ids, a_start, b_start, ranks, scales, seg_starts, seg_adapter, max_rank,
              per_token=False) -> LoRAStep:
    """Check one step's tables and segments against the pool (as the public functions do) and
    prepare the CPU runs; pool_l [P, H] is any layer of the pool."""
    n_tokens = int(seg_starts[-1]) if seg_starts.numel() else 0
    for name, t in (("page_ids", page_ids), ("ranks", ranks), ("a_start", a_start), ("b_start", b_start)):
        _check_tensor(name, t, 1, _INTS, pool_l.device, None if name in ("page_ids", "ranks") else ranks.shape[0])
    _check_tensor("scales", scales, 1, (torch.float32,), pool_l.device, ranks.shape[0])
    if not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive int, got {max_rank!r}")
    longest = max(_check_segments(seg_starts, seg_adapter, per_token, n_tokens, pool_l, page_ids, ranks,
                                  (name, start), max_rank) for name, start in (("a_start", a_start), ("b_start", b_start)))
    pages, bounds, rank = page_ids.tolist(), seg_starts.tolist(), ranks.tolist()
    a0, b0, scale = a_start.tolist(), b_start.tolist(), scales.tolist()
    merged = []                                  # [t0, t1, slot]: equal neighbours joined
    for i, s in enumerate(seg_adapter.tolist()):
        if merged and merged[-1][2] == s and merged[-1][1] == bounds[i]:
            merged[-1][1] = bounds[i + 1]
        else:
            merged.append([bounds[i], bounds[i + 1], s])
    runs = [(t0, t1, _rows(pages, a0[s], rank[s]), _rows(pages, b0[s], rank[s]), scale[s])
            for t0, t1, s in merged if rank[s] and t1 > t0]
    return LoRAStep(page_ids, a_start, b_start, ranks, scales, seg_starts, seg_adapter, max_rank, longest,
                    per_token, runs, n_tokens)


def lora_apply(x, pool_l, step: LoRAStep, out_dim, use_triton: Optional[bool] = None):
    """delta [N, out_dim] = scale[a] (x A[a]^T) B[a] for x [N, H] of one layer of a checked step: the
    shrink and expand kernels on a GPU; on a CPU one pair of matrix products per run of tokens,
    reading A and B^T in place from the pool (a view when the adapter's pages are consecutive)."""
    if x.shape[0] != step.n_tokens or x.shape[1] != pool_l.shape[1] or x.dtype != pool_l.dtype:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} does not fit a step of {step.n_tokens} tokens over a "
                         f"pool of width {pool_l.shape[1]} {pool_l.dtype}")
    if _want_triton(use_triton, x):
        z = torch.empty(x.shape[0], step.max_rank, dtype=torch.float32, device=x.device)
        delta = torch.empty(x.shape[0], out_dim, dtype=pool_l.dtype, device=x.device)
        t = (step.seg_starts, step.seg_adapter)
        _launch_shrink(x, pool_l, step.page_ids, step.a_start, step.ranks, *t, step.max_rank, step.longest,
                       step.per_token, z)
        return _launch_expand(z, pool_l, step.page_ids, step.b_start, step.ranks, step.scales, *t, out_dim,
                              step.longest, step.per_token, delta)
    x, half = x.float(), pool_l.dtype != torch.float32         # half pools: products in float32
    delta = torch.zeros(x.shape[0], out_dim, dtype=torch.float32, device=x.device)
    for t0, t1, a, b, scale in step.runs:
        A, Bt = pool_l[a], pool_l[b, :out_dim]                                      # [r, H], [r, O]
        A, Bt = (A.float(), Bt.float()) if half else (A, Bt)
        delta[t0:t1].addmm_(x[t0:t1] @ A.T, Bt, alpha=scale)                        # += scale (x A^T) B^T
    return delta.to(pool_l.dtype)


# ---------------------------------------------------------------- paged attention
@triton.jit
def _paged_attention_kernel(q_ptr, pool_ptr, block_table_ptr, seq_ids_ptr, kv_lens_ptr, out_ptr,
                            sm_scale, heads_per_kv, head_dim, kv_dim, tokens_per_page,
                            stride_qt, stride_qh, stride_pool, stride_bt_r, stride_bt_b,
                            stride_ot, stride_oh,
                            BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (i, h): query row i, the heads_per_kv query heads that share KV head h (GQA: the
    K/V tile is loaded once for the whole group). Keys 0..kv_lens[i]-1 of request seq_ids[i],
    online softmax over tiles of BLOCK_N positions (FlashAttention's running max and sum)."""
    i, kvh = tl.program_id(0), tl.program_id(1)
    seq = tl.load(seq_ids_ptr + i).to(tl.int64)
    n_kv = tl.load(kv_lens_ptr + i)
    gq = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    qd_ok = (gq[:, None] < heads_per_kv) & (d[None, :] < head_dim)
    q_off = i * stride_qt + (kvh * heads_per_kv + gq[:, None]) * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=qd_ok, other=0.0).to(tl.float32)                   # [BG, BD]
    m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, n_kv, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < n_kv
        block = block_table_ptr + seq * stride_bt_r + (n // tokens_per_page) * stride_bt_b
        k_page = tl.load(block, mask=n_ok, other=0).to(tl.int64)        # block_table[seq, b, 0]
        v_page = tl.load(block + 1, mask=n_ok, other=0).to(tl.int64)    # block_table[seq, b, 1]
        col = (n % tokens_per_page) * kv_dim + kvh * head_dim           # slot s*kv_dim + h*D
        kv_ok = n_ok[:, None] & (d[None, :] < head_dim)
        K = tl.load(pool_ptr + k_page[:, None] * stride_pool + col[:, None] + d[None, :],
                    mask=kv_ok, other=0.0).to(tl.float32)                                 # [BN, BD]
        V = tl.load(pool_ptr + v_page[:, None] * stride_pool + col[:, None] + d[None, :],
                    mask=kv_ok, other=0.0).to(tl.float32)                                 # [BN, BD]
        s = tl.dot(q, tl.trans(K), input_precision="ieee") * sm_scale   # [BG, BD] @ [BD, BN]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])                                                    # [BG, BN]
        rescale = tl.exp(m - m_new)
        l = l * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p, V, input_precision="ieee")  # [BG, BN] @ [BN, BD]
        m = m_new
    o = acc / l[:, None]
    o_off = i * stride_ot + (kvh * heads_per_kv + gq[:, None]) * stride_oh + d[None, :]
    tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=qd_ok)


def _cached_kv(pool_l, block_table, seq_ids, positions, kv_dim):
    """K, V [..., kv_dim] of the cached tokens at `positions` of requests `seq_ids` (same shape)."""
    g = pool_l.shape[1] // kv_dim
    pages = block_table[seq_ids.long(), positions.long() // g].long()      # [..., 2]
    slots = pool_l.view(pool_l.shape[0], g, kv_dim)                        # [P, g, kv_dim]
    return slots[pages[..., 0], positions.long() % g], slots[pages[..., 1], positions.long() % g]


def _attend(q, k, v, allowed):
    """softmax(q k^T / sqrt(D)) v with GQA: q [B, T, nh, D], k/v [B, n, nkv, D], allowed [B, T, n].
    Query head h = j g + i (i < g) reads K/V head j: the g heads of a group share one K/V, not copies."""
    B, T, nh, D = q.shape
    nkv = k.shape[2]
    qg = q.float().view(B, T, nkv, nh // nkv, D)                                          # [B, T, nkv, g, D]
    scores = torch.einsum("btjid,bnjd->bjitn", qg, k.float()) / math.sqrt(D)             # [B, nkv, g, T, n]
    weights = scores.masked_fill(~allowed[:, None, None], float("-inf")).softmax(dim=-1)
    return torch.einsum("bjitn,bnjd->btjid", weights, v.float()).reshape(B, T, nh, D).to(q.dtype)


def _attend_one_each(q, pool_l, block_table, seq_ids, positions, n_kv_heads):
    """Tokens from different requests, batched: each gathers positions 0..max of its own request
    and masks those past its own position. q [B, nh, D] -> [B, nh, D]."""
    B, nh, D = q.shape
    pos = torch.arange(int(positions.max()) + 1, device=q.device)                        # [n]
    rows = seq_ids[:, None].expand(B, pos.numel())
    k, v = _cached_kv(pool_l, block_table, rows, pos.expand(B, -1), n_kv_heads * D)      # [B, n, kv_dim]
    k, v = k.view(B, -1, n_kv_heads, D), v.view(B, -1, n_kv_heads, D)
    allowed = (pos[None, :] <= positions[:, None])[:, None, :]                          # [B, 1, n]
    return _attend(q[:, None], k, v, allowed)[:, 0]


def paged_attention_decode_ref(q, pool_l, block_table, seq_lens, n_kv_heads):
    """Row r is the newest token of request r, at position seq_lens[r]-1: it sees every cached
    position of its request."""
    seq_ids = torch.arange(q.shape[0], device=q.device)
    return _attend_one_each(q, pool_l, block_table, seq_ids, seq_lens.long() - 1, n_kv_heads)


def paged_attention_prefill_ref(q, pool_l, block_table, seq_ids, positions, n_kv_heads):
    """Ragged causal: token t attends to positions 0..positions[t] of request seq_ids[t].
    Requests with one token this step (decodes) are batched; longer ones go one by one."""
    N, nh, D = q.shape
    out = torch.empty_like(q)
    single = torch.bincount(seq_ids.long())[seq_ids.long()] == 1                       # [N]
    if single.any():
        out[single] = _attend_one_each(q[single], pool_l, block_table, seq_ids[single], positions[single],
                                       n_kv_heads)
    for r in seq_ids[~single].unique().tolist():
        rows = (seq_ids == r).nonzero()[:, 0]                                      # tokens of r
        n = int(positions[rows].max()) + 1
        pos = torch.arange(n, device=q.device)
        k, v = _cached_kv(pool_l, block_table, torch.full_like(pos, r), pos, n_kv_heads * D)
        allowed = pos[None, :] <= positions[rows, None]                            # [T, n] causal
        k, v = k.view(1, n, n_kv_heads, D), v.view(1, n, n_kv_heads, D)
        out[rows] = _attend(q[rows][None], k, v, allowed[None])[0]
    return out


def paged_attention_decode(q, pool_l, block_table, seq_lens, n_kv_heads, *,
                           out=None, use_triton: Optional[bool] = None):
    """q [R, nh, D] (row r = the new token of request r) -> [R, nh, D]."""
    tokens_per_page = _check_attention(q, pool_l, block_table, n_kv_heads)
    _check_index("seq_lens", seq_lens, q.shape[0], q.device)
    if block_table.shape[0] != q.shape[0]:
        raise ValueError(f"block_table has {block_table.shape[0]} rows for {q.shape[0]} requests")
    _check_ranges([("seq_lens", seq_lens, 1, block_table.shape[1] * tokens_per_page + 1),
                   ("block_table", block_table, 0, pool_l.shape[0])])
    o = _output(out, q.shape, q.dtype, q.device)
    if not _want_triton(use_triton, q):
        return o.copy_(paged_attention_decode_ref(q, pool_l, block_table, seq_lens, n_kv_heads))
    seq_ids = torch.arange(q.shape[0], dtype=torch.int32, device=q.device)
    _launch_attention(q, pool_l, block_table, seq_ids, seq_lens, n_kv_heads, tokens_per_page, o)
    return o


def paged_attention_prefill(q, pool_l, block_table, seq_ids, positions, n_kv_heads, *,
                            out=None, use_triton: Optional[bool] = None):
    """q [N, nh, D] of tokens at `positions` of requests `seq_ids` -> [N, nh, D]; the K/V of
    every attended position, the token's own included, must already be in the pool."""
    tokens_per_page = _check_attention(q, pool_l, block_table, n_kv_heads)
    _check_index("seq_ids", seq_ids, q.shape[0], q.device)
    _check_index("positions", positions, q.shape[0], q.device)
    _check_ranges([("seq_ids", seq_ids, 0, block_table.shape[0]),
                   ("positions", positions, 0, block_table.shape[1] * tokens_per_page),
                   ("block_table", block_table, 0, pool_l.shape[0])])
    o = _output(out, q.shape, q.dtype, q.device)
    if not _want_triton(use_triton, q):
        return o.copy_(paged_attention_prefill_ref(q, pool_l, block_table, seq_ids, positions,
                                                   n_kv_heads))
    kv_lens = positions + 1                                   # causal: positions 0..own
    _launch_attention(q, pool_l, block_table, seq_ids, kv_lens, n_kv_heads, tokens_per_page, o)
    return o


def _launch_attention(q, pool_l, block_table, seq_ids, kv_lens, n_kv_heads, tokens_per_page, o):
    N, nh, D = q.shape
    bt = block_table.contiguous()
    _paged_attention_kernel[(N, n_kv_heads)](
        q, pool_l, bt, seq_ids, kv_lens, o,
        1.0 / math.sqrt(D), nh // n_kv_heads, D, n_kv_heads * D, tokens_per_page,
        q.stride(0), q.stride(1), pool_l.stride(0), bt.stride(0), bt.stride(1),
        o.stride(0), o.stride(1),
        BLOCK_G=max(16, triton.next_power_of_2(nh // n_kv_heads)), BLOCK_N=32,
        BLOCK_D=max(16, triton.next_power_of_2(D)))


def write_kv(pool_l, k, v, block_table, seq_ids, positions):
    """Store token t's K and V [kv_dim] in slot positions[t] % g of its block's K and V pages."""
    N, kv_dim = k.shape
    if pool_l.shape[1] % kv_dim or v.shape != k.shape or pool_l.dtype != k.dtype:
        raise ValueError(f"write_kv: k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} do not fit "
                         f"pool_l {tuple(pool_l.shape)} {pool_l.dtype} (H a multiple of kv_dim)")
    g = pool_l.shape[1] // kv_dim
    _check_ranges([("seq_ids", seq_ids, 0, block_table.shape[0]),
                   ("positions", positions, 0, block_table.shape[1] * g),
                   ("block_table", block_table, 0, pool_l.shape[0])])
    pages = block_table[seq_ids.long(), positions.long() // g].long()      # [N, 2]
    slots = pool_l.view(pool_l.shape[0], g, kv_dim)                        # [P, g, kv_dim]
    slots.index_put_((pages[:, 0], positions.long() % g), k)
    slots.index_put_((pages[:, 1], positions.long() % g), v)


# ---------------------------------------------------------------- argument checks
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTS = (torch.int32, torch.int64)


def _check_tensor(name, t, ndim, dtypes, device, length=None):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim or (length is not None and t.shape[0] != length):
        want = f"{ndim}-D" + (f" with {length} rows" if length is not None else "")
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}, expected one of {dtypes}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the other inputs on {device}")
    if ndim > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")


def _check_index(name, t, length, device):
    _check_tensor(name, t, 1, _INTS, device, length)


def _check_ranges(checks):
    """checks: (name, tensor, lo, hi). Raise ValueError naming the first value outside [lo, hi);
    a single host sync when all pass."""
    outside = [(t < lo) | (t >= hi) for _, t, lo, hi in checks]
    if not any(torch.stack([o.any() for o in outside]).tolist()):
        return
    for (name, t, lo, hi), o in zip(checks, outside):
        if o.any():
            idx = tuple(o.nonzero()[0].tolist())
            raise ValueError(f"{name}{list(idx)} = {t[idx].item()} is outside [{lo}, {hi})")


def _check_lora(name, x, dtypes, pool_l, page_ids, ranks, table):
    """x (or z), the pool and one adapter table: table = ("a_start", a_start) or b_start's."""
    _check_tensor(name, x, 2, dtypes, x.device)
    _check_tensor("pool_l", pool_l, 2, _FLOATS, x.device)
    _check_tensor("page_ids", page_ids, 1, _INTS, x.device)
    _check_tensor("ranks", ranks, 1, _INTS, x.device)
    _check_tensor(table[0], table[1], 1, _INTS, x.device, ranks.shape[0])


def _check_segments(seg_starts, seg_adapter, per_token, n_tokens, pool_l, page_ids, ranks,
                    table, max_rank):
    """Index ranges of a LoRA launch: segments tile tokens 0..N-1 in order, ranks fit in
    max_rank, every row of every adapter lies on a page of the pool. Returns the longest segment."""
    adapter_name = "adapter_ids" if per_token else "seg_adapter"
    _check_tensor(adapter_name, seg_adapter, 1, _INTS, pool_l.device,
                  n_tokens if per_token else None)
    _check_tensor("seg_starts", seg_starts, 1, _INTS, pool_l.device, seg_adapter.shape[0] + 1)
    lengths = seg_starts[1:] - seg_starts[:-1]
    live, n = ranks > 0, page_ids.shape[0]
    _check_ranges([(adapter_name, seg_adapter, 0, ranks.shape[0]),
                   ("seg_starts (first)", seg_starts[:1], 0, 1),
                   ("seg_starts (last)", seg_starts[-1:], n_tokens, n_tokens + 1),
                   ("segment lengths", lengths, 0, n_tokens + 1),
                   ("ranks", ranks, 0, max_rank + 1),
                   ("page_ids", page_ids, 0, pool_l.shape[0]),
                   (table[0], torch.where(live, table[1], 0), 0, n + 1),
                   (f"{table[0]} + ranks", torch.where(live, table[1] + ranks, 0), 0, n + 1)])
    return int(lengths.max()) if lengths.numel() else 0


def _check_attention(q, pool_l, block_table, n_kv_heads):
    """Returns g, the tokens per KV page."""
    _check_tensor("q", q, 3, _FLOATS, q.device)
    _check_tensor("pool_l", pool_l, 2, (q.dtype,), q.device)
    _check_tensor("block_table", block_table, 3, _INTS, q.device)
    nh, D = q.shape[1], q.shape[2]
    if not isinstance(n_kv_heads, int) or n_kv_heads < 1 or nh % n_kv_heads:
        raise ValueError(f"n_kv_heads = {n_kv_heads!r} must be a positive divisor of {nh} heads")
    if pool_l.shape[1] % (n_kv_heads * D) or block_table.shape[2] != 2:
        raise ValueError(f"pool_l width {pool_l.shape[1]} must be a multiple of kv_dim = "
                         f"{n_kv_heads * D}; block_table [R, MB, 2]: {tuple(block_table.shape)}")
    return pool_l.shape[1] // (n_kv_heads * D)


def _output(out, shape, dtype, device):
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(f"out must be {tuple(shape)} {dtype} on {device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    return out


def _want_triton(use_triton, x):
    """None: Triton on a GPU, the reference elsewhere. True on a CPU needs the interpreter."""
    if use_triton is None:
        return x.is_cuda
    if use_triton and not x.is_cuda and not _INTERPRETED:
        raise RuntimeError("use_triton=True on a CPU needs TRITON_INTERPRET=1 set before "
                           "triton is imported")
    return use_triton


# ---------------------------------------------------------------- benchmark: python kernels.py
@dataclass
class BenchConfig:
    hidden: int = field(default=4096, metadata={"help": "H, model dim = page width = out_dim"})
    tokens: int = field(default=256, metadata={"help": "N, tokens in the batch"})
    adapters: int = field(default=100, metadata={"help": "adapters resident in the pool"})
    ranks: str = field(default="8,16,32,64", metadata={"help": "ranks to draw from, comma list"})
    shape: str = field(default="decode", metadata={
        "help": "decode: one token per request (MBGMV); prefill: segments (MBGMM)"})
    prefill_len: int = field(default=64, metadata={"help": "tokens per request, prefill shape"})
    dtype: str = field(default="auto", metadata={
        "help": "float32, float16 or bfloat16; auto: float16 on a GPU, float32 on a CPU"})
    repeats: int = field(default=5, metadata={"help": "timed runs per variant (after a warm-up)"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    threads: int = field(default=1, metadata={
        "help": "CPU threads for torch; 1 keeps timings steady on a shared machine, 0: default"})
    small: bool = field(default=False, metadata={
        "help": "H=1024, 64 tokens, 20 adapters: a quick run on a laptop CPU"})


def _random_adapters(cfg, device, dtype):
    """A pool with slot 0 = base model (rank 0) and cfg.adapters adapters whose A and B^T rows
    lie on shuffled pages, interleaved with as many free (KV) pages."""
    g = torch.Generator().manual_seed(cfg.seed)
    choices = torch.tensor([int(r) for r in cfg.ranks.split(",")], dtype=torch.int32)
    ranks = torch.cat([torch.zeros(1, dtype=torch.int32),
                       choices[torch.randint(len(choices), (cfg.adapters,), generator=g)]])
    b_start = torch.cumsum(2 * ranks, 0, dtype=torch.int32) - ranks     # A rows, then B^T rows
    a_start = b_start - ranks
    n = int(2 * ranks.sum())
    pool_l = torch.randn(2 * n, cfg.hidden, generator=g).to(dtype) / cfg.hidden ** 0.5
    page_ids = torch.randperm(2 * n, generator=g)[:n].int()
    scales = 1.0 + torch.rand(cfg.adapters + 1, generator=g)
    adapter_ids = torch.randint(1, cfg.adapters + 1, (cfg.tokens,), generator=g, dtype=torch.int32)
    if cfg.shape == "prefill":   # requests of prefill_len tokens, one adapter each
        adapter_ids = adapter_ids[::cfg.prefill_len].repeat_interleave(cfg.prefill_len)[:cfg.tokens]
    else:                        # decode: requests ordered by adapter, as serve.py's engine orders them
        adapter_ids = adapter_ids.sort().values
    x = torch.randn(cfg.tokens, cfg.hidden, generator=g).to(dtype)
    return [t.to(device) for t in (x, pool_l, page_ids, a_start, b_start, ranks, scales,
                                   adapter_ids)]


def _pad_adapters(pool_l, page_ids, a_start, b_start, ranks, slots, out_dim):
    """The copy that S-LoRA avoids: the batch's adapters `slots` [U] into zero-padded contiguous
    A [U, Rm, H] and B^T [U, Rm, O], so that one bmm serves all of them."""
    Rm, H = int(ranks[slots.long()].max()), pool_l.shape[1]
    A = torch.zeros(len(slots), Rm, H, dtype=pool_l.dtype, device=pool_l.device)
    Bt = torch.zeros(len(slots), Rm, out_dim, dtype=pool_l.dtype, device=pool_l.device)
    for u, s in enumerate(slots.tolist()):
        r, a0, b0 = int(ranks[s]), int(a_start[s]), int(b_start[s])
        A[u, :r] = pool_l[page_ids[a0:a0 + r].long()]
        Bt[u, :r] = pool_l[page_ids[b0:b0 + r].long(), :out_dim]
    return A, Bt


def _bmm_lora(x, A, Bt, scales, group):
    """Tokens grouped by adapter (group [N] indexes A's first dim), zero-padded to the largest
    group Tm, then two torch.bmm."""
    order = torch.argsort(group, stable=True)
    ids = group[order]
    counts = torch.bincount(ids, minlength=A.shape[0])
    slot = torch.arange(ids.shape[0], device=x.device) - (torch.cumsum(counts, 0) - counts)[ids]
    X = torch.zeros(A.shape[0], int(counts.max()), x.shape[1], dtype=x.dtype, device=x.device)
    X[ids, slot] = x[order]                                                       # [U, Tm, H]
    Y = torch.bmm(torch.bmm(X, A.transpose(1, 2)), Bt)        # [U, Tm, H] @ [U, H, Rm] @ [U, Rm, O]
    delta = torch.empty(x.shape[0], Bt.shape[2], dtype=x.dtype, device=x.device)
    delta[order] = (scales[ids, None] * Y[ids, slot]).to(x.dtype)                 # [N, O]
    return delta


def _per_token_loop(x, pool_l, page_ids, a_start, b_start, ranks, scales, adapter_ids):
    """One token at a time: gather its adapter's rows, two vector-matrix products."""
    delta = torch.zeros_like(x)
    tables = [t.tolist() for t in (ranks, a_start, b_start, scales)]
    for t, s in enumerate(adapter_ids.tolist()):
        r, a0, b0, scale = (col[s] for col in tables)
        A = pool_l[page_ids[a0:a0 + r].long()].float()                                 # [r, H]
        Bt = pool_l[page_ids[b0:b0 + r].long()].float()                                # [r, O]
        delta[t] = scale * (x[t].float() @ A.T) @ Bt
    return delta


def _seconds(fn, repeats, device):
    """Median wall time of repeats calls after a warm-up (which compiles Triton kernels); the
    median, not the mean, so that other processes on a shared machine distort it less."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def benchmark(cfg: BenchConfig):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    name = cfg.dtype if cfg.dtype != "auto" else ("float16" if device.type == "cuda" else "float32")
    x, pool_l, page_ids, a_start, b_start, ranks, scales, ids = _random_adapters(
        cfg, device, getattr(torch, name))
    H, N, Rm = cfg.hidden, cfg.tokens, int(ranks.max())
    seg_adapter, lengths = torch.unique_consecutive(ids, return_counts=True)       # [G]
    seg_starts = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).int()      # [G + 1]

    def gathered():
        if cfg.shape == "prefill":
            z = lora_shrink_segments(x, pool_l, page_ids, a_start, ranks, seg_starts,
                                     seg_adapter, Rm)
            return lora_expand_segments(z, pool_l, page_ids, b_start, ranks, scales, seg_starts,
                                        seg_adapter, H)
        z = lora_shrink(x, pool_l, page_ids, a_start, ranks, ids, Rm)
        return lora_expand(z, pool_l, page_ids, b_start, ranks, scales, ids, H)

    one_each = torch.arange(N + 1, dtype=torch.int32, device=device)
    segments = (seg_starts, seg_adapter) if cfg.shape == "prefill" else (one_each, ids)
    step = plan_lora(pool_l, page_ids, a_start, b_start, ranks, scales, *segments, Rm,
                     per_token=cfg.shape != "prefill")   # the serving path: checked once per step
    used, group = torch.unique(ids, return_inverse=True)          # the batch's adapters [U]
    padded = _pad_adapters(pool_l, page_ids, a_start, b_start, ranks, used, H)
    W = torch.randn(H, H, device=device).to(x.dtype) / H ** 0.5
    gathered_label = f"gathered from pages ({'Triton' if device.type == 'cuda' else 'reference'})"
    base_label = "base GEMM x W [N,H]x[H,H]"
    variants = {
        gathered_label: gathered,
        "checked step (lora_apply), plan excluded": lambda: lora_apply(x, pool_l, step, H),
        "bmm, padding copy included": lambda: _bmm_lora(
            x, *_pad_adapters(pool_l, page_ids, a_start, b_start, ranks, used, H), scales[used],
            group),
        "bmm, weights already padded": lambda: _bmm_lora(x, *padded, scales[used], group),
        "per-token loop": lambda: _per_token_loop(x, pool_l, page_ids, a_start, b_start, ranks,
                                                  scales, ids),
        base_label: lambda: x @ W,
    }
    want = gathered().float()
    print(f"{cfg.shape}: N={N} H={H} adapters={cfg.adapters} ranks={cfg.ranks} {name} {device}")
    seconds = {}
    for label, fn in variants.items():
        seconds[label] = sec = _seconds(fn, cfg.repeats, device)
        diff = "" if label == base_label else f"  max|diff| {(fn().float() - want).abs().max():.1e}"
        print(f"  {label:40s} {sec * 1e3:9.3f} ms  x{sec / seconds[gathered_label]:7.2f} of "
              f"gathered{diff}")
    print(f"  LoRA (gathered, shrink + expand) / base GEMM: "
          f"{seconds[gathered_label] / seconds[base_label]:.2f}")
    if device.type == "cuda":
        _print_bandwidth(x, ranks, ids, seconds[gathered_label], device)


def _print_bandwidth(x, ranks, ids, sec, device):
    """Bytes the gathered kernels must move at least (x, each used adapter once, delta) per
    second, against a plain device copy measured now."""
    used = ranks[ids.long().unique()].sum().item()
    nbytes = x.element_size() * (2 * x.numel() + 2 * used * x.shape[1])
    big = torch.empty(2 ** 28, dtype=torch.uint8, device=device)
    copy_bw = 2 * big.numel() / _seconds(lambda: big.clone(), 10, device)
    print(f"  gathered: {nbytes / sec / 1e9:.1f} GB/s = {nbytes / sec / copy_bw:.2f} of copy "
          f"bandwidth ({copy_bw / 1e9:.0f} GB/s)")


def _parse_args():
    p = argparse.ArgumentParser(description="Time S-LoRA's gathered LoRA kernels against the "
                                            "padded-bmm baseline and a per-token loop.")
    for f in fields(BenchConfig):
        if f.type is bool:
            p.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
        else:
            p.add_argument(f"--{f.name}", type=f.type, default=f.default, help=f.metadata["help"])
    cfg = BenchConfig(**vars(p.parse_args()))
    if cfg.shape not in ("decode", "prefill"):
        p.error(f"--shape must be decode or prefill, got {cfg.shape!r}")
    if cfg.small:
        cfg.hidden, cfg.tokens, cfg.adapters = 1024, 64, 20
    return cfg


if __name__ == "__main__":
    benchmark(_parse_args())
