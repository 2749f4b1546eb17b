"""The baselines of S-LoRA's evaluation (Sheng et al. 2023, arXiv 2311.03285, section 7.1).

Each is engine.Engine with one part replaced, so the comparison measures the one idea it lacks:
    no-unified  no unified paging (sec. 4.1): memory split statically between KV and adapters, so
                one side idles while the other is full; an adapter is copied anew when it returns.
    bmm         no custom kernels (sec. 5): each step pads its adapters to the largest rank and
                runs torch.bmm: a copy per step and arithmetic on padding.
    merged      PEFT-style: one adapter merged into the weights at a time; the others' requests
                wait for their turn, batches are small, the weights are rewritten at each switch.
Simplified: on a CPU no-unified computes LoRA as slora's CPU path does; only memory differs.
Demo: `python serve.py --adapters 20 --duration 3 --layers 4 --modes slora,no-unified,bmm,merged`.
Letters: L layers, I and O input and output width of a target, S adapter slots, Rm largest rank.
"""
from typing import Callable, Dict, List, NamedTuple, Optional

import torch

import kernels
from adapters import ATTENTION, HostAdapter
from engine import Engine
from memory import PoolMemory
from model import Llama
from runner import AdapterSlots, ModelRunner
from scheduler import Request, ScheduledBatch, State


class OwnCopy(NamedTuple):
    """An adapter in tensors of its own (no unified pool): per target A [L, r, I], B^T [L, r, O]."""
    A: Dict[str, torch.Tensor]
    Bt: Dict[str, torch.Tensor]
    scale: float


class OwnCopyMemory(PoolMemory):
    """pool_pages - adapter_reserve KV pages beside adapter_reserve pages for adapters, each copied
    into tensors of its own when a batch needs it and freed when no running request uses it."""

    def __init__(self, model: Llama, cfg):
        float_rows_only(cfg, "no-unified", "its adapters live in tensors of their own, outside "
                                           "the pool")
        self.copies: Dict[str, OwnCopy] = {}
        self.users: Dict[str, int] = {}            # running requests per own copy
        super().__init__(model, cfg)

    def split(self):
        reserve = self.cfg.adapter_reserve
        reserve = self.cfg.pool_pages // 2 if reserve is None else reserve
        return self.cfg.pool_pages - reserve, reserve

    def acquire(self, name: str):
        if name not in self.copies:   # a fresh allocation and copy, as without a shared pool
            ad = self.pool.host[name]
            self.copies[name] = OwnCopy({t: ad.a(t).clone() for t in ad.targets},
                                        {t: ad.bt(t).clone() for t in ad.targets}, ad.scale)
        self.users[name] = self.users.get(name, 0) + 1

    def release(self, name: str):
        self.users[name] -= 1
        if self.users[name] == 0:
            del self.copies[name], self.users[name]

    def prefetch(self, names: List[str]):
        """Nothing to prefetch into: adapters are copied when a batch needs them."""


class OwnCopyRunner(ModelRunner):
    """Two matrix products per run of one adapter's tokens (kernels.lora_runs), on own copies."""

    def __init__(self, model: Llama, pool, copies: Dict[str, OwnCopy]):
        super().__init__(model, pool)
        self.copies = copies

    def lora(self, slots: AdapterSlots) -> Optional[Callable]:
        bounds = kernels.segment_starts(slots.lengths).tolist()   # row i: tokens bounds[i]:bounds[i+1]
        spans: Dict[str, tuple] = {}   # adapter -> (t0, t1); the batch keeps its requests together
        for row, slot in enumerate(slots.row_slots.tolist()):
            if slot:
                name = slots.names[slot - 1]
                spans[name] = (spans.get(name, (bounds[row],))[0], bounds[row + 1])

        def lora(x, layer, target):
            copies = [(t0, t1, self.copies[n]) for n, (t0, t1) in spans.items()]
            runs = [(t0, t1, c.A[target][layer], c.Bt[target][layer], c.scale)
                    for t0, t1, c in copies if target in c.A]
            return kernels.lora_runs(x, runs, self.out_dim[target]) if runs else None
        return lora if spans else None


class NoUnifiedEngine(Engine):
    """No unified paging: memory split statically (OwnCopyMemory), own copies (OwnCopyRunner)."""

    def _make_memory(self) -> PoolMemory:
        return OwnCopyMemory(self.model, self.cfg)

    def _make_runner(self) -> ModelRunner:
        return OwnCopyRunner(self.model, self.pool, self.memory.copies)


class BmmRunner(ModelRunner):
    """Each step copies its adapters into zero-padded [S, Rm, I] tensors for torch.bmm."""

    def lora(self, slots: AdapterSlots) -> Optional[Callable]:
        tables = self.pool.kernel_tables(slots.names)
        rows, row_scale = self.pool.rows.stacked()   # int8 rows are dequantized in the copy
        padded = {target: kernels.pad_adapters(rows, t, self.in_dim[target], self.out_dim[target],
                                               self.pool.tensor.dtype, row_scale)
                  for target, t in tables.items()}   # target -> (A [L, S, Rm, I], Bt [L, S, Rm, O])
        token_slots = slots.token_slots()

        def lora(x, layer, target):
            if target not in padded:
                return None
            A, Bt = padded[target]
            return kernels.bmm_lora(x, A[layer], Bt[layer], token_slots)
        return lora if padded else None


class BmmEngine(Engine):
    """The unified pool without the gathered kernels: a padded bmm each step (BmmRunner)."""

    def _make_runner(self) -> ModelRunner:
        return BmmRunner(self.model, self.pool)


class MergedMemory(PoolMemory):
    """Adapters merged into the weights: they take no pool pages and are never loaded."""

    def __init__(self, model: Llama, cfg):
        float_rows_only(cfg, "merged", "adapters are merged into the weights, not read from pages")
        super().__init__(model, cfg)

    def pages_of(self, adapter: HostAdapter) -> int:
        return 0

    def acquire(self, name: str):   # merged into the weights: nothing to load or free
        pass

    def release(self, name: str):
        pass

    def prefetch(self, names: List[str]):
        pass


class MergedRunner(ModelRunner):
    """The base model's forward: the adapter is in the weights."""

    def lora(self, slots: AdapterSlots) -> Optional[Callable]:
        return None


class MergedEngine(Engine):
    """PEFT-style: one adapter merged into the weights (W0 + (alpha/r) B A), only its requests
    batched; the weights are restored and the next adapter merged to switch."""

    def __init__(self, model: Llama, eos_id: Optional[int] = None, **options):
        self.waiting_turn: List[Request] = []     # requests of other adapters, not yet scheduled
        self.merged: Optional[str] = None
        self.base_weights: Dict[tuple, torch.Tensor] = {}   # (layer, target) -> W0, for the switch
        super().__init__(model, eos_id, **options)

    def _make_memory(self) -> PoolMemory:
        return MergedMemory(self.model, self.cfg)

    def _make_runner(self) -> ModelRunner:
        return MergedRunner(self.model, self.pool)

    def _enqueue(self, req: Request):
        if self.merged != req.adapter or self.scheduler.idle():
            self.waiting_turn.append(req)         # waits for its adapter's turn (_switch)
        else:
            self.scheduler.submit(req)

    def _end(self, rec, state: State, reason: str):
        self.waiting_turn = [r for r in self.waiting_turn if r is not rec.request]
        super()._end(rec, state, reason)

    def pending(self) -> bool:
        return bool(self.waiting_turn) or super().pending()

    def _schedule(self) -> ScheduledBatch:
        if self.scheduler.idle():
            self._switch()
        return super()._schedule()

    def _switch(self):
        """Restore W0; merge the oldest waiting request's adapter and schedule all its requests."""
        layers = self.model.model.layers
        with torch.no_grad():
            for (i, t), w in self.base_weights.items():
                _linear(layers[i], t).weight.copy_(w)
            self.base_weights, self.merged = {}, None
            if not self.waiting_turn:
                return
            name = min(self.waiting_turn, key=lambda r: r.arrival).adapter
            if name is not None:
                ad = self.pool.host[name]
                for i, t in ((i, t) for i in range(len(layers)) for t in ad.targets):
                    w = _linear(layers[i], t).weight                                 # [O, I]
                    self.base_weights[(i, t)] = w.clone()
                    w += ad.scale * ad.bt(t)[i].T.to(w) @ ad.a(t)[i].to(w)   # (alpha/r) B A
        self.merged = name
        for req in [r for r in self.waiting_turn if r.adapter == name]:
            self.waiting_turn.remove(req)
            self.scheduler.submit(req)


def float_rows_only(cfg, mode: str, why: str):
    """Refuse int8 adapter rows (EngineConfig.adapter_dtype) for a mode that does not read them."""
    if cfg.adapter_dtype != "float":
        raise ValueError(f"adapter_dtype {cfg.adapter_dtype!r} is not implemented for mode "
                         f"{mode}: {why}; use slora or bmm")


def _linear(layer, target: str):
    """The projection `target` of a layer: q, k, v, o of self_attn, gate, up, down of mlp."""
    return getattr(layer.self_attn if target in ATTENTION else layer.mlp, target)


ENGINES = {"slora": Engine, "no-unified": NoUnifiedEngine, "bmm": BmmEngine, "merged": MergedEngine}


def make_engine(mode: str, model: Llama, eos_id: Optional[int] = None, **options) -> Engine:
    """ENGINES[mode](model, eos_id, **options), with a clear error for an unknown mode."""
    if mode not in ENGINES:
        raise ValueError(f"unknown engine mode {mode!r}; choose from {list(ENGINES)}")
    return ENGINES[mode](model, eos_id, **options)
