"""S-LoRA's kernels: LoRA for a batch that mixes many adapters, read from the unified pool's pages.

S-LoRA (Sheng et al. 2023, arXiv 2311.03285, section 5) computes the LoRA part of a projection
beside the base GEMM for a batch whose tokens use different adapters. For a token x [I] of adapter
s, lora.py's equation (Hu et al. 2021, eq. 3, written for rows as PyTorch stores activations):

    y = x W0^T + (alpha_s / r_s) (x A_s^T) B_s^T          A_s [r_s, I], B_s [O, r_s], r_s << I
    shrink   z = x A_s^T                                    [I] -> [r_s]
    expand   y += (alpha_s / r_s) z B_s^T                   [r_s] -> [O]

A_s and B_s^T [r_s, O] are not dense tensors: their rows lie on pages of the unified pool
(section 4, paging.py), anywhere and in any order, and the kernels gather them in place.
A segment is a run of consecutive tokens of one adapter: one segment per request when
prefilling, one per token when decoding. MBGMV and MBGMM (section 5: multi-size batched gather
matrix-vector / matrix-matrix multiplication) are the same two kernels, shrink and expand, with
two tile presets: DECODE_TILES, a token per program (per-token decode), and PREFILL_TILES, 16
tokens of a segment per program, so each adapter tile read from the pool serves 16 (prefill).
Multi-size: adapters of different ranks in one launch. Slot 0 is the base model (rank 0): its
tokens get exact zeros, so base-model requests mix freely with adapted ones.
I = H for q, k, v, o, gate, up and I = F for down; O = H, kv_dim or F.

Pool layout, defined here once (paging.py allocates it, model.py, these kernels and attention.py
read it):

    pool [L, P, H]: allocating page p reserves pool[l, p, :] in every layer l; pool[l] is [P, H].
                 <------------------------------- H numbers ------------------------------->
    page 17   | K tok 0 of req 2 | K tok 1 of req 2 | K tok 2 of req 2 |  kv_dim each, g per page
    page  4   | V tok 0 of req 2 | V tok 1 of req 2 | V tok 2 of req 2 |  block_table[2, 0] = (17, 4)
    page  9   | row j of A (q_proj of adapter 5)                       |  A [r, H]: r pages
    page 30   | column j of B (q_proj), o_proj likewise                |  B^T [r, H]: r pages
    page 12   | column j of B (v_proj) | unused: H - kv_dim numbers    |  B^T [r, kv_dim]: r pages
    page 40   | column j of B (gate_proj), numbers 0 .. H-1            |  B^T [r, F]: r C_B pages,
    page  7   | numbers H .. 2H-1                                      |  C_B = ceil(F / H) per row
    page 41   | numbers 2H .. F-1    | unused: C_B H - F numbers       |  (down: A [r, F] alike)
    (pages of any owner lie anywhere, in any order)

KV pages (attention.py): with GQA a page holds the K (or V) of g = nh / nkv tokens and wastes
nothing; the price is on the adapter side, where the B^T pages of k_proj/v_proj use kv_dim of
their H numbers. Adapters: a row of width W spans C = ceil(W / H) pages, numbers c H + h of A row
j of slot s at column h of page page_ids[a_start[s] + j C_A + c], those of B^T row j on page
page_ids[b_start[s] + j C_B + c], j < ranks[s]; scales[s] = alpha_s / r_s. The kernels walk a
row page by page, so the same two serve every target; each keeps its loop for C = 1 as a
compile-time variant, ONE_PAGE (shrink: all but down; expand: all but gate and up).
paging.py explains the choice of several pages per row over a second page width.
int8 rows (quant.Int8Rows, the future work of S-LoRA's conclusion): the two kernels with INT8 set
read pool_l as int8 [k P, H] (k = 4 rows in the bytes of a float32 page) and multiply each row by
its float32 row_scale as they load it; the page ids of the tables are then int8 row ids.

Shape letters: N tokens, H pool width (model dim), P pages, L layers, S adapter slots, r rank of
one adapter, Rm max rank, I input width, O output width, F ffn_dim, C pages per row (C_A of A,
C_B of B^T), G segments, T tokens of one segment, nh query heads, nkv KV heads, g tokens per page.

One interface for every caller: plan_lora checks a step's adapter tables and segments once (one
host sync) and returns a LoRAPlan; then per layer lora_apply = lora_expand(lora_shrink(x)). On a
GPU each public function launches its Triton kernel `_name_kernel`; on a CPU it runs `name_ref`
(same arguments), the reference: a plain PyTorch loop over runs of one adapter's tokens, two small
products each on views of the pool rows (Triton compiles for GPUs only; use_triton=True runs the
kernel in its interpreter, for tests: TRITON_INTERPRET=1 set before triton is imported).
Simplified: tiles are multiplied in float32 (no tensor cores), cheap as r << H.
Demo: `python kernel_bench.py --small` times these kernels against the padded-bmm baseline, and
`python kernel_bench.py --compile` compiles every variant for sm_80 and sm_90 (no GPU needed).
"""
import itertools
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from gpu_compile import TRITON_TYPES

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # triton.jit reads it when decorating


@dataclass(frozen=True)
class LoRATiles:
    """Tile sizes of one launch shape (powers of two; tl.dot wants at least 16 on every side)."""
    tokens: int   # BLOCK_T: tokens of a segment per program
    rank: int     # BLOCK_R: rank rows per tile
    hidden: int   # BLOCK_H: input numbers per shrink tile
    out: int      # BLOCK_O: outputs per expand program


DECODE_TILES = LoRATiles(tokens=1, rank=16, hidden=128, out=64)    # MBGMV: vector x matrix
PREFILL_TILES = LoRATiles(tokens=16, rank=16, hidden=64, out=64)   # MBGMM: matrix x matrix


# ---------------------------------------------------------------- LoRA: shrink and expand
# Segment i is tokens seg_starts[i]..seg_starts[i+1]-1, all of adapter slot seg_adapter[i].
# Program (i, k, b) takes the k-th BLOCK_T tokens of segment i and block b of ranks (shrink)
# or of outputs (expand); decode makes every token its own segment.
@triton.jit
def _shrink_kernel(x_ptr, pool_ptr, row_scale_ptr, page_ids_ptr, a_start_ptr, ranks_ptr,
                   seg_starts_ptr, seg_adapter_ptr, z_ptr, in_dim, page_width, a_chunks, max_rank,
                   stride_x, stride_pool, stride_z, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_H: tl.constexpr, ONE_PAGE: tl.constexpr, INT8: tl.constexpr):
    seg = tl.program_id(0)
    t = tl.load(seg_starts_ptr + seg) + tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = t < tl.load(seg_starts_ptr + seg + 1)
    j = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    a = tl.load(seg_adapter_ptr + seg)
    rank = tl.load(ranks_ptr + a)
    row_ok = j < rank                 # rows past the rank (up to max_rank) get zeros
    a0 = tl.load(a_start_ptr + a)     # page_ids[a0 + j C_A + c]: chunk c of row j of its A
    live = tl.program_id(2) * BLOCK_R < rank           # no live row: no tile
    x_rows = x_ptr + t[:, None] * stride_x                                            # [BT, 1]
    acc = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
    if ONE_PAGE:    # C_A = 1 (q, k, v, o, gate, up): the page of each row looked up once
        pages = tl.load(page_ids_ptr + a0 + j, mask=row_ok, other=0).to(tl.int64)    # [BR]
        q = _row_scale(row_scale_ptr, pages, row_ok, INT8)
        for h0 in range(0, tl.where(live, in_dim, 0), BLOCK_H):
            acc = _shrink_tile(acc, x_rows, pool_ptr + pages[:, None] * stride_pool, q,
                               h0 + tl.arange(0, BLOCK_H), in_dim, tok_ok, row_ok, BLOCK_T, INT8)
    else:           # C_A > 1 (down): tile k on chunk c, numbers c H + h of x, page c of each row
        per_chunk = tl.cdiv(page_width, BLOCK_H)
        for k in range(0, tl.where(live, tl.cdiv(in_dim, page_width) * per_chunk, 0)):
            c = k // per_chunk
            pages = tl.load(page_ids_ptr + a0 + j * a_chunks + c, mask=row_ok,
                            other=0).to(tl.int64)
            acc = _shrink_tile(acc, x_rows + c * page_width,
                               pool_ptr + pages[:, None] * stride_pool,
                               _row_scale(row_scale_ptr, pages, row_ok, INT8),
                               (k % per_chunk) * BLOCK_H + tl.arange(0, BLOCK_H),
                               tl.minimum(page_width, in_dim - c * page_width), tok_ok, row_ok,
                               BLOCK_T, INT8)
    tl.store(z_ptr + t[:, None] * stride_z + j[None, :], acc,
             mask=tok_ok[:, None] & (j[None, :] < max_rank))


@triton.jit
def _row_scale(row_scale_ptr, pages, row_ok, INT8: tl.constexpr):
    """[BR] float32: the scale of each row's int8 numbers (INT8); unused for float rows."""
    if INT8:
        return tl.load(row_scale_ptr + pages, mask=row_ok, other=0.0)
    return tl.zeros(pages.shape, tl.float32)


@triton.jit
def _shrink_tile(acc, x_rows, a_rows, a_scale, h, width, tok_ok, row_ok, BLOCK_T: tl.constexpr,
                 INT8: tl.constexpr):
    """acc [BT, BR] + X A^T over numbers h [BH] (those < width) of the tokens' rows of x and of
    the rows of A, given by pointers x_rows [BT, 1] and a_rows [BR, 1]; A's rows dequantized
    by a_scale [BR] as they are read (INT8)."""
    h_ok = h < width
    X = tl.load(x_rows + h[None, :], mask=tok_ok[:, None] & h_ok[None, :],
                other=0.0).to(tl.float32)                                                 # [BT, BH]
    A = tl.load(a_rows + h[None, :], mask=row_ok[:, None] & h_ok[None, :],
                other=0.0).to(tl.float32)                                                 # [BR, BH]
    if INT8:
        A = A * a_scale[:, None]
    if BLOCK_T == 1:
        return acc + tl.sum(X[:, None, :] * A[None, :, :], axis=2)   # [1, 1, BH] * [1, BR, BH]
    return tl.dot(X, tl.trans(A), acc, input_precision="ieee")      # [BT, BH] @ [BH, BR]


def lora_shrink_ref(x, pool_l, plan, row_scale=None):
    """z [N, Rm] float32: z[t, :r_s] = x[t] A_s^T per run of tokens of adapter s, else zeros."""
    z = torch.zeros(x.shape[0], plan.max_rank, dtype=torch.float32, device=x.device)
    for t0, t1, a_rows, _, _ in plan.runs:
        A = page_rows(pool_l, a_rows, plan.a_chunks, x.shape[1], row_scale).float()    # [r, I]
        z[t0:t1, :A.shape[0]] = x[t0:t1].float() @ A.T                          # [T, I] @ [I, r]
    return z


@triton.jit
def _expand_kernel(z_ptr, pool_ptr, row_scale_ptr, page_ids_ptr, b_start_ptr, ranks_ptr,
                   scales_ptr, seg_starts_ptr, seg_adapter_ptr, out_ptr, out_dim, page_width,
                   b_chunks, stride_z, stride_pool, stride_out, BLOCK_T: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr, ONE_PAGE: tl.constexpr,
                   INT8: tl.constexpr):
    seg = tl.program_id(0)
    t = tl.load(seg_starts_ptr + seg) + tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = t < tl.load(seg_starts_ptr + seg + 1)
    if ONE_PAGE:    # C_B = 1 (every target but gate, up): block b of outputs, on each row's page
        c, row_stride = 0, 1
        h = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)
        o_ok = h < out_dim
    else:           # C_B > 1 (gate, up): block b of chunk c, numbers c H + h, on page c of a row
        per_chunk = tl.cdiv(tl.minimum(out_dim, page_width), BLOCK_O)   # output blocks per page
        c, row_stride = tl.program_id(2) // per_chunk, b_chunks
        h = (tl.program_id(2) % per_chunk) * BLOCK_O + tl.arange(0, BLOCK_O)   # columns of page
        o_ok = (h < page_width) & (c * page_width + h < out_dim)
    o = c * page_width + h                                           # outputs [BO]
    a = tl.load(seg_adapter_ptr + seg)
    rank = tl.load(ranks_ptr + a)
    b0 = tl.load(b_start_ptr + a)
    acc = tl.zeros([BLOCK_T, BLOCK_O], dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):    # rank 0 (base model): no iteration, zeros stored
        j = r0 + tl.arange(0, BLOCK_R)
        row_ok = j < rank
        pages = tl.load(page_ids_ptr + b0 + j * row_stride + c, mask=row_ok,
                        other=0).to(tl.int64)                       # page c of B^T rows j
        Z = tl.load(z_ptr + t[:, None] * stride_z + j[None, :],
                    mask=tok_ok[:, None] & row_ok[None, :], other=0.0)                # [BT, BR]
        Bt = tl.load(pool_ptr + pages[:, None] * stride_pool + h[None, :],
                     mask=row_ok[:, None] & o_ok[None, :], other=0.0).to(tl.float32)  # [BR, BO]
        if INT8:                                                    # rows dequantized as read
            Bt = Bt * _row_scale(row_scale_ptr, pages, row_ok, INT8)[:, None]
        if BLOCK_T == 1:
            acc += tl.sum(Z[:, :, None] * Bt[None, :, :], axis=1)   # [1, BR, 1] * [1, BR, BO]
        else:
            acc = tl.dot(Z, Bt, acc, input_precision="ieee")      # [BT, BR] @ [BR, BO]
    acc = acc * tl.load(scales_ptr + a)
    tl.store(out_ptr + t[:, None] * stride_out + o[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=tok_ok[:, None] & o_ok[None, :])


def lora_expand_ref(z, pool_l, plan, out_dim, row_scale=None, dtype=None):
    """delta [N, O] in dtype (default: the pool's): delta[t] = scales[s] z[t, :r_s] B_s^T, else
    zeros."""
    delta = torch.zeros(z.shape[0], out_dim, dtype=torch.float32, device=z.device)
    for t0, t1, _, b_rows, scale in plan.runs:
        Bt = page_rows(pool_l, b_rows, plan.b_chunks, out_dim, row_scale).float()      # [r, O]
        delta[t0:t1] = scale * (z[t0:t1, :Bt.shape[0]] @ Bt)                    # [T, r] @ [r, O]
    return delta.to(dtype or pool_l.dtype)


def page_rows(pool_l, rows, chunks, width, row_scale=None):
    """The adapter rows on pool rows `rows` (C = chunks pages each, in order): [r, width], a view
    of the pool when `rows` is a slice (consecutive pages) of float rows; int8 rows (row_scale
    given) come dequantized, pool_l[q] row_scale[q], in float32."""
    numbers = pool_l[rows]                                                      # [r C, H]
    if row_scale is not None:
        numbers = numbers.float() * row_scale[rows, None]
    if chunks == 1:                                                 # a page per row: no reshape
        return numbers[:, :width]
    return numbers.reshape(-1, chunks * pool_l.shape[1])[:, :width]            # [r C, H] -> [r, W]


# ---------------------------------------------------------------- one step's plan, checked once
@dataclass
class LoRAPlan:
    """One step's LoRA work for one target, checked once by plan_lora, then run for each of the
    L layers (checking every call would cost a host sync per layer and target)."""
    page_ids: torch.Tensor     # int32 [(C_A + C_B) sum(r)]: the adapter tables (lookup above)
    a_start: torch.Tensor      # int32 [S]
    b_start: torch.Tensor      # int32 [S]
    ranks: torch.Tensor        # int32 [S]
    scales: torch.Tensor       # float32 [S]
    seg_starts: torch.Tensor   # int32 [G + 1]
    seg_adapter: torch.Tensor  # int32 [G]
    max_rank: int              # Rm, the width of z
    longest: int               # tokens of the longest segment (the kernels' grid)
    tiles: LoRATiles           # DECODE_TILES (MBGMV) or PREFILL_TILES (MBGMM)
    runs: list                 # the CPU's work: (t0, t1, A rows, B^T rows, scale), see _runs
    n_pages: int               # P of the pool it was checked against
    n_tokens: int              # N
    a_chunks: int = 1          # C_A, pages per row of A (1: q, k, v, o, gate, up)
    b_chunks: int = 1          # C_B, pages per row of B^T (1: q, k, v, o, down)
    int8_index: Optional[tuple] = None   # lora_runs_int8's, made by its first layer


def segment_starts(lengths):
    """Segment bounds [G + 1] int32 (0, then the running total) from segment lengths [G]."""
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).int()


def plan_lora(pool_l, page_ids, a_start, b_start, ranks, scales, seg_starts, seg_adapter, max_rank,
              per_token=False, a_chunks=1, b_chunks=1) -> LoRAPlan:
    """Check a step's adapter tables and segments against the pool (any layer pool_l [P, H]),
    every index in one host sync; per_token picks the decode tiles (MBGMV), else MBGMM's;
    a_chunks and b_chunks (C_A, C_B) are the pages per row of A and of B^T."""
    dev = pool_l.device
    check_tensor("ranks", ranks, 1, INTS, dev)
    check_tensor("seg_adapter", seg_adapter, 1, INTS, dev)
    for name, t, length, dtypes in (
            ("page_ids", page_ids, None, INTS), ("a_start", a_start, ranks.shape[0], INTS),
            ("b_start", b_start, ranks.shape[0], INTS), ("scales", scales, ranks.shape[0], _F32),
            ("seg_starts", seg_starts, seg_adapter.shape[0] + 1, INTS)):
        check_tensor(name, t, 1, dtypes, dev, length)
    for name, n in (("max_rank", max_rank), ("a_chunks", a_chunks), ("b_chunks", b_chunks)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    lengths, live, n_ids = seg_starts[1:] - seg_starts[:-1], ranks > 0, page_ids.shape[0]
    check_ranges([("seg_adapter", seg_adapter, 0, ranks.shape[0]),
                   ("seg_starts[0]", seg_starts[:1], 0, 1),
                   ("segment lengths", lengths, 0, math.inf), ("ranks", ranks, 0, max_rank + 1),
                   ("page_ids", page_ids, 0, pool_l.shape[0])]
                  + [(f"{name}{plus}", torch.where(live, start + add, 0), 0, n_ids + 1)
                     for name, start, c in (("a_start", a_start, a_chunks),
                                            ("b_start", b_start, b_chunks))   # rows of C pages
                     for plus, add in (("", 0), (f" + {c} * ranks" if c > 1 else " + ranks",
                                                 c * ranks))])
    tables = [t.to(torch.int32) for t in (page_ids, a_start, b_start, ranks)]
    seg_starts, seg_adapter = seg_starts.to(torch.int32), seg_adapter.to(torch.int32)
    return LoRAPlan(*tables, scales, seg_starts, seg_adapter, max_rank,
                    int(lengths.max()) if lengths.numel() else 0,
                    DECODE_TILES if per_token else PREFILL_TILES,
                    _runs(*tables, scales, seg_starts, seg_adapter, (a_chunks, b_chunks)),
                    pool_l.shape[0], int(seg_starts[-1]), a_chunks, b_chunks)


def _runs(page_ids, a_start, b_start, ranks, scales, seg_starts, seg_adapter, chunks):
    """(t0, t1, A rows, B^T rows, scale) for each stretch of tokens t0..t1-1 of one adapter:
    neighbouring segments of the same adapter joined, base-model stretches dropped; the rows are
    the r C pool rows (pages) of A, resp. B^T, chunks = (C_A, C_B)."""
    pages, bounds = page_ids.tolist(), seg_starts.tolist()
    a0, b0, rank, scale = (t.tolist() for t in (a_start, b_start, ranks, scales))
    joined = []                                                    # [t0, t1, slot]
    for i, s in enumerate(seg_adapter.tolist()):
        if joined and joined[-1][2] == s and joined[-1][1] == bounds[i]:
            joined[-1][1] = bounds[i + 1]
        else:
            joined.append([bounds[i], bounds[i + 1], s])
    (ca, cb) = chunks
    return [(t0, t1, _rows(pages, a0[s], rank[s] * ca), _rows(pages, b0[s], rank[s] * cb), scale[s])
            for t0, t1, s in joined if rank[s] and t1 > t0]


def _rows(page_list, start, n):
    """Index of the n pool rows on pages page_list[start:start + n]: a slice (pool_l[rows] is a
    view) when the pages are consecutive, as the pool allocates them, else the page list."""
    first, run = page_list[start], page_list[start:start + n]
    return slice(first, first + n) if run == list(range(first, first + n)) else run


# ---------------------------------------------------------------- the interface
# Each function takes one layer's pool_l [P, H] of float rows, or its int8 rows (row_scale
# float32 [P] given: row q holds the numbers pool_l[q] row_scale[q]; quant.Int8Rows).
def lora_shrink(x, pool_l, plan: LoRAPlan, *, row_scale=None, out=None,
                use_triton: Optional[bool] = None):
    """x [N, I] -> z [N, Rm] float32 with z[t, :r_s] = x[t] A_s^T (MBGMV or MBGMM by the plan);
    A's first I numbers are read (I <= C_A H: under tensor parallelism a device's share)."""
    _check_x(x, pool_l, plan, row_scale)
    z = output_buffer(out, (x.shape[0], plan.max_rank), torch.float32, x.device)
    if not want_triton(use_triton, x):
        return z.copy_(lora_shrink_ref(x, pool_l, plan, row_scale))
    tiles, x = plan.tiles, x.contiguous()
    grid = (plan.seg_adapter.shape[0], triton.cdiv(max(plan.longest, 1), tiles.tokens),
            triton.cdiv(plan.max_rank, tiles.rank))
    _shrink_kernel[grid](x, pool_l, _scale_arg(row_scale, plan), plan.page_ids, plan.a_start,
                         plan.ranks, plan.seg_starts, plan.seg_adapter, z, x.shape[1],
                         pool_l.shape[1], plan.a_chunks, plan.max_rank, x.stride(0),
                         pool_l.stride(0), z.stride(0), BLOCK_T=tiles.tokens, BLOCK_R=tiles.rank,
                         BLOCK_H=tiles.hidden, ONE_PAGE=plan.a_chunks == 1,
                         INT8=row_scale is not None)
    return z


def lora_expand(z, pool_l, plan: LoRAPlan, out_dim, *, row_scale=None, dtype=None, out=None,
                use_triton: Optional[bool] = None):
    """z [N, >= Rm] float32 -> delta [N, O] in dtype (default and for float rows: the pool's),
    delta[t] = scales[s] z[t] B_s^T."""
    _check_pool(pool_l, plan, row_scale, out_dim)
    if z.dim() != 2 or z.shape[0] != plan.n_tokens or z.shape[1] < plan.max_rank \
            or z.dtype != torch.float32 or z.device != pool_l.device:
        raise ValueError(f"z {tuple(z.shape)} {z.dtype} on {z.device} must be float32 "
                         f"[{plan.n_tokens}, >= {plan.max_rank}] on {pool_l.device}")
    dtype = _activations(pool_l, row_scale, dtype)
    delta = output_buffer(out, (z.shape[0], out_dim), dtype, z.device)
    if not want_triton(use_triton, z):
        return delta.copy_(lora_expand_ref(z, pool_l, plan, out_dim, row_scale, dtype))
    tiles, z, H = plan.tiles, z.contiguous(), pool_l.shape[1]
    per_chunk = triton.cdiv(min(out_dim, H), tiles.out)   # output blocks per page; O <= H: as one
    grid = (plan.seg_adapter.shape[0], triton.cdiv(max(plan.longest, 1), tiles.tokens),
            triton.cdiv(out_dim, H) * per_chunk)
    _expand_kernel[grid](z, pool_l, _scale_arg(row_scale, plan), plan.page_ids, plan.b_start,
                         plan.ranks, plan.scales, plan.seg_starts, plan.seg_adapter, delta,
                         out_dim, H, plan.b_chunks, z.stride(0), pool_l.stride(0),
                         delta.stride(0), BLOCK_T=tiles.tokens, BLOCK_R=tiles.rank,
                         BLOCK_O=tiles.out, ONE_PAGE=plan.b_chunks == 1,
                         INT8=row_scale is not None)
    return delta


def lora_apply(x, pool_l, plan: LoRAPlan, out_dim, use_triton: Optional[bool] = None,
               row_scale=None):
    """delta [N, O] = scales[s] (x A_s^T) B_s^T for x [N, I] of one layer, in x's dtype: shrink
    then expand on a GPU; on a CPU lora_runs over views of the pool rows (int8 rows: their
    scales folded into z, lora_runs_int8, or dequantized copies where rows span pages)."""
    if want_triton(use_triton, x):
        z = lora_shrink(x, pool_l, plan, row_scale=row_scale, use_triton=True)
        return lora_expand(z, pool_l, plan, out_dim, row_scale=row_scale, dtype=x.dtype,
                           use_triton=True)
    _check_x(x, pool_l, plan, row_scale, out_dim)
    I = x.shape[1]
    if row_scale is not None and plan.a_chunks == plan.b_chunks == 1 and plan.runs:
        return lora_runs_int8(x, pool_l, row_scale, plan, out_dim)
    runs = [(t0, t1, page_rows(pool_l, a, plan.a_chunks, I, row_scale),
             page_rows(pool_l, b, plan.b_chunks, out_dim, row_scale), scale)
            for t0, t1, a, b, scale in plan.runs]
    delta = lora_runs(x, runs, out_dim)
    return x.new_zeros(x.shape[0], out_dim) if delta is None else delta


def lora_runs(x, runs, out_dim):
    """delta [N, O] with delta[t0:t1] = scale (x[t0:t1] A^T) Bt for each run (t0, t1, A [r, I],
    Bt [r, O], scale), zeros elsewhere, in x's dtype (products in float32); None if no runs."""
    if not runs:
        return None
    x32 = x.float()
    delta = torch.zeros(x.shape[0], out_dim, dtype=torch.float32, device=x.device)
    for t0, t1, A, Bt, scale in runs:
        delta[t0:t1].addmm_(x32[t0:t1] @ A.float().T, Bt.float(), alpha=scale)  # [T, r] @ [r, O]
    return delta.to(x.dtype)


def lora_runs_int8(x, pool_l, row_scale, plan: LoRAPlan, out_dim):
    """lora_runs on int8 rows of one page each (C_A = C_B = 1): A = diag(s_A) A_q and B^T =
    diag(s_B) B_q, so scale (x A^T) B^T = ((x A_q^T) * scale s_A s_B) B_q: the row scales go to
    z [T, r], gathered for every run at once, instead of to every number of the rows."""
    a_ids, b_ids, run_scale, offsets = plan.int8_index or _int8_index(plan)
    zs = row_scale[a_ids] * row_scale[b_ids] * run_scale          # [sum r]: scale s_A s_B of z
    x32, I = x.float(), x.shape[1]
    delta = torch.zeros(x.shape[0], out_dim, dtype=torch.float32, device=x.device)
    for (t0, t1, a, b, _), o in zip(plan.runs, offsets):
        z = x32[t0:t1] @ pool_l[a, :I].float().T                                # [T, r]
        delta[t0:t1].addmm_(z.mul_(zs[o:o + z.shape[1]]), pool_l[b, :out_dim].float())
    return delta.to(x.dtype)


def _int8_index(plan: LoRAPlan) -> tuple:
    """Made once per plan, for every layer: all runs' rows of A, of B^T (one index [sum r] each),
    each run's scale repeated over its rows, and the offset of each run's rows."""
    ids = [torch.arange(r.start, r.stop) if isinstance(r, slice) else torch.tensor(r)
           for run in plan.runs for r in run[2:4]]                   # A rows, B^T rows, A rows...
    n, dev = [a.numel() for a in ids[0::2]], plan.scales.device      # r of each run
    run_scale = torch.tensor([run[4] for run in plan.runs]).repeat_interleave(torch.tensor(n))
    plan.int8_index = (torch.cat(ids[0::2]).to(dev), torch.cat(ids[1::2]).to(dev),
                       run_scale.to(dev), [0, *itertools.accumulate(n)][:-1])
    return plan.int8_index


# ---------------------------------------------------------------- the padded-bmm baseline
def pad_adapters(pool, tables, in_dim, out_dim, dtype=None, row_scale=None):
    """The copy S-LoRA avoids: every slot's A and B^T from its pages into zero-padded tensors,
    pool [L, P, H] -> A [L, S, Rm, I], Bt [L, S, Rm, O] in dtype (default: the pool's), each
    slot's scale folded into Bt. tables: one target's page_ids, a_start, b_start, ranks, scales,
    a_chunks and b_chunks (paging.AdapterTables, or a LoRAPlan); int8 rows: row_scale [L, P]."""
    if row_scale is not None:                                         # dequantized, then padded
        pool = (pool.float() * row_scale[..., None]).to(dtype or torch.float32)
    L, _, H = pool.shape
    ranks, (ca, cb) = tables.ranks, (tables.a_chunks, tables.b_chunks)
    S, Rm = ranks.shape[0], int(ranks.max()) if ranks.numel() else 0
    A, Bt = pool.new_zeros(L, S, Rm, in_dim), pool.new_zeros(L, S, Rm, out_dim)
    rows = zip(ranks.tolist(), tables.a_start.tolist(), tables.b_start.tolist(),
               tables.scales.tolist())
    for s, (r, a0, b0, scale) in enumerate(rows):
        a_pages = tables.page_ids[a0:a0 + r * ca].long()                       # r C_A pages
        b_pages = tables.page_ids[b0:b0 + r * cb].long()                       # r C_B pages
        A[:, s, :r] = pool[:, a_pages].reshape(L, r, ca * H)[..., :in_dim]           # [L, r, I]
        Bt[:, s, :r] = pool[:, b_pages].reshape(L, r, cb * H)[..., :out_dim] * scale  # [L, r, O]
    return A, Bt


def bmm_lora(x, A_l, Bt_l, slots):
    """x [N, I], one layer's padded A_l [S, Rm, I] and Bt_l [S, Rm, O], slots [N] -> [N, O]:
    each token's adapter gathered (another copy), then two torch.bmm over the padded rank."""
    idx = slots.long()
    z = torch.bmm(x[:, None, :], A_l[idx].transpose(1, 2))                # [N, 1, I] @ [N, I, Rm]
    return torch.bmm(z, Bt_l[idx])[:, 0]                                  # [N, 1, Rm] @ [N, Rm, O]


# ---------------------------------------------------------------- argument checks
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_F32 = (torch.float32,)
_I8 = (torch.int8,)
INTS = (torch.int32, torch.int64)


def check_tensor(name, t, ndim, dtypes, device, length=None):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim or (length is not None and t.shape[0] != length):
        want = f"{ndim}-D" + (f" with {length} rows" if length is not None else "")
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes or t.device != device:
        raise ValueError(f"{name} is {t.dtype} on {t.device}; expected one of {dtypes} on {device}")
    if ndim > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")


def check_ranges(checks):
    """checks: (name, tensor, lo, hi). Raise ValueError naming the first value outside
    [lo, hi); a single host sync when all pass."""
    outside = [(t < lo) | (t >= hi) for _, t, lo, hi in checks]
    if not any(torch.stack([o.any() for o in outside]).tolist()):
        return
    for (name, t, lo, hi), o in zip(checks, outside):
        if o.any():
            idx = tuple(o.nonzero()[0].tolist())
            raise ValueError(f"{name}{list(idx)} = {t[idx].item()} is outside [{lo}, {hi})")


def _check_pool(pool_l, plan, row_scale=None, out_dim=None):
    dev = plan.page_ids.device
    check_tensor("pool_l", pool_l, 2, FLOATS if row_scale is None else _I8, dev)
    if row_scale is not None:
        check_tensor("row_scale", row_scale, 1, _F32, dev, pool_l.shape[0])
    if pool_l.shape[0] != plan.n_pages:
        raise ValueError(f"pool_l has {pool_l.shape[0]} pages, the plan {plan.n_pages}")
    width = plan.b_chunks * pool_l.shape[1]       # C_B pages of H numbers per row of B^T
    if out_dim is not None and (not isinstance(out_dim, int) or not 1 <= out_dim <= width):
        raise ValueError(f"out_dim must be an int in [1, {width}], got {out_dim!r}")


def _check_x(x, pool_l, plan, row_scale=None, out_dim=None):
    _check_pool(pool_l, plan, row_scale, out_dim)
    check_tensor("x", x, 2, FLOATS, pool_l.device)
    width = plan.a_chunks * pool_l.shape[1]       # C_A pages of H numbers per row of A
    if x.shape[0] != plan.n_tokens or not 1 <= x.shape[1] <= width \
            or (row_scale is None and x.dtype != pool_l.dtype):
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} does not fit a plan of {plan.n_tokens} "
                         f"tokens and rows of A of at most {width} numbers over pool_l "
                         f"{tuple(pool_l.shape)} {pool_l.dtype}")


def _activations(pool_l, row_scale, dtype):
    """The activations' dtype: float rows' own (dtype, if given, must match); int8 rows need it."""
    if row_scale is None:
        if dtype not in (None, pool_l.dtype):
            raise ValueError(f"dtype {dtype} differs from the pool's {pool_l.dtype}")
        return pool_l.dtype
    if dtype not in FLOATS:
        raise ValueError(f"int8 rows need the activations' dtype, one of {FLOATS}; got {dtype}")
    return dtype


def _scale_arg(row_scale, plan):
    """row_scale, or for float rows any float32 tensor (the kernel does not read it)."""
    return plan.scales if row_scale is None else row_scale


def output_buffer(out, shape, dtype, device):
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device \
            or not out.is_contiguous():
        raise ValueError(f"out must be contiguous {tuple(shape)} {dtype} on {device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    return out


def want_triton(use_triton, x):
    """None: Triton on a GPU, the reference elsewhere. True on a CPU needs the interpreter."""
    if use_triton and not x.is_cuda and not _INTERPRETED:
        raise RuntimeError("use_triton=True on a CPU needs TRITON_INTERPRET=1 set before "
                           "triton is imported")
    return x.is_cuda if use_triton is None else use_triton


# ---------------------------------------------------------------- compiled for a GPU, no GPU needed
# kernel_bench.py --compile compiles these (gpu_compile.py), attention.py its own.


def kernel_variants(int8_dtypes=(torch.float32, torch.bfloat16)):
    """Every launch the engine can make: (label, activations' dtype, kernel, constexprs); float
    rows in the activations' dtype, and int8 rows (INT8) beside activations of int8_dtypes."""
    for dtype in TRITON_TYPES:
        for int8 in (False, True) if dtype in int8_dtypes else (False,):
            for shape, t in (("decode", DECODE_TILES), ("prefill", PREFILL_TILES)):
                for one_page, rows in ((True, ""), (False, ", rows over pages")):   # C = 1, C > 1
                    label = f"{shape}{rows}{', int8 rows' if int8 else ''}"
                    yield f"shrink {label}", dtype, _shrink_kernel, dict(
                        BLOCK_T=t.tokens, BLOCK_R=t.rank, BLOCK_H=t.hidden, ONE_PAGE=one_page,
                        INT8=int8)
                    yield f"expand {label}", dtype, _expand_kernel, dict(
                        BLOCK_T=t.tokens, BLOCK_R=t.rank, BLOCK_O=t.out, ONE_PAGE=one_page,
                        INT8=int8)
