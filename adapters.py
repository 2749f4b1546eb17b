"""The adapter store on the host: LoRA adapters packed into the page rows of the pool (S-LoRA,
arXiv 2311.03285, section 4.1).

S-LoRA keeps every adapter in main memory and copies the ones a batch needs into the GPU's pool
(paging.py). An adapter of rank r adapts targets t with A [r, I] and B [O, r] (lora.py); the pool
stores B as B^T [r, O], so that both halves are r rows that a page of H numbers holds, or that
C = ceil(W / H) pages hold for a row of width W > H (gate, up: O = F; down: I = F). HostAdapter
packs each target once, when it is registered, into exactly the rows its pages will hold, so that
loading it is one indexed copy per target.
Every registered adapter stays in host memory (pinned under CUDA), as in S-LoRA, unless a host
limit N is set: then adapters registered by path keep at most N copies in host memory (HostStore,
least recently read dropped first) and the others are read from their files when the pool loads
them, so that disk, not host memory, bounds how many are served. AdapterRegistry is the
engine's view of names: the current version of each, and how many running requests use it.
Letters: L layers, H model dim (page width), r rank, I input width of a target (of A), O output
width (of B), C pages per row (C_A = ceil(I / H), C_B = ceil(O / H)), F ffn_dim.
Simplified: adapters are PEFT directories (lora.read_adapter) or random (the benchmarks'); a file
changed after registration is refused, not re-read.
Demo: `python paging.py` registers random adapters, all-linear among them, and shows their pages.
"""
import itertools
import os
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Optional, Sequence, Set, Tuple

import torch

from lora import AdapterError, LoRAConfig, peft_key, read_adapter

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")   # S-LoRA's setting, all of input width H
SERVABLE = ATTENTION + ("gate_proj", "up_proj", "down_proj")   # every projection ("all-linear")
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
        """Pool rows it fills when loaded: r C_A + r C_B per target (a page each for float rows;
        paging.UnifiedPool.pages_for)."""
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


class AdapterRegistry:
    """The adapter names an engine serves, and when each version may leave the pool.

    A name points at the pool key of its newest version. Registering a name again serves the
    new version to requests submitted from then on, under the key name#k, while the requests
    submitted before finish on the old one: each key counts its requests (`users`), and a retired
    key (replaced or removed) is unregistered from the pool when its last request ends.
    pages_of(adapter) is what the adapter takes in the pool (0 for a baseline that merges it)
    and store(adapter) puts its host copy in the pool (checked against the model's shapes)."""

    def __init__(self, pool, pages_of: Callable, store: Callable, host_limit: Optional[int]):
        self.pool, self.pages_of, self.store = pool, pages_of, store
        self.pages: Dict[str, int] = {}      # pool key -> its pages (what the scheduler reads)
        self.current: Dict[str, str] = {}    # public name -> pool key of its newest version
        self.users: Counter = Counter()      # pool key -> requests submitted and not ended
        self.retired: Set[str] = set()       # replaced or removed, unregistered when unused
        self.dropped = 0                     # versions unregistered while resident in the pool
        self.host_store = None if host_limit is None else HostStore(host_limit)   # None: all

    def add(self, name: str, path: str, n_layers: int, dim: int):
        """Register a PEFT directory, read and checked now (under a host limit then kept as its
        files, HostStore); a bad one raises AdapterError naming it and changes nothing."""
        try:
            if self.host_store is None:
                self.register(HostAdapter.from_dir(name, path, n_layers, dim))
            else:
                self.register(self.host_store.open(name, path, n_layers, dim))
        except (ValueError, KeyError) as e:
            raise AdapterError(f"adapter {name!r} at {path}: {e}") from None

    def register(self, adapter: HostAdapter):
        """Serve `adapter` under adapter.name from now on; a bad one raises, changing nothing."""
        key, k = adapter.name, 1
        while key in self.pool.host:
            key, k = f"{adapter.name}#{k + 1}", k + 1
        self.store(replace(adapter, name=key))
        self.pages[key] = self.pages_of(adapter)
        if adapter.name in self.current:
            self._retire(self.current[adapter.name])
        self.current[adapter.name] = key

    def remove(self, name: str) -> int:
        """Forget a name; its requests finish first. Returns how many still use it (0: gone)."""
        if name not in self.current:
            raise KeyError(f"adapter {name!r} is not registered")
        key = self.current.pop(name)
        self._retire(key)
        return self.users[key]

    def hold(self, name: str) -> str:
        """A request submitted for `name` holds its newest version: returns that pool key."""
        key = self.current[name]
        self.users[key] += 1
        return key

    def release(self, key: str):
        """A request of `key` ended; a retired version goes with its last request."""
        self.users[key] -= 1
        self._unregister_if_unused(key)

    def _retire(self, key: str):
        self.retired.add(key)
        self._unregister_if_unused(key)

    def _unregister_if_unused(self, key: str):
        if key in self.retired and self.users[key] == 0:
            self.retired.discard(key)
            del self.pages[key], self.users[key]
            self.dropped += key in self.pool.resident   # left the pool without an eviction
            self.pool.unregister(key)

    def where(self) -> Dict[str, tuple]:
        """name -> (tier, requests using it, pool pages): tier "pool" (resident: its pages hold
        it), "host" (its weights in host memory) or "disk" (its files only, read when loaded)."""
        def one(key):
            resident, weights = self.pool.resident.get(key), self.pool.host[key].weights
            on_disk = isinstance(weights, OnDisk) and weights.serial not in self.host_store.copies
            pages = len(resident.taken) if resident else 0
            return "pool" if resident else "disk" if on_disk else "host", self.users[key], pages
        return {name: one(key) for name, key in self.current.items()}

    def in_host_memory(self) -> int:
        """Adapters held whole in host memory, and the host copies of those kept as files."""
        held = sum(not isinstance(a.weights, OnDisk) for a in self.pool.host.values())
        return held + (0 if self.host_store is None else len(self.host_store.copies))


def _stamp(name: str, path: str) -> tuple:
    """(modification time, size) of the two files of a PEFT directory; a change shows in it."""
    try:
        return tuple((s.st_mtime_ns, s.st_size) for s in
                     (os.stat(os.path.join(path, f)) for f in PEFT_FILES))
    except OSError as e:
        raise AdapterError(f"adapter {name!r}: cannot read its files at {path} (removed after "
                           f"registration?): {e}") from None
