"""The engine's memory (S-LoRA, Sheng et al. 2023, arXiv 2311.03285, section 4).

Where a step's KV cache and adapter weights live, as the engine (engine.py) sees it: PoolMemory
is S-LoRA's, one unified pool (paging.py) shared by both, with adapters loaded when their
requests join and ahead of them (4.2). The memories S-LoRA is measured against are subclasses:
a static split of the same pages and merged weights (baselines.py), and a device's shard under
tensor parallelism (tp.py). The engine gives its scheduler the page budgets `split` returns and
its adapter registry `pages_of`, the pages an adapter takes.
Simplified: a prefetch that fails is dropped; the load is tried again when its requests join,
and fails them if it fails again.
Demo: `python serve.py --modes slora,no-unified --adapters 1000 --layers 4 --rate 64 --duration 2`
(the unified pool against a static split of the same memory: first tokens 0.97 s against 1.31 s).
"""
from typing import List, Optional, Tuple

from adapters import HostAdapter
from model import Llama
from paging import PoolConfig, UnifiedPool
from scheduler import Request


class PoolMemory:
    """S-LoRA's memory (section 4): KV cache and adapter weights share one unified pool, an
    adapter is copied into pool pages when a request of it joins the batch and stays until
    evicted, and the adapters of the next waiting requests are loaded ahead (4.2). A baseline
    with another memory (baselines.py) is a subclass of this class."""

    def __init__(self, model: Llama, cfg):   # cfg: the engine's EngineConfig
        self.cfg, self.loads = cfg, 0                   # loads: adapter copies into the pool
        self.kv_budget, self.adapter_budget = self.split()
        w = model.lm_head.weight
        self.pool = UnifiedPool(PoolConfig.for_model(model.config, self.kv_budget,
                                                     str(w.dtype).split(".")[-1], str(w.device),
                                                     cfg.adapter_dtype))

    def split(self) -> Tuple[int, Optional[int]]:
        """(pages of the KV cache, pages reserved for adapters): S-LoRA shares one pool (None)."""
        return self.cfg.pool_pages, None

    def store(self, adapter: HostAdapter):
        """Keep the host copy (checked against the model's shapes)."""
        self.pool.register(adapter)

    def pages_of(self, adapter: HostAdapter) -> int:
        """Pages the adapter takes when loaded: r ceil(I / H) + r ceil(O / H) per target
        (paging.py); 2 r for q, k, v, o."""
        return self.pool.pages_for(adapter)

    def acquire(self, name: str):
        self.loads += name not in self.pool.resident
        self.pool.acquire(name)

    def release(self, name: str):
        self.pool.release(name)

    def prefetch(self, names: List[str]):
        self.loads += len(self.pool.prefetch(names))

    def prefetch_for(self, waiting: List[Request]):
        """S-LoRA 4.2: load the adapters of the next waiting requests before they join."""
        try:
            self.prefetch([r.adapter for r in waiting if r.adapter])
        except Exception:   # a load that fails here fails again, with its requests, when they join
            pass
