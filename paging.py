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

Every registered adapter stays in host memory (pinned under CUDA), as in S-LoRA, unless a host
limit N is set: then adapters registered by path keep at most N copies in host memory (HostStore,
least recently read dropped first) and the others are read from their files when the pool loads
them, so that disk, not host memory, bounds how many are served. An adapter is copied into the pool
when a request needs it, stays while a running request uses it (a reference count), and is
evicted, least recently used first, only when its pages are wanted for KV or another adapter.
Prefetch (section 4.2) loads the adapters of the next likely requests while the current batch
runs: under CUDA on a side stream, ordered by an event.

Letters: L layers, P pages, H model dim (page width), r rank, I input width of a target (of A),
O output width (of B), C pages per row (C_A = ceil(I / H), C_B = ceil(O / H)), F ffn_dim, g tokens
per KV page, S adapter slots.
Simplified: KV pages are taken lowest index first, adapter pages highest first (so an adapter's
pages are usually consecutive and the CPU path reads them in place); no swapping of KV to host.
Demo: `python paging.py` prints a map of the pool (. free, K kv cache, A adapter) as requests
come and go, and says when and why an adapter is evicted.
"""
import heapq
import itertools
import math
import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import cli
from lora import AdapterError, LoRAConfig, peft_key, read_adapter

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")   # S-LoRA's setting, all of input width H
SERVABLE = ATTENTION + ("gate_proj", "up_proj", "down_proj")   # every projection ("all-linear")
KV, ADAPTER = "kv", "adapter"   # the two kinds of page owner
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")   # lora.read_adapter reads them


def target_shapes(model_cfg) -> Dict[str, Tuple[int, int]]:
    """(I, O) of each servable target, A [r, I] and B [O, r]: (H, H) for q and o, (H, kv_dim)
    for k and v (GQA), (H, F) for gate and up, (F, H) for down; model_cfg has .dim, .kv_dim and
    .ffn_dim (a model.ModelConfig, or a PoolConfig)."""
    H, kv_dim, F = model_cfg.dim, model_cfg.kv_dim, model_cfg.ffn_dim
    return {"q_proj": (H, H), "k_proj": (H, kv_dim), "v_proj": (H, kv_dim), "o_proj": (H, H),
            "gate_proj": (H, F), "up_proj": (H, F), "down_proj": (F, H)}


def target_widths(model_cfg, targets: Sequence[str] = ATTENTION) -> Dict[str, int]:
    """Output width O of each of `targets` (default: q, k, v, o, as S-LoRA's benchmarks adapt)."""
    shapes = target_shapes(model_cfg)
    return {t: shapes[t][1] for t in targets}


def row_pages(width: int, dim: int) -> int:
    """C = ceil(W / H): pages that one adapter row of W numbers spans in a pool of page width H."""
    return -(-width // dim)


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

    @property
    def kv_dim(self) -> int:
        return self.dim // self.tokens_per_page

    @staticmethod
    def for_model(model_cfg, n_pages: int, dtype: str = "float32",
                  device: str = "cpu") -> "PoolConfig":
        """From a model.ModelConfig (dim, n_layers, n_heads, n_kv_heads, ffn_dim)."""
        return PoolConfig(model_cfg.n_layers, n_pages, model_cfg.dim,
                          model_cfg.n_heads // model_cfg.n_kv_heads, dtype, device,
                          model_cfg.ffn_dim)


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
class HostAdapter:
    """A LoRA adapter in host memory, packed per target as W [L, r (C_A + C_B), H], the rows its
    pages will hold: A row j on rows j C_A .. j C_A + C_A - 1 (numbers c H .. c H + H - 1 on the
    c-th), then B^T row j likewise from row r C_A on, every row's tail zero. Loading is then one
    indexed copy per target; q, k, v, o (C_A = C_B = 1) are W [L, 2r, H]: A rows, then B^T rows."""
    name: str
    rank: int
    scale: float                      # alpha / r (alpha / sqrt(r) with rsLoRA)
    weights: Dict[str, torch.Tensor]  # target -> [L, r (C_A + C_B), H] float32
    out: Dict[str, int]               # target -> O, the output width of B
    inp: Optional[Dict[str, int]] = None        # target -> I, the input width of A; None: all H
    dim: int = field(init=False, repr=False)    # H, the width of the packed rows (a page)

    def __post_init__(self):
        if not self.weights:
            raise AdapterError(f"adapter {self.name!r} adapts no module")
        on_disk = isinstance(self.weights, OnDisk)     # its width is known without a read
        self.dim = self.weights.dim if on_disk else next(iter(self.weights.values())).shape[2]

    @property
    def targets(self) -> Tuple[str, ...]:
        return tuple(self.weights)

    def in_width(self, target: str) -> int:
        return self.dim if self.inp is None else self.inp[target]

    def chunks(self, target: str) -> Tuple[int, int]:
        """(C_A, C_B): pages per row of A and per row of B^T."""
        return row_pages(self.in_width(target), self.dim), row_pages(self.out[target], self.dim)

    @property
    def n_pages(self) -> int:
        """Pages it takes when loaded: r C_A + r C_B per target."""
        return sum(self.rank * sum(self.chunks(t)) for t in self.weights)

    def a(self, target: str) -> torch.Tensor:   # [L, r, I]
        w, rows = self.weights[target], self.rank * self.chunks(target)[0]
        return w[:, :rows].reshape(w.shape[0], self.rank, -1)[:, :, :self.in_width(target)]

    def bt(self, target: str) -> torch.Tensor:  # [L, r, O]
        w, rows = self.weights[target], self.rank * self.chunks(target)[0]
        return w[:, rows:].reshape(w.shape[0], self.rank, -1)[:, :, :self.out[target]]

    @staticmethod
    def from_peft(name: str, cfg: LoRAConfig, tensors: Dict[str, torch.Tensor], n_layers: int,
                  dim: Optional[int] = None) -> "HostAdapter":
        """From lora.read_adapter's (config, {PEFT key: tensor}): every layer must have each
        target, with one shape in all layers; dim, when given, is the model's H (else read from
        the adapter). Any problem is an AdapterError naming the adapter."""
        if len(tensors) != 2 * n_layers * len(cfg.targets):
            raise AdapterError(f"adapter {name!r}: {len(tensors)} tensors, expected lora_A and "
                               f"lora_B for {len(cfg.targets)} targets in each of {n_layers} "
                               "layers (built for another model?)")
        unservable = [t for t in cfg.targets if t not in SERVABLE]
        if unservable:
            raise AdapterError(f"adapter {name!r}: module {unservable[0]!r} cannot be served "
                               f"(only {list(SERVABLE)})")
        stacked = {t: (_stack(name, t, "lora_A", tensors, n_layers),                 # [L, r, I]
                       _stack(name, t, "lora_B", tensors, n_layers).transpose(1, 2))  # [L, r, O]
                   for t in cfg.targets}
        H = dim or _page_width(stacked)
        weights, out, inp = {}, {}, {}
        for target, (A, Bt) in stacked.items():
            if A.shape[1] != cfg.r or Bt.shape[1] != cfg.r:   # the packing would pad or broadcast
                raise AdapterError(f"adapter {name!r}: {target} has A of {A.shape[1]} rows and B "
                                   f"of {Bt.shape[1]} columns; the config says r = {cfg.r}")
            _check_widths(name, target, A.shape[2], Bt.shape[2], H, dim)
            inp[target], out[target] = A.shape[2], Bt.shape[2]
            packed = pack(A, Bt, cfg.r, (row_pages(inp[target], H), row_pages(out[target], H)), H)
            weights[target] = packed.pin_memory() if torch.cuda.is_available() else packed
        return HostAdapter(name, cfg.r, cfg.scale, weights, out, inp)

    @staticmethod
    def from_dir(name: str, path: str, n_layers: int, dim: Optional[int] = None) -> "HostAdapter":
        return HostAdapter.from_peft(name, *read_adapter(path), n_layers, dim)

    @staticmethod
    def random(name: str, n_layers: int, dim: int, out: Dict[str, int], rank: int,
               alpha: float = 16.0, seed: int = 0,
               inp: Optional[Dict[str, int]] = None) -> "HostAdapter":
        """A synthetic adapter (random A and B under PEFT keys), as S-LoRA's benchmarks use;
        out maps each target to O (target_widths gives the model's), inp a target to I where it
        is not H (down_proj: F)."""
        gen, tensors = torch.Generator().manual_seed(seed), {}
        for i in range(n_layers):
            for t, width in out.items():
                fan_in = (inp or {}).get(t, dim)
                A = torch.randn(rank, fan_in, generator=gen) / fan_in ** 0.5              # [r, I]
                tensors[peft_key(i, t, "lora_A")] = A
                tensors[peft_key(i, t, "lora_B")] = torch.randn(width, rank, generator=gen) / rank
        cfg = LoRAConfig(r=rank, alpha=alpha, targets=tuple(out))
        return HostAdapter.from_peft(name, cfg, tensors, n_layers, dim)


def pack(A: torch.Tensor, Bt: torch.Tensor, rank: int, chunks: Tuple[int, int],
         dim: int) -> torch.Tensor:
    """A [L, <= r, <= C_A H] and B^T [L, r, <= C_B H] -> one target's page rows [L, r (C_A + C_B),
    H] in HostAdapter's layout (chunks = (C_A, C_B)), zeros wherever A or B^T does not reach."""
    (ca, cb), L = chunks, A.shape[0]
    packed = torch.zeros(L, rank * (ca + cb), dim)
    packed[:, :rank * ca].view(L, rank, ca * dim)[:, :A.shape[1], :A.shape[2]] = A
    packed[:, rank * ca:].view(L, rank, cb * dim)[:, :, :Bt.shape[2]] = Bt
    return packed


def _page_width(stacked) -> int:
    """H read from an adapter {target: (A [L, r, I], B^T [L, r, O])}: the input width of every
    target but down_proj, whose output width it is."""
    target, (A, Bt) = next(iter(stacked.items()))
    return Bt.shape[2] if target == "down_proj" else A.shape[2]


def _check_widths(name, target, in_width, out_width, H, dim):
    """Only down_proj reads more than H numbers (F), only gate and up write more; the exact
    widths are checked against the model when the pool registers the adapter."""
    if (in_width == H or target == "down_proj") and (out_width <= H or target in ("gate_proj",
                                                                                  "up_proj")):
        return
    rule = f"the model has H = {dim}" if dim else f"H = {H}, read from the adapter"
    raise AdapterError(f"adapter {name!r}: {target} has A of input width {in_width} and B of "
                       f"output width {out_width}; {rule}, and only down_proj reads more than H "
                       "numbers, only gate_proj and up_proj write more (built for another model?)")


def _stack(name, target, which, tensors, n_layers):
    """The `which` tensors ("lora_A" or "lora_B") of one target, layer by layer: [L, ., .]."""
    per_layer = []
    for i in range(n_layers):
        key = peft_key(i, target, which)
        if key not in tensors:
            raise AdapterError(f"adapter {name!r}: missing {key} (the model has {n_layers} layers)")
        t = tensors[key]
        if per_layer and t.shape != per_layer[0].shape:
            raise AdapterError(f"adapter {name!r}: {key} has shape {list(t.shape)}, layer 0 "
                               f"{list(per_layer[0].shape)}: every layer must have one shape")
        per_layer.append(t.float())
    return torch.stack(per_layer)


class OnDisk(Mapping):
    """target -> packed weights [L, r (C_A + C_B), H] of an adapter that stays in its PEFT directory (the
    weights of a HostAdapter registered by path under a host limit). Listing the targets reads
    nothing; a target's weights come from the store's host copy, read again if it was dropped."""

    def __init__(self, store: "HostStore", serial: int, name: str, path: str,
                 targets: Tuple[str, ...], shape: Tuple[int, int], stamp: tuple):
        self.store, self.serial, self.name, self.path = store, serial, name, path
        self.targets, (self.n_layers, self.dim), self.stamp = targets, shape, stamp

    def __getitem__(self, target: str) -> torch.Tensor:
        return self.store.fetch(self).weights[target]

    def __iter__(self):
        return iter(self.targets)

    def __len__(self) -> int:
        return len(self.targets)


class HostStore:
    """Host copies of the adapters registered by path, at most `limit` at once: reading one more
    drops the least recently read first. A copy is needed only to load the pool (while an adapter
    is resident, its pages hold it), so any copy may go; 10,000 registered adapters cost the host
    memory of `limit` of them, and a load whose copy went reads the files again (`reads`)."""

    def __init__(self, limit: int):
        self.limit, self.reads, self.serials = limit, 0, itertools.count()
        self.copies: "OrderedDict[int, HostAdapter]" = OrderedDict()   # serial -> copy, LRU first

    def open(self, name: str, path: str, n_layers: int, dim: int) -> HostAdapter:
        """Registration: read the adapter once with every check of HostAdapter.from_dir (keys,
        shapes, finite values), so that a bad one is refused now, not at its first request. The
        copy stays as the most recently read; the returned adapter's weights are OnDisk."""
        stamp = _stamp(name, path)          # before reading: a change during the read shows later
        serial = next(self.serials)
        copy = self._read(serial, name, path, n_layers, dim)
        disk = OnDisk(self, serial, name, path, copy.targets, (n_layers, dim), stamp)
        return HostAdapter(name, copy.rank, copy.scale, disk, dict(copy.out), copy.inp)

    def fetch(self, disk: OnDisk) -> HostAdapter:
        """The host copy of disk's adapter, read from its files if it was dropped; AdapterError
        if they were changed or removed since registration (only its requests fail)."""
        if disk.serial in self.copies:
            self.copies.move_to_end(disk.serial)
            return self.copies[disk.serial]
        if _stamp(disk.name, disk.path) != disk.stamp:
            raise AdapterError(f"adapter {disk.name!r}: the files at {disk.path} changed after "
                               "registration; register it again to serve the new version")
        return self._read(disk.serial, disk.name, disk.path, disk.n_layers, disk.dim)

    def drop(self, disk: OnDisk):
        """Forget the copy of an unregistered adapter."""
        self.copies.pop(disk.serial, None)

    def _read(self, serial: int, name: str, path: str, n_layers: int, dim: int) -> HostAdapter:
        while len(self.copies) >= self.limit:   # room first: never more than limit copies
            self.copies.popitem(last=False)
        copy = HostAdapter.from_dir(name, path, n_layers, dim)
        self.reads += 1
        self.copies[serial] = copy
        return copy


def _stamp(name: str, path: str) -> tuple:
    """(modification time, size) of the two files of a PEFT directory; a change shows in it."""
    try:
        return tuple((s.st_mtime_ns, s.st_size) for s in
                     (os.stat(os.path.join(path, f)) for f in PEFT_FILES))
    except OSError as e:
        raise AdapterError(f"adapter {name!r}: cannot read its files at {path} (removed after "
                           f"registration?): {e}") from None


@dataclass
class Resident:
    """An adapter copied into the pool: per target its r (C_A + C_B) pages (A, then B^T)."""
    pages: Dict[str, List[int]]
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
        self.alloc = PageAllocator(cfg.n_pages)
        self.blocks: Dict[int, List[Tuple[int, int]]] = {}   # seq -> [(K page, V page)] per block
        self.host: Dict[str, HostAdapter] = {}
        self.resident: "OrderedDict[str, Resident]" = OrderedDict()  # least recently used first
        self.copy_stream = torch.cuda.Stream(self.tensor.device) if self.tensor.is_cuda else None

    def stats(self) -> PoolStats:
        return self.alloc.stats()

    def _take(self, n: int, owner: str, keep: frozenset = frozenset()) -> List[int]:
        """n pages, evicting unused adapters if needed: least recently used first, never one in
        keep. Used adapters are never evicted: their requests are running."""
        unused = [name for name, res in self.resident.items() if res.refs == 0 and name not in keep]
        evictable = sum(self.host[name].n_pages for name in unused)
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
        flat, pages, start = self._take(ad.n_pages, ADAPTER, keep), {}, 0
        for t in ad.targets:
            n = ad.rank * sum(ad.chunks(t))                                 # r (C_A + C_B)
            pages[t], start = flat[start:start + n], start + n
        res = Resident(pages)
        if self.copy_stream is None:
            for t in ad.targets:
                self.tensor[:, pages[t]] = weights[t].to(self.tensor.dtype)   # [L, r (C_A + C_B), H]
        else:
            # The pages may have been freed by work still queued on the compute stream: wait.
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.tensor.device))
            with torch.cuda.stream(self.copy_stream):
                for t in ad.targets:
                    idx = torch.tensor(pages[t], device=self.tensor.device)
                    w = weights[t].to(self.tensor.device, non_blocking=True)
                    self.tensor[:, idx] = w.to(self.tensor.dtype)
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
        self.alloc.free([p for pages in self.resident.pop(name).pages.values() for p in pages])

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
def _demo(cfg: PoolConfig):
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


def _demo_wide_rows(cfg: PoolConfig):
    """The pages of an adapter on all seven projections: gate, up and down rows span pages."""
    F, H = cfg.ffn_dim, cfg.dim
    m = HostAdapter.random("m", cfg.n_layers, H, target_widths(cfg, SERVABLE), 1,
                           inp={"down_proj": F})
    print(f"an all-linear adapter of rank 1 (F = {F} = {F / H:.2f} H, a row of F numbers spans "
          f"ceil(F / H) = {row_pages(F, H)} pages) takes {m.n_pages} pages: "
          + ", ".join(f"{t} {m.rank * sum(m.chunks(t))}" for t in m.targets))


if __name__ == "__main__":
    demo_cfg, = cli.parse([PoolConfig], "Show the unified pool (S-LoRA section 4) at work.")
    _demo(demo_cfg)
    _demo_wide_rows(demo_cfg)
