"""The backward of S-LoRA's shrink and expand: many adapters trained in one batch on a GPU.

kernels.py computes, for the tokens t of segment s (all of adapter s), with lora.py's notation,

    shrink  z = x A_s^T                   [N, I] -> [N, r_s]
    expand  y = scale_s z B_s^T           [N, r_s] -> [N, O],     scale_s = alpha_s / r_s

and for a loss L with dy = dL/dy [N, O] the chain rule gives

    dz     = scale_s dy B_s               a shrink of dy over the rows of B_s^T   [N, O] -> [N, r_s]
    dx     = dz A_s                       an expand of dz over the rows of A_s    [N, r_s] -> [N, I]
    dA_s   = dz_s^T x_s                   a segment-wise outer product            [r_s, I]
    dB_s^T = scale_s z_s^T dy_s           a segment-wise outer product            [r_s, O]

so the backward is the same two kernels on swapped tables (B^T's rows read where A's were, A's
where B^T's were, scales 1) and one more kernel, segment_outer (_outer_kernel beside
segment_outer_ref): for each segment, the sum over its tokens of u[t]^T v[t]. SegmentLoRA, a
torch.autograd.Function, packs the adapters' A and B^T (parameters, not pool pages) into one
table of rows per call, so training reads its adapters the way serving reads the pool.
multi_train.py groups a batch's rows by adapter, so each adapter's tokens are one segment and
segment_outer writes each adapter's gradient once (no atomics); segment_lora checks it.
Letters as kernels.py's: N tokens, I input width, O output width, r rank, Rm max rank, S slots
(slot 0: no adapter), G segments, W the packed rows' width max(I, O).
Simplified: the outer products are float32 tiles (no tensor cores), cheap as r << I.
Demo: test_all.py checks SegmentLoRA's forward and gradients against autograd on the dense
formula, through Triton's interpreter; `python kernel_bench.py --compile` compiles the kernel.
"""
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

import kernels

OUTER_TILES = kernels.LoRATiles(tokens=16, rank=16, hidden=64, out=64)   # hidden: BLOCK_W


@triton.jit
def _outer_kernel(u_ptr, v_ptr, grad_ptr, row_start_ptr, ranks_ptr, seg_starts_ptr,
                  seg_adapter_ptr, width, stride_u, stride_v, stride_out, BLOCK_T: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """Program (g, j, c): rows j [BR] and columns c [BW] of segment g's u^T v."""
    seg = tl.program_id(0)
    a = tl.load(seg_adapter_ptr + seg)
    rank = tl.load(ranks_ptr + a)
    j = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    row_ok, col_ok = j < rank, c < width
    t0, t1 = tl.load(seg_starts_ptr + seg), tl.load(seg_starts_ptr + seg + 1)
    live = tl.program_id(1) * BLOCK_R < rank                # no row of this block: no loop
    acc = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
    for t_first in range(t0, tl.where(live, t1, t0), BLOCK_T):
        t = t_first + tl.arange(0, BLOCK_T)
        tok_ok = t < t1
        U = tl.load(u_ptr + t[:, None] * stride_u + j[None, :],
                    mask=tok_ok[:, None] & row_ok[None, :], other=0.0).to(tl.float32)  # [BT, BR]
        V = tl.load(v_ptr + t[:, None] * stride_v + c[None, :],
                    mask=tok_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)  # [BT, BW]
        acc = tl.dot(tl.trans(U), V, acc, input_precision="ieee")       # [BR, BT] @ [BT, BW]
    rows = tl.load(row_start_ptr + a) + j
    tl.store(grad_ptr + rows[:, None] * stride_out + c[None, :], acc,
             mask=row_ok[:, None] & col_ok[None, :])


def segment_outer_ref(u, v, out, row_start, ranks, seg_starts, seg_adapter):
    """out[row_start[s] + j, :W] = sum over segment g's tokens t of u[t, j] v[t], s its slot."""
    bounds, slots = seg_starts.tolist(), seg_adapter.tolist()
    for g, s in enumerate(slots):
        r, first = int(ranks[s]), int(row_start[s])
        if r:
            t0, t1 = bounds[g], bounds[g + 1]
            out[first:first + r, :v.shape[1]] = u[t0:t1, :r].T.float() @ v[t0:t1].float()
    return out


def segment_outer(u, v, out, row_start, ranks, seg_starts, seg_adapter,
                  use_triton: Optional[bool] = None):
    """u [N, >= Rm] float32, v [N, W'] -> out [rows, >= W'] float32 rows of each segment's
    u^T v (see segment_outer_ref); each slot in one segment at most."""
    if not kernels.want_triton(use_triton, v):
        return segment_outer_ref(u, v, out, row_start, ranks, seg_starts, seg_adapter)
    t, v = OUTER_TILES, v.contiguous()
    longest_rank = int(ranks.max()) if ranks.numel() else 0
    grid = (seg_adapter.shape[0], max(1, triton.cdiv(longest_rank, t.rank)),
            triton.cdiv(v.shape[1], t.hidden))
    _outer_kernel[grid](u, v, out, row_start, ranks, seg_starts, seg_adapter, v.shape[1],
                        u.stride(0), v.stride(0), out.stride(0), BLOCK_T=t.tokens,
                        BLOCK_R=t.rank, BLOCK_W=t.hidden)
    return out


def kernel_variants():
    """The launches SegmentLoRA's backward makes: (label, dtype of v, kernel, constexprs)."""
    t = OUTER_TILES
    for dtype in (torch.float32, torch.bfloat16):
        yield "segment outer u^T v", dtype, _outer_kernel, dict(BLOCK_T=t.tokens, BLOCK_R=t.rank,
                                                                BLOCK_W=t.hidden)


# ---------------------------------------------------------------- the autograd Function

def pack(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], dtype) -> tuple:
    """The adapters' rows in one table [2 sum(r), W]: A_s [r, I] then B_s^T [r, O] of slot s + 1
    (slot 0: no adapter), each row zero-padded to W; (rows, a_start, b_start, ranks), int32."""
    I, O = As[0].shape[1], Bs[0].shape[0]
    width, total = max(I, O), 2 * sum(A.shape[0] for A in As)
    rows = torch.zeros(total, width, dtype=dtype, device=As[0].device)
    a_start, b_start, ranks, off = [0], [0], [0], 0
    for A, B in zip(As, Bs):
        r = A.shape[0]
        rows[off:off + r, :I], rows[off + r:off + 2 * r, :O] = A, B.T
        a_start.append(off)
        b_start.append(off + r)
        ranks.append(r)
        off += 2 * r
    ints = [torch.tensor(v, dtype=torch.int32, device=rows.device)
            for v in (a_start, b_start, ranks)]
    return (rows, *ints)


class SegmentLoRA(torch.autograd.Function):
    """delta [N, O] = scale_s (x A_s^T) B_s^T for the tokens of each segment (slot s: adapter
    s - 1 of As, Bs; slot 0 zeros), forward and backward by the Triton kernels."""

    @staticmethod
    def forward(ctx, x, seg_starts, seg_adapter, scales, use_triton, *weights):
        As, Bs = weights[0::2], weights[1::2]
        rows, a_start, b_start, ranks = pack(As, Bs, x.dtype)
        ids = torch.arange(rows.shape[0], dtype=torch.int32, device=x.device)
        rm, O = max(int(ranks.max()), 1), Bs[0].shape[0]
        plan = kernels.plan_lora(rows, ids, a_start, b_start, ranks, scales, seg_starts,
                                 seg_adapter, rm)
        z = kernels.lora_shrink(x, rows, plan, use_triton=use_triton)                # [N, Rm]
        ctx.save_for_backward(x, z, rows, ids, a_start, b_start, ranks, scales, seg_starts,
                              seg_adapter)
        ctx.use_triton, ctx.O, ctx.weight_dtypes = use_triton, O, [w.dtype for w in weights]
        return kernels.lora_expand(z, rows, plan, O, use_triton=use_triton)          # [N, O]

    @staticmethod
    def backward(ctx, dy):
        (x, z, rows, ids, a_start, b_start, ranks, scales, seg_starts,
         seg_adapter) = ctx.saved_tensors
        dy, use = dy.contiguous(), ctx.use_triton
        swapped = kernels.plan_lora(rows, ids, b_start, a_start, ranks, torch.ones_like(scales),
                                    seg_starts, seg_adapter, z.shape[1])
        lengths = (seg_starts[1:] - seg_starts[:-1]).long()
        scale_t = torch.repeat_interleave(scales[seg_adapter.long()], lengths)[:, None]   # [N, 1]
        dz = kernels.lora_shrink(dy, rows, swapped, use_triton=use) * scale_t   # scale dy B_s
        dx = kernels.lora_expand(dz, rows, swapped, x.shape[1], use_triton=use)       # dz A_s
        grads = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
        segment_outer(dz, x, grads, a_start, ranks, seg_starts, seg_adapter, use)     # dA_s
        segment_outer(z * scale_t, dy, grads, b_start, ranks, seg_starts, seg_adapter, use)
        I, weights = x.shape[1], []
        for s, (a0, b0, r) in enumerate(zip(a_start.tolist(), b_start.tolist(),
                                            ranks.tolist())):
            if s:
                weights += [grads[a0:a0 + r, :I], grads[b0:b0 + r, :ctx.O].T]   # dA_s, dB_s
        return (dx.to(x.dtype), None, None, None, None,
                *[g.to(dtype) for g, dtype in zip(weights, ctx.weight_dtypes)])


def segment_lora(x, lengths: List[int], slots: List[int], scales: List[float], As, Bs,
                 use_triton: Optional[bool] = None):
    """x [N, I] in consecutive segments of `lengths` tokens, segment g of slot slots[g] (0: no
    adapter, s: As[s - 1], Bs[s - 1]) -> delta [N, O], differentiable in x, As and Bs."""
    live = [s for s in slots if s]
    if len(set(live)) != len(live):
        raise ValueError(f"each adapter's tokens must be one segment; slots {slots}")
    dev = x.device
    seg_starts = kernels.segment_starts(torch.tensor(lengths, device=dev))
    seg_adapter = torch.tensor(slots, dtype=torch.int32, device=dev)
    scale_t = torch.tensor([0.0, *scales], dtype=torch.float32, device=dev)
    weights = [w for pair in zip(As, Bs) for w in pair]
    return SegmentLoRA.apply(x, seg_starts, seg_adapter, scale_t, use_triton, *weights)
