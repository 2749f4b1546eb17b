"""Paged attention: each request's keys and values read from the pages of the unified pool
(S-LoRA, arXiv 2311.03285, section 4: the KV cache shares the pool with the adapters, as
vLLM's PagedAttention stores it in blocks).

A request's K and V are not contiguous: they lie on pages anywhere in the pool (kernels.py draws
the layout). Token position p of request i lies in block p // g, on pages block_table[i, p // g]
= (K page, V page), at column (p % g) kv_dim + h D + d (KV head h, dim d); with GQA a page holds
the K (or V) of g = nh / nkv tokens, exactly its H = g kv_dim numbers. Attention of query token t
(request i, position p_t) and head h, with KV head h // (nh / nkv):

    out[t, h] = softmax_j( q[t, h] . K[i, j, h // (nh/nkv)] / sqrt(D) ) V[i, j, .]    j <= p_t

One interface for every caller: paged_attention_plan checks a step's tokens and page tables once
(one host sync) and finds what every layer reads; per layer paged_attention_write stores the new
K and V and paged_attention attends. On a GPU the Triton kernel runs one program per token and KV
head (online softmax over tiles of KEYS_TILE positions, the GQA group of query heads together);
on a CPU the plan's K/V rows are gathered head by head in one index_select, then two bmm per
group of requests with the causal mask as a precomputed bias. The `_ref` functions are the plain
definitions the tests compare against.
Letters: N tokens, R requests, MB blocks per request, P pages, H pool width, nh query heads, nkv
KV heads, D head dim, kv_dim = nkv D, g tokens per KV page, n positions.
Simplified: prefill attention runs one program per query token (no query tiling as in
FlashAttention); no sliding window.
Demo: `python attention.py` compiles the attention kernel's variants for sm_80 and sm_90 (no GPU
needed) and prints registers, spills and shared memory.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from gpu_compile import TRITON_TYPES, print_compiled
from kernels import FLOATS, INTS, check_ranges, check_tensor, output_buffer, want_triton

KEYS_TILE = 32               # BLOCK_N: cached positions per step of attention's online softmax
GROUP_TILE = 16              # BLOCK_G: query heads sharing a KV head (GQA groups up to 16)
HEAD_TILES = (16, 32, 64, 128)   # BLOCK_D: the head dim rounded up to one of these



@triton.jit
def _paged_attention_kernel(q_ptr, pool_ptr, block_table_ptr, seq_ids_ptr, kv_lens_ptr, out_ptr,
                            sm_scale, heads_per_kv, head_dim, kv_dim, tokens_per_page,
                            stride_qt, stride_qh, stride_pool, stride_bt_r, stride_bt_b,
                            stride_ot, stride_oh,
                            BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (i, h): query row i, the heads_per_kv query heads that share KV head h (GQA: the
    K/V tile is loaded once for the group). Positions 0..kv_lens[i]-1 of request seq_ids[i],
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
        n_ok = n < n_kv              # masked loads: pages past the request's length are not read
        block = block_table_ptr + seq * stride_bt_r + (n // tokens_per_page) * stride_bt_b
        k_page = tl.load(block, mask=n_ok, other=0).to(tl.int64)        # block_table[seq, b, 0]
        v_page = tl.load(block + 1, mask=n_ok, other=0).to(tl.int64)    # block_table[seq, b, 1]
        col = (n % tokens_per_page) * kv_dim + kvh * head_dim           # (p % g) kv_dim + h D
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


def paged_attention_decode_ref(q, pool_l, block_table, seq_lens, n_kv_heads):
    """Row i is the newest token of request i, at position seq_lens[i] - 1: prefill's reference
    for one token per request."""
    seq_ids = torch.arange(q.shape[0], device=q.device)
    return paged_attention_prefill_ref(q, pool_l, block_table, seq_ids, seq_lens - 1, n_kv_heads)


def paged_attention_prefill_ref(q, pool_l, block_table, seq_ids, positions, n_kv_heads):
    """Ragged causal: token t attends to positions 0..positions[t] of request seq_ids[t]."""
    plan = paged_attention_plan(pool_l, block_table, seq_ids, positions, n_kv_heads, q.shape[2],
                                use_triton=False)
    return _attend_groups(q, pool_l, plan, torch.empty_like(q))


@dataclass
class AttendGroup:
    """Requests whose queries the CPU attends together, padded to T queries and n keys. Padding
    repeats a request's own last query and last key (then drops or masks them), so that no
    request reads a slot it has not written: a stale page may hold anything, NaN included."""
    queries: torch.Tensor   # [B, T] long: the token (row of q) in each query slot
    keep: torch.Tensor      # [M] long: the slots (of B T) that are not padding
    targets: torch.Tensor   # [M] long: their tokens
    kv_rows: torch.Tensor   # [2 B nkv n] long: pool row (_pool_rows) of K, then of V, of head
                            # j at position min(i, last)
    bias: torch.Tensor      # [B nkv, g T, n]: 0 where key position i <= the query's, else -inf


@dataclass
class AttentionPlan:
    """One step's attention, checked and worked out once for all L layers: a page reserves the
    same row in every layer, so the lookups are the same. Triton reads the block table itself;
    the CPU reads `groups`: the requests with one token (decodes) in one group, the others in
    groups whose padded scores (B nh T n numbers) stay under ATTEND_NUMBERS (a longer request
    alone)."""
    block_table: torch.Tensor   # [R, MB, 2] int32
    seq_ids: torch.Tensor       # [N] int32
    kv_lens: torch.Tensor       # [N] int32: positions + 1, the keys each token sees
    n_kv_heads: int
    g: int                      # tokens per KV page
    pool_rows: tuple            # (P, W, row stride) of the layer views it was made for
    write_at: tuple             # (K pages, V pages, slots), each [N]: where write_kv stores
    groups: Optional[list]      # [AttendGroup]; None when Triton runs


ATTEND_NUMBERS = 1 << 24   # 64 MiB of float32 scores at most per CPU group


def paged_attention_plan(pool_l, block_table, seq_ids, positions, n_kv_heads, head_dim, *,
                         use_triton: Optional[bool] = None) -> AttentionPlan:
    """Check a step's tokens (at `positions` of requests `seq_ids`) against the block table and
    any layer pool_l [P, g kv_dim], in one host sync; on a CPU also find the rows to gather."""
    check_tensor("pool_l", pool_l, 2, FLOATS, pool_l.device)
    check_tensor("block_table", block_table, 3, INTS, pool_l.device)
    check_tensor("seq_ids", seq_ids, 1, INTS, pool_l.device)
    check_tensor("positions", positions, 1, INTS, pool_l.device, seq_ids.shape[0])
    kv_dim = n_kv_heads * head_dim
    if pool_l.shape[1] % kv_dim or block_table.shape[2] != 2:
        raise ValueError(f"pool_l width {pool_l.shape[1]} must be a multiple of kv_dim = "
                         f"{kv_dim}; block_table [R, MB, 2]: {tuple(block_table.shape)}")
    g = pool_l.shape[1] // kv_dim
    check_ranges([("seq_ids", seq_ids, 0, block_table.shape[0]),
                   ("positions", positions, 0, block_table.shape[1] * g),
                   ("block_table", block_table, 0, pool_l.shape[0])])
    seq_ids, positions = seq_ids.long(), positions.long()
    groups = None
    if not want_triton(use_triton, pool_l):
        groups = [_attend_group(pool_l, block_table, seq_ids, positions, n_kv_heads, head_dim, tokens)
                  for tokens in _group_requests(seq_ids, positions, n_kv_heads * g)]
    pages = block_table[seq_ids, positions // g].long()                                # [N, 2]
    return AttentionPlan(block_table.to(torch.int32).contiguous(), seq_ids.to(torch.int32),
                         (positions + 1).to(torch.int32), n_kv_heads, g,
                         (*pool_l.shape, pool_l.stride(0)), (pages[:, 0], pages[:, 1], positions % g),
                         groups)


def _group_requests(seq_ids, positions, n_heads):
    """[[token rows of one request, ...] per group] (one host sync): the decodes, then chunks."""
    tokens, where = {}, positions.tolist()
    for t, r in enumerate(seq_ids.tolist()):
        tokens.setdefault(r, []).append(t)
    decodes = [ts for ts in tokens.values() if len(ts) == 1]
    groups, chunk, T, n = [decodes] if decodes else [], [], 0, 0
    for ts in (ts for ts in tokens.values() if len(ts) > 1):
        own_T, own_n = len(ts), max(where[t] for t in ts) + 1
        if chunk and (len(chunk) + 1) * n_heads * max(T, own_T) * max(n, own_n) > ATTEND_NUMBERS:
            groups, chunk, T, n = groups + [chunk], [], 0, 0
        chunk, T, n = chunk + [ts], max(T, own_T), max(n, own_n)
    return groups + ([chunk] if chunk else [])


def _attend_group(pool_l, block_table, seq_ids, positions, n_kv_heads, head_dim, tokens):
    """The AttendGroup of requests whose token rows are `tokens` (a list per request)."""
    dev, T = pool_l.device, max(len(ts) for ts in tokens)
    g = pool_l.shape[1] // (n_kv_heads * head_dim)
    queries = torch.tensor([ts + ts[-1:] * (T - len(ts)) for ts in tokens], device=dev)   # [B, T]
    B = len(tokens)
    keep = torch.tensor([i * T + j for i, ts in enumerate(tokens) for j in range(len(ts))],
                        device=dev)
    query_pos = positions[queries]                                                    # [B, T]
    last = query_pos.max(dim=1).values                                                # [B]
    j = torch.arange(int(last.max()) + 1, device=dev)                                 # [n]
    own = torch.minimum(j[None, :], last[:, None])                                    # [B, n]
    pages = block_table[seq_ids[queries[:, :1]], own // g].long()                     # [B, n, 2]
    start = pages * pool_l.stride(0) + (own % g * n_kv_heads * head_dim)[..., None]   # slot's 1st
    heads = torch.arange(n_kv_heads, device=dev)[None, :, None, None] * head_dim
    rows = (start[:, None] + heads) // math.gcd(pool_l.stride(0), head_dim)       # [B, nkv, n, 2]
    hidden = j[None, None, :] > query_pos[:, :, None]                                # [B, T, n]
    bias = torch.zeros(B, n_kv_heads, g, T, len(j), device=dev).masked_fill_(hidden[:, None, None],
                                                                             -math.inf)
    return AttendGroup(queries, keep, queries.view(-1)[keep], rows.movedim(-1, 0).reshape(-1),
                       bias.view(B * n_kv_heads, g * T, -1))


def _pool_rows(pool_l, head_dim):
    """pool_l [P, W] as rows of head_dim numbers, a view: row i starts at number i s, where
    s = gcd(row stride, head_dim) divides the start of every head's K or V (s is head_dim unless
    tensor parallelism keeps a part of each page that head_dim does not divide: rows overlap)."""
    step = math.gcd(pool_l.stride(0), head_dim)
    last_start = (pool_l.shape[0] - 1) * pool_l.stride(0) + pool_l.shape[1] - head_dim
    return pool_l.as_strided((last_start // step + 1, head_dim), (step, 1))


def _attend_groups(q, pool_l, plan, out):
    """The CPU's attention by the plan's groups: each gathers its K and V once per layer, head
    by head, then attends in one batch. q [N, nh, D] -> out [N, nh, D]."""
    (_, nh, D), nkv = q.shape, plan.n_kv_heads
    rows = _pool_rows(pool_l, D)
    for grp in plan.groups:
        B, T = grp.queries.shape
        k, v = rows.index_select(0, grp.kv_rows).view(2, B * nkv, -1, D)          # [B nkv, n, D]
        o = _attend(q[grp.queries], k, v, grp.bias)                               # [B, T, nh, D]
        out.index_copy_(0, grp.targets, o.reshape(B * T, nh, D).index_select(0, grp.keep))
    return out


def _attend(q, k, v, bias):
    """softmax(q k^T / sqrt(D) + bias) v with GQA: q [B, T, nh, D], k/v [B nkv, n, D], bias
    [B nkv, g T, n] (0 or -inf) -> [B, T, nh, D]. Query head h = j g + i (i < g) reads K/V head j,
    so the g heads of a group and the T queries are one matrix of g T rows against that head's
    keys (nothing copied per head); products in float32."""
    B, T, nh, D = q.shape
    nkv = k.shape[0] // B
    qg = q.float().view(B, T, nkv, nh // nkv, D).permute(0, 2, 3, 1, 4)        # [B, nkv, g, T, D]
    scores = torch.baddbmm(bias, qg.reshape(B * nkv, -1, D), k.float().transpose(1, 2),
                           alpha=1 / math.sqrt(D))                              # [B nkv, g T, n]
    o = torch.bmm(scores.softmax(-1), v.float())                                # [B nkv, g T, D]
    return o.view(B, nkv, nh // nkv, T, D).permute(0, 3, 1, 2, 4).reshape(B, T, nh, D).to(q.dtype)


def paged_attention(q, pool_l, plan: AttentionPlan, *, out=None,
                    use_triton: Optional[bool] = None):
    """q [N, nh, D] of the plan's tokens -> [N, nh, D], token t attending to positions
    0..positions[t] of its request; their K/V (its own included) must be in pool_l already."""
    g = _check_attention(q, pool_l, plan.block_table, plan.n_kv_heads)
    if q.shape[0] != plan.seq_ids.shape[0] or (*pool_l.shape, pool_l.stride(0)) != plan.pool_rows:
        raise ValueError(f"q {tuple(q.shape)} and pool_l {tuple(pool_l.shape)} (row stride "
                         f"{pool_l.stride(0)}) do not fit a plan of {plan.seq_ids.shape[0]} tokens "
                         f"over pool_l (P, W, row stride) = {plan.pool_rows}")
    o = output_buffer(out, q.shape, q.dtype, q.device)
    if want_triton(use_triton, q):
        return _launch_attention(q, pool_l, plan.block_table, plan.seq_ids, plan.kv_lens,
                                 plan.n_kv_heads, g, o)
    if plan.groups is None:
        raise ValueError("this plan was made for the Triton kernel (use_triton)")
    return _attend_groups(q, pool_l, plan, o)


def paged_attention_decode(q, pool_l, block_table, seq_lens, n_kv_heads, *,
                           out=None, use_triton: Optional[bool] = None):
    """q [R, nh, D], row i the new token of request i -> [R, nh, D]: prefill with one token per
    request at position seq_lens[i] - 1 (an error names these positions)."""
    check_tensor("seq_lens", seq_lens, 1, INTS, q.device, q.shape[0])
    if not isinstance(block_table, torch.Tensor) or block_table.shape[0] != q.shape[0]:
        raise ValueError(f"block_table needs one row per request of q {tuple(q.shape)}")
    seq_ids = torch.arange(q.shape[0], device=q.device)
    return paged_attention_prefill(q, pool_l, block_table, seq_ids, seq_lens - 1, n_kv_heads,
                                   out=out, use_triton=use_triton)


def paged_attention_prefill(q, pool_l, block_table, seq_ids, positions, n_kv_heads, *,
                            out=None, use_triton: Optional[bool] = None):
    """q [N, nh, D] of tokens at `positions` of requests `seq_ids` -> [N, nh, D]: one step's
    plan (paged_attention_plan), used once."""
    _check_attention(q, pool_l, block_table, n_kv_heads)
    plan = paged_attention_plan(pool_l, block_table, seq_ids, positions, n_kv_heads, q.shape[2],
                                use_triton=use_triton)
    return paged_attention(q, pool_l, plan, out=out, use_triton=use_triton)


def paged_attention_write(pool_l, k, v, plan: AttentionPlan):
    """write_kv for the plan's tokens: K and V [N, kv_dim] into the slots it found."""
    if (*pool_l.shape, pool_l.stride(0)) != plan.pool_rows or k.shape[0] != plan.seq_ids.shape[0]:
        raise ValueError(f"paged_attention_write: k {tuple(k.shape)}, pool_l "
                         f"{tuple(pool_l.shape)} do not fit the plan's {plan.seq_ids.shape[0]} "
                         f"tokens over pool_l (P, W, row stride) = {plan.pool_rows}")
    _check_kv(pool_l, k, v)
    _write_slots(pool_l, k, v, *plan.write_at)


def _launch_attention(q, pool_l, block_table, seq_ids, kv_lens, n_kv_heads, g, o):
    N, nh, D = q.shape
    bt = block_table.to(torch.int32).contiguous()     # int32 indices: the compiled variants
    _paged_attention_kernel[(N, n_kv_heads)](
        q, pool_l, bt, seq_ids.to(torch.int32), kv_lens.to(torch.int32), o,
        1.0 / math.sqrt(D), nh // n_kv_heads, D, n_kv_heads * D, g,
        q.stride(0), q.stride(1), pool_l.stride(0), bt.stride(0), bt.stride(1),
        o.stride(0), o.stride(1), **_attention_tiles(nh // n_kv_heads, D))
    return o


def _attention_tiles(heads_per_kv, head_dim):
    return dict(BLOCK_G=max(GROUP_TILE, triton.next_power_of_2(heads_per_kv)), BLOCK_N=KEYS_TILE,
                BLOCK_D=max(HEAD_TILES[0], triton.next_power_of_2(head_dim)))


def write_kv(pool_l, k, v, block_table, seq_ids, positions):
    """Store token t's K and V [kv_dim] in slot positions[t] % g of its block's K and V pages."""
    _check_kv(pool_l, k, v)
    g = pool_l.shape[1] // k.shape[1]
    check_ranges([("seq_ids", seq_ids, 0, block_table.shape[0]),
                   ("positions", positions, 0, block_table.shape[1] * g),
                   ("block_table", block_table, 0, pool_l.shape[0])])
    pages = block_table[seq_ids.long(), positions.long() // g].long()          # [N, 2]
    _write_slots(pool_l, k, v, pages[:, 0], pages[:, 1], positions.long() % g)


def _check_kv(pool_l, k, v):
    if k.dim() != 2 or v.shape != k.shape or pool_l.shape[1] % k.shape[1] or pool_l.dtype != k.dtype:
        raise ValueError(f"write_kv: k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} do not fit "
                         f"pool_l {tuple(pool_l.shape)} {pool_l.dtype} (H a multiple of kv_dim)")


def _write_slots(pool_l, k, v, k_pages, v_pages, slots):
    """K [N, kv_dim] into slot slots[t] of page k_pages[t], V likewise."""
    kv_dim = k.shape[1]
    slot_view = pool_l.view(pool_l.shape[0], pool_l.shape[1] // kv_dim, kv_dim)   # [P, g, kv_dim]
    slot_view.index_put_((k_pages, slots), k)
    slot_view.index_put_((v_pages, slots), v)


def _check_attention(q, pool_l, block_table, n_kv_heads):
    """Returns g, the tokens per KV page."""
    check_tensor("q", q, 3, FLOATS, q.device)
    check_tensor("pool_l", pool_l, 2, (q.dtype,), q.device)
    check_tensor("block_table", block_table, 3, INTS, q.device)
    nh, D = q.shape[1], q.shape[2]
    if not isinstance(n_kv_heads, int) or n_kv_heads < 1 or nh % n_kv_heads:
        raise ValueError(f"n_kv_heads = {n_kv_heads!r} must be a positive divisor of {nh} heads")
    if pool_l.shape[1] % (n_kv_heads * D) or block_table.shape[2] != 2:
        raise ValueError(f"pool_l width {pool_l.shape[1]} must be a multiple of kv_dim = "
                         f"{n_kv_heads * D}; block_table [R, MB, 2]: {tuple(block_table.shape)}")
    return pool_l.shape[1] // (n_kv_heads * D)




def kernel_variants():
    """Every attention launch the engine can make: (label, pool dtype, kernel, constexprs)."""
    for dtype in TRITON_TYPES:
        for D in HEAD_TILES:
            yield f"attention D<={D}", dtype, _paged_attention_kernel, _attention_tiles(1, D)


if __name__ == "__main__":
    print_compiled(kernel_variants())
