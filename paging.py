"""Unified Paging: one memory pool for the KV cache and the LoRA adapters (S-LoRA, arXiv
2311.03285, section 4).

S-LoRA serves thousands of adapters with one base model. Adapters of different ranks and KV
caches of different lengths would fragment GPU memory, so both live in one pool of equal pages
(section 4.1, figure 3). A page holds H numbers (H = model dim) in every layer: the pool is a
tensor [L, P, H] and page p is pool[:, p, :] (kernels.py draws the layout). KV cache: a page
holds the K (or V) of g = n_heads / n_kv_heads consecutive tokens of a request (kv_dim = H / g
numbers each), so n tokens take 2 ceil(n / g) pages. An adapter of rank r on target t with A
[r, I] and B [O, r] (B stored as B^T [r, O]): a row of width W takes C = ceil(W / H) pages, its
numbers c H .. c H + H - 1 on the c-th, so A takes r C_A = r ceil(I / H) pages and B^T
r C_B = r ceil(O / H), the same pages in every layer. q, k, v, o (I = H, O = H or kv_dim) take 2r
pages; gate and up (O = ffn_dim) and down (I = ffn_dim) take r + r ceil(ffn_dim / H).
Why rows over several pages rather than a second, wider page size: one pool and one page size
stay, so any free page serves KV or any adapter row (S-LoRA's unified paging, no second pool to
size); the price is the unused tail of a row's last page. SmolLM2 (H 576, ffn_dim 1536 = 2.67 H):
3 pages hold the 1536 numbers of a gate/up/down row in 1728 slots, 11% waste; a rank-r adapter on
all seven projections takes r (2 + 2 + 2 + 2 + 4 + 4 + 4) = 20 r pages, 8 r of them for q, k, v, o.

With adapter_dtype int8 (Int8Rows) four quantized rows share the bytes of a float32 page (two of
a bfloat16 one): a rank-r adapter takes a quarter (a half) of the pages, and the kernels read a
quarter of the bytes.
The adapters wait in host memory (adapters.py: HostAdapter; HostStore when a host limit keeps
most of them on disk). An adapter is copied into the pool when a request needs it, stays while a
running request uses it (a reference count), and is evicted, least recently used first, only
when its pages are wanted for KV or another adapter.
Prefetch (section 4.2) loads the adapters of the next likely requests while the current batch
runs: under CUDA on a side stream, ordered by an event.

Letters: L layers, P pages, H model dim (page width), r rank, I input width of a target (of A),
O output width (of B), C pages per row (C_A = ceil(I / H), C_B = ceil(O / H)), F ffn_dim, g tokens
per KV page, S adapter slots.
Simplified: KV pages are taken lowest index first, adapter pages highest first (so an adapter's
pages are usually consecutive and the CPU path reads them in place); no swapping of KV to host.
Demo: `python paging.py` prints a map of the pool (. free, K kv cache, A adapter) as requests
come and go, and says when and why an adapter is evicted; `--picture pool.svg` draws the pool at
the end (pool_view.py), each page coloured by its owner.
"""
import heapq
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import cli
import pool_view
from adapters import SERVABLE, HostAdapter, OnDisk, row_pages, target_shapes, target_widths
from quant import ROWS
from lora import AdapterError

KV, ADAPTER = "kv", "adapter"   # the two kinds of page owner


def kv_pages(n_tokens: int, tokens_per_page: int) -> int:
    """Pages for the K and V of n tokens: 2 ceil(n / g)."""
    return 2 * math.ceil(n_tokens / tokens_per_page)


class PoolFullError(RuntimeError):
    """The pool cannot provide the pages asked for, even after evicting every unused adapter."""


@dataclass
class PoolConfig:
    n_layers: int = cli.flag(2, "L, layers of the model")
    n_pages: int = cli.flag(32, "P, pages in the pool")
    dim: int = cli.flag(12, "H, numbers per page (the model dim)")
    tokens_per_page: int = cli.flag(3, "g = n_heads / n_kv_heads, tokens per KV page")
    dtype: str = cli.flag("float32", "torch dtype of the pool")
    device: str = cli.flag("cpu", "device of the pool")
    ffn_dim: int = cli.flag(32, "F, the MLP width (input of down_proj, output of gate and up)")
    adapter_dtype: str = cli.flag("float", "adapter rows in the pool: float (the pool's dtype) or "
                                           "int8 (quantized per row, 4 rows per float32 page)")

    def __post_init__(self):
        if self.adapter_dtype not in ROWS:
            raise ValueError(f"adapter_dtype must be one of {list(ROWS)}, got "
                             f"{self.adapter_dtype!r}")

    @property
    def kv_dim(self) -> int:
        return self.dim // self.tokens_per_page

    @staticmethod
    def for_model(model_cfg, n_pages: int, dtype: str = "float32", device: str = "cpu",
                  adapter_dtype: str = "float") -> "PoolConfig":
        """From a model.ModelConfig (dim, n_layers, n_heads, n_kv_heads, ffn_dim)."""
        return PoolConfig(model_cfg.n_layers, n_pages, model_cfg.dim,
                          model_cfg.n_heads // model_cfg.n_kv_heads, dtype, device,
                          model_cfg.ffn_dim, adapter_dtype)


@dataclass(frozen=True)
class PoolStats:
    total: int
    free: int
    kv: int
    adapter: int

    @property
    def used(self) -> int:
        return self.total - self.free


class PageAllocator:
    """Plain-integer page bookkeeping (no tensors). Invariants: used + free = total, no page
    twice."""

    def __init__(self, n_pages: int):
        self.n_pages = n_pages
        self._free = list(range(n_pages))   # a min-heap: KV takes the lowest free pages first
        self.owner: Dict[int, str] = {}     # page -> KV or ADAPTER

    @property
    def n_free(self) -> int:
        return len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int, owner: str) -> List[int]:
        if owner not in (KV, ADAPTER):
            raise ValueError(f"page owner must be {KV!r} or {ADAPTER!r}, got {owner!r}")
        if not self.can_allocate(n):
            raise PoolFullError(f"asked for {n} pages, {len(self._free)} of {self.n_pages} free")
        if owner == KV:
            pages = [heapq.heappop(self._free) for _ in range(n)]
        else:   # adapters from the top: their pages then tend to be consecutive (read in place)
            pages = sorted(heapq.nlargest(n, self._free))
            taken = set(pages)
            self._free = [p for p in self._free if p not in taken]
            heapq.heapify(self._free)
        self.owner.update((p, owner) for p in pages)
        return pages

    def free(self, pages: Sequence[int]):
        for p in pages:
            if self.owner.pop(p, None) is None:
                raise ValueError(f"page {p} is not allocated (double free or foreign page)")
            heapq.heappush(self._free, p)

    def stats(self) -> PoolStats:
        kv = sum(1 for o in self.owner.values() if o == KV)
        return PoolStats(self.n_pages, len(self._free), kv, len(self.owner) - kv)

    def page_map(self) -> str:
        """One character per page: . free, K kv cache, A adapter."""
        marks = {KV: "K", ADAPTER: "A"}
        return "".join(marks.get(self.owner.get(p), ".") for p in range(self.n_pages))


@dataclass
class Resident:
    """An adapter copied into the pool: per target its r (C_A + C_B) rows (A, then B^T), each
    row's id a page (float rows) or an int8 row (Int8Rows); taken: the pool pages they fill."""
    pages: Dict[str, List[int]]
    taken: List[int]
    refs: int = 0                    # running requests that use it; evictable only at 0
    ready: Optional[object] = None   # torch.cuda.Event recorded after an asynchronous copy


@dataclass
class AdapterTables:
    """Kernel-side index tensors of one target (page lookup in kernels.py); slot 0: base model."""
    page_ids: torch.Tensor  # int32 [(C_A + C_B) sum(r)]
    a_start: torch.Tensor   # int32 [S]: page_ids[a_start[s] + j C_A + c]: A row j, chunk c
    b_start: torch.Tensor   # int32 [S]: likewise for B^T rows (C_B chunks each)
    ranks: torch.Tensor     # int32 [S]: 0 = slot s does not adapt this target
    scales: torch.Tensor    # float32 [S]
    a_chunks: int           # C_A = ceil(I / H), pages per row of A
    b_chunks: int           # C_B = ceil(O / H), pages per row of B^T


class UnifiedPool:
    """The pool tensor [L, P, H], its allocator, the KV block lists and the resident adapters."""

    def __init__(self, cfg: PoolConfig):
        self.cfg, self.g = cfg, cfg.tokens_per_page
        self.tensor = torch.zeros(cfg.n_layers, cfg.n_pages, cfg.dim,
                                  dtype=getattr(torch, cfg.dtype), device=cfg.device)  # [L, P, H]
        self.rows = ROWS[cfg.adapter_dtype](self.tensor)   # how adapter rows fill pages
        self.alloc = PageAllocator(cfg.n_pages)
        self.blocks: Dict[int, List[Tuple[int, int]]] = {}   # seq -> [(K page, V page)] per block
        self.host: Dict[str, HostAdapter] = {}
        self.resident: "OrderedDict[str, Resident]" = OrderedDict()  # least recently used first
        self.copy_stream = torch.cuda.Stream(self.tensor.device) if self.tensor.is_cuda else None

    def stats(self) -> PoolStats:
        return self.alloc.stats()

    def pages_for(self, adapter: HostAdapter) -> int:
        """Pool pages the adapter fills when loaded: its rows (adapter.n_pages), k to a page."""
        return math.ceil(adapter.n_pages / self.rows.per_page)

    def _take(self, n: int, owner: str, keep: frozenset = frozenset()) -> List[int]:
        """n pages, evicting unused adapters if needed: least recently used first, never one in
        keep. Used adapters are never evicted: their requests are running."""
        unused = [name for name, res in self.resident.items() if res.refs == 0 and name not in keep]
        evictable = sum(len(self.resident[name].taken) for name in unused)
        if self.alloc.n_free + evictable < n:
            raise PoolFullError(f"need {n} pages: {self.alloc.n_free} free and {evictable} in "
                                "unused adapters")
        for name in unused:
            if self.alloc.can_allocate(n):
                break
            self.evict(name)
        return self.alloc.allocate(n, owner)

    # ------------------------------------------------------------------ KV cache side

    def allocate_kv(self, seq: int, n_tokens: int) -> List[int]:
        """Grow seq's block list so it holds n_tokens tokens in total; returns the new pages."""
        blocks = self.blocks.setdefault(seq, [])
        missing = math.ceil(n_tokens / self.g) - len(blocks)
        if missing <= 0:
            return []
        pages = self._take(2 * missing, KV)
        blocks.extend(zip(pages[0::2], pages[1::2]))
        return pages

    def free_seq(self, seq: int):
        self.alloc.free([p for kv in self.blocks.pop(seq, []) for p in kv])

    def block_table(self, seq_ids: Sequence[int]) -> torch.Tensor:
        """int32 [R, max_blocks, 2]; shorter rows are padded with page 0, which no kernel or
        reference reads: each reads only its request's own positions."""
        width = max((len(self.blocks[s]) for s in seq_ids), default=0)
        table = torch.zeros(len(seq_ids), width, 2, dtype=torch.int32)
        for row, s in enumerate(seq_ids):
            if self.blocks[s]:
                table[row, :len(self.blocks[s])] = torch.tensor(self.blocks[s], dtype=torch.int32)
        return table.to(self.tensor.device)

    # ------------------------------------------------------------------ adapter side

    def register(self, adapter: HostAdapter):
        """Add an adapter to the host store, after checking that it fits this model's shapes.
        A name is registered once: unregister it before registering another version."""
        if adapter.name in self.host:
            raise ValueError(f"adapter {adapter.name!r} is already registered; unregister it "
                             "first or use another name")
        if not math.isfinite(adapter.scale):
            raise AdapterError(f"adapter {adapter.name!r}: scale {adapter.scale} is not finite")
        L, _, H = self.tensor.shape
        shapes = target_shapes(self.cfg)
        for t, w in adapter.weights.items():   # w [L, r (C_A + C_B), H]
            I, O = shapes.get(t, (None, None))
            rows = adapter.rank * (row_pages(I, H) + row_pages(O, H)) if t in shapes else None
            if (*w.shape, adapter.in_width(t), adapter.out[t]) != (L, rows, H, I, O):
                raise AdapterError(f"adapter {adapter.name!r}: {t} has L={w.shape[0]}, rows="
                                   f"{w.shape[1]}, H={w.shape[2]}, in={adapter.in_width(t)}, "
                                   f"out={adapter.out[t]}; the model has L={L}, rows={rows}, "
                                   f"H={H}, in={I}, out={O}")
        self.host[adapter.name] = adapter

    def unregister(self, name: str):
        """Forget an adapter: its pages are freed if resident, its host copy dropped. Refused
        while running requests use it."""
        if name not in self.host:
            raise KeyError(f"adapter {name!r} is not registered")
        if name in self.resident:
            self.evict(name)   # raises if a running request uses it
        adapter = self.host.pop(name)
        if isinstance(adapter.weights, OnDisk):
            adapter.weights.store.drop(adapter.weights)

    def load(self, name: str, keep: frozenset = frozenset()):
        """Copy a registered adapter into pool pages (no-op if resident), one indexed copy per
        target; under CUDA on the side stream, its event recorded for acquire to wait on."""
        if name not in self.host:
            raise KeyError(f"adapter {name!r} is not registered (known: {sorted(self.host)})")
        if name in self.resident:
            return
        ad = self.host[name]
        weights = {t: ad.weights[t] for t in ad.targets}   # first: a read may fail, no page taken
        taken, k = self._take(self.pages_for(ad), ADAPTER, keep), self.rows.per_page
        flat, pages, start = [k * p + i for p in taken for i in range(k)], {}, 0   # row ids
        for t in ad.targets:
            n = ad.rank * sum(ad.chunks(t))                                 # r (C_A + C_B)
            pages[t], start = flat[start:start + n], start + n
        res = Resident(pages, taken)
        if self.copy_stream is None:
            for t in ad.targets:
                self.rows.write(pages[t], weights[t])                  # [L, r (C_A + C_B), H]
        else:
            # The pages may have been freed by work still queued on the compute stream: wait.
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.tensor.device))
            with torch.cuda.stream(self.copy_stream):
                for t in ad.targets:
                    idx = torch.tensor(pages[t], device=self.tensor.device)
                    self.rows.write(idx, weights[t].to(self.tensor.device, non_blocking=True))
                res.ready = torch.cuda.Event()
                res.ready.record(self.copy_stream)
        self.resident[name] = res

    def acquire(self, name: str):
        """A running request uses the adapter: load it if needed, count the use, and order its
        copy before the compute that reads it."""
        self.load(name)
        res = self.resident[name]
        res.refs += 1
        self.resident.move_to_end(name)
        if res.ready is not None:
            torch.cuda.current_stream(self.tensor.device).wait_event(res.ready)

    def release(self, name: str):
        res = self.resident[name]
        if res.refs == 0:
            raise ValueError(f"adapter {name!r} released more often than acquired")
        res.refs -= 1
        self.resident.move_to_end(name)   # most recently used: evicted last

    def evict(self, name: str):
        res = self.resident[name]
        if res.refs:
            raise ValueError(f"adapter {name!r} is used by {res.refs} running requests")
        if res.ready is not None:   # the pages may be reused on the compute stream: copy first
            torch.cuda.current_stream(self.tensor.device).wait_event(res.ready)
        self.alloc.free(self.resident.pop(name).taken)

    def prefetch(self, names: Sequence[str]) -> List[str]:
        """Load the adapters of the next likely requests, in order, while room allows without
        evicting one of them or a used one; returns the names loaded. Call before the step's
        forward, so that the copies overlap it."""
        keep, loaded = frozenset(names), []
        for name in names:
            if name in self.resident or name not in self.host:
                continue
            try:
                self.load(name, keep)
            except PoolFullError:
                break
            loaded.append(name)
        return loaded

    def kernel_tables(self, names: Sequence[str]) -> Dict[str, AdapterTables]:
        """The index tensors for slots [base model, names[0], ...] of each target that one of
        names adapts (the others need no launch)."""
        absent = [name for name in names if name not in self.resident]
        if absent:
            raise KeyError(f"adapters {absent} are not resident in the pool; acquire them first")
        tables, shapes, H = {}, target_shapes(self.cfg), self.cfg.dim
        for t in [t for t in SERVABLE if any(t in self.resident[n].pages for n in names)]:
            ca, cb = row_pages(shapes[t][0], H), row_pages(shapes[t][1], H)
            page_ids, a_start, b_start, ranks, scales = [], [0], [0], [0], [0.0]
            for name in names:
                ad, res = self.host[name], self.resident[name]
                r = ad.rank if t in res.pages else 0
                a_start.append(len(page_ids))
                b_start.append(len(page_ids) + r * ca)
                page_ids += res.pages[t] if r else []
                ranks.append(r)
                scales.append(ad.scale if r else 0.0)
            dev = self.tensor.device
            ints = [torch.tensor(xs, dtype=torch.int32, device=dev)
                    for xs in (page_ids, a_start, b_start, ranks)]
            tables[t] = AdapterTables(*ints, torch.tensor(scales, device=dev), ca, cb)
        return tables


# ---------------------------------------------------------------- demo: python paging.py
@dataclass
class PictureConfig:
    picture: Optional[str] = cli.flag(None, "write the pool after the demo as an SVG picture to "
                                            "this file (pool_view.py), its owners beside it as "
                                            "JSON", str)


def _demo(cfg: PoolConfig, picture: Optional[str] = None):
    pool, widths = UnifiedPool(cfg), target_widths(cfg)
    qv = {t: widths[t] for t in ("q_proj", "v_proj")}
    for name, out, rank in (("a", qv, 2), ("b", widths, 1), ("c", qv, 3)):
        pool.register(HostAdapter.random(name, cfg.n_layers, cfg.dim, out, rank, seed=rank))
        print(f"adapter {name}: rank {rank}, targets {list(out)} -> {pool.host[name].n_pages} pages")
    print(f"pool [L, P, H] = {list(pool.tensor.shape)}, g = {pool.g} tokens per KV page")

    def show(what):
        s = pool.stats()
        print(f"{what:<46} {pool.alloc.page_map()}  kv {s.kv:2d} adapter {s.adapter:2d} "
              f"free {s.free:2d}")

    show("empty")
    pool.allocate_kv(0, 5)
    show("request 0: prompt of 5 tokens")
    pool.acquire("a")
    show("request 0 uses adapter a: loaded")
    pool.allocate_kv(1, 7)
    pool.allocate_kv(0, 9)
    show("request 1 (7 tokens); request 0 grows to 9")
    pool.acquire("b")
    show("request 1 uses adapter b: loaded")
    pool.free_seq(0)
    pool.release("a")
    show("request 0 ends: KV freed, a unused but kept")
    free, resident = pool.stats().free, list(pool.resident)
    pool.acquire("c")
    show("request 2 uses adapter c: loaded")
    print(f"  c needed {pool.host['c'].n_pages} pages and {free} were free, so "
          f"{[n for n in resident if n not in pool.resident]} was evicted: the least recently used\n"
          "  adapter that no running request uses (b is in use); its host copy stays for later.")
    print(f"{'prefetch a while b and c are in use:':<46} loaded {pool.prefetch(['a'])}: "
          f"{pool.stats().free} pages free, a needs 8, and adapters in use are never evicted")
    pool.release("b")
    print(f"{'request 1 ends, b unused; prefetch a again:':<46} loaded {pool.prefetch(['a'])}: "
          "b, unused, was evicted for it")
    show(f"resident now {list(pool.resident)}")
    c, pages = pool.host["c"], pool.resident["c"].pages["v_proj"]
    same = torch.equal(pool.tensor[:, pages[:c.rank]], c.a("v_proj")) and \
        torch.equal(pool.tensor[:, pages[c.rank:], :cfg.kv_dim], c.bt("v_proj"))
    print(f"pool pages of c.v_proj hold exactly A and B^T: {same}")
    t = pool.kernel_tables(["a", "c"])["v_proj"]
    print(f"kernel tables for v_proj, slots [base, a, c]: ranks {t.ranks.tolist()} a_start "
          f"{t.a_start.tolist()} b_start {t.b_start.tolist()} page_ids {t.page_ids.tolist()}")
    if picture:
        pool.allocate_kv(3, 6)
        pool_view.write_picture(pool, picture, "the demo's pool at its end")


def _demo_wide_rows(cfg: PoolConfig):
    """The pages of an adapter on all seven projections: gate, up and down rows span pages."""
    F, H = cfg.ffn_dim, cfg.dim
    m = HostAdapter.random("m", cfg.n_layers, H, target_widths(cfg, SERVABLE), 1,
                           inp={"down_proj": F})
    print(f"an all-linear adapter of rank 1 (F = {F} = {F / H:.2f} H, a row of F numbers spans "
          f"ceil(F / H) = {row_pages(F, H)} pages) takes {m.n_pages} pages: "
          + ", ".join(f"{t} {m.rank * sum(m.chunks(t))}" for t in m.targets))


if __name__ == "__main__":
    demo_cfg, pic = cli.parse([PoolConfig, PictureConfig],
                              "Show the unified pool (S-LoRA section 4) at work.")
    _demo(demo_cfg, pic.picture)
    _demo_wide_rows(demo_cfg)
