"""S-LoRA's serving engine (Sheng et al. 2023, arXiv 2311.03285, sections 3-5) and its baselines.

One base model serves many LoRA adapters at once. Each call of `step` is one iteration:
    schedule     scheduler.py: who leaves, who joins, within the page budget of the unified pool
    build batch  one model.Batch: token ids, positions, page tables; the requests of one adapter
                 side by side, so that each adapter is one segment of the LoRA kernels
    run          model.forward_paged; its LoRA part y += scale (x A^T) B^T per token (the row form
                 of lora.py's h = W0 x + (alpha/r) B A x) comes from kernels.py reading A and B^T
                 straight from the pool pages: MBGMM (a segment per request) when the step has
                 prompts, MBGMV (a segment per token) when every request decodes
    postprocess  sample, append, finish requests: free their KV pages, release their adapters
The paper's baselines (section 7) override only what differs: NoUnifiedEngine, BmmEngine,
MergedEngine; the benchmark's fifth mode, base, is Engine with every request on the base model.

Every request ends FINISHED, FAILED (with the reason: refused at submission, its adapter could not
be loaded, its logits turned non-finite, its step raised) or ABORTED (first token late, or
cancelled). Registering a name again replaces the adapter for later requests; requests already
submitted finish on their version, whose pages are freed when the last of them ends.
Simplified: one thread (the caller steps); a step that raises fails all its requests, since which
one caused it cannot be known.
Demo: `python serve.py --adapters 20 --duration 3 --layers 4` replays a trace over every engine.
Letters: N tokens of a step, R requests of a step, G segments, L layers, P pool pages, H model
dim, O output width of a target, V vocabulary, S adapter slots of a step (slot 0 = the base
model), Rm their largest rank.
"""
import math
import time
from dataclasses import dataclass, fields, replace
from functools import partial
from numbers import Integral, Real
from typing import Callable, Dict, List, NamedTuple, Optional, Set, Union

import torch

import cli
import kernels
from lora import AdapterError
from model import Batch, Llama, sample
from paging import HostAdapter, PoolConfig, UnifiedPool, kv_pages, target_widths
from scheduler import Request, RequestRejected, ScheduledBatch, Scheduler, SchedulerConfig, State


@dataclass
class EngineConfig:
    pool_pages: int = cli.flag(12000, "pages in the unified pool (a page: H numbers per layer)")
    policy: str = cli.flag("fcfs", "fcfs or cluster (adapter clustering, S-LoRA section 3)")
    ttft_slo: Optional[float] = cli.flag(None, "first-token deadline (s): enables early abort",
                                         float)
    max_prefill_tokens: Optional[int] = cli.flag(None, "cap on prompt tokens joining a step", int)
    prefetch: int = cli.flag(4, "adapters of the next waiting requests loaded ahead (sec. 4.2)")
    adapter_reserve: Optional[int] = cli.flag(None, "no-unified only: pages of adapter memory "
                                                    "(default: half the pool)", int)

    def __post_init__(self):   # checked here, so that no engine starts on a bad option
        rules = {"pool_pages": (_whole(self.pool_pages, 1), "an int >= 1"),
                 "policy": (self.policy in ("fcfs", "cluster"), "fcfs or cluster"),
                 "ttft_slo": (self.ttft_slo is None or _finite(self.ttft_slo, 0) and self.ttft_slo > 0,
                              "None or a number of seconds > 0"),
                 "max_prefill_tokens": (self.max_prefill_tokens is None
                                        or _whole(self.max_prefill_tokens, 1), "None or an int > 0"),
                 "prefetch": (_whole(self.prefetch, 0), "an int >= 0"),
                 "adapter_reserve": (self.adapter_reserve is None or _whole(self.adapter_reserve, 1)
                                     and self.adapter_reserve < self.pool_pages,
                                     "None or an int in [1, pool_pages - 1]")}
        problems = [f"{k} = {getattr(self, k)!r}: {rule}" for k, (ok, rule) in rules.items()
                    if not ok]
        if problems:
            raise ValueError("engine options: " + "; ".join(problems))


def _whole(x, low: int) -> bool:
    """x is an int (not a bool) >= low."""
    return isinstance(x, Integral) and not isinstance(x, bool) and x >= low


def _finite(x, low: float) -> bool:
    """x is a real number (not a bool), finite and >= low."""
    return isinstance(x, Real) and not isinstance(x, bool) and low <= x < math.inf


class StepStats(NamedTuple):
    """What one engine step took and read (for the benchmark's bandwidth floor)."""
    seconds: float
    tokens: int            # N
    decode: bool           # every request decoding (no prompt in the step)
    lora_numbers: int      # numbers of A and B^T read per layer: each distinct adapter once
    cached_tokens: int     # tokens whose K and V the step's attention reads


@dataclass
class Failed:
    """A request that ended without its output: state FAILED or ABORTED, and why."""
    reason: str
    state: State = State.FAILED


@dataclass
class AdapterSlots:
    """Which adapter each request of a Batch uses. Slot s >= 1 is adapter names[s - 1], slot 0
    the base model; the requests of one adapter are neighbours."""
    names: List[str]
    row_slots: torch.Tensor   # int32 [R]
    lengths: torch.Tensor     # [R] tokens of each request in the step
    prefill: bool             # some request feeds its prompt
    lora_numbers: int         # numbers of A and B^T a layer reads: each adapter once

    def token_slots(self) -> torch.Tensor:   # int32 [N]
        return self.row_slots.repeat_interleave(self.lengths)

    def segments(self):
        """(seg_starts [G + 1], seg_adapter [G]): a segment per request when prefilling (MBGMM),
        a segment per token when decoding (MBGMV, where R = N)."""
        return kernels.segment_starts(self.lengths), self.row_slots


class Engine:
    """S-LoRA: KV cache and adapters in one unified pool, LoRA by kernels gathering its pages."""

    def __init__(self, model: Llama, eos_id: Optional[int] = None, **options):
        try:
            self.cfg = EngineConfig(**options)
        except TypeError as e:   # e.g. mode=...: the class is the mode (ENGINES)
            names = [f.name for f in fields(EngineConfig)]
            raise ValueError(f"{e}; engine options: {names} (a mode: ENGINES[mode])") from None
        self.model, self.eos_id = model, eos_id
        kv_budget, adapter_budget = self._memory_split()
        w = model.lm_head.weight
        self.pool = UnifiedPool(PoolConfig.for_model(model.config, kv_budget,
                                                     str(w.dtype).split(".")[-1], str(w.device)))
        self.adapter_pages: Dict[str, int] = {}     # pool key of each adapter version -> its pages
        self.adapters: Dict[str, str] = {}          # public name -> pool key of its newest version
        self.retired: Set[str] = set()              # older versions, unregistered when unused
        sched_cfg = SchedulerConfig(self.cfg.policy, self.cfg.max_prefill_tokens,
                                    ttft_slo=self.cfg.ttft_slo)
        pages_for = partial(kv_pages, tokens_per_page=self.pool.g)   # n tokens -> KV pages
        self.scheduler = Scheduler(sched_cfg, kv_budget, pages_for, self.adapter_pages,
                                   adapter_budget)
        self.out_dim = target_widths(model.config)
        self.requests: Dict[int, Request] = {}
        self.tokens: Dict[int, List[int]] = {}      # request id -> prompt + generated tokens
        self.temperature: Dict[int, float] = {}
        self.reasons: Dict[int, str] = {}           # why a request FAILED or was ABORTED
        self.live: Set[int] = set()                 # queued and not ended
        self.holds_adapter: Set[int] = set()        # requests holding an adapter reference
        self.stats: List[StepStats] = []
        self.t0 = time.perf_counter()

    def _memory_split(self):
        """(pages of the KV cache, pages reserved for adapters): S-LoRA shares one pool (None)."""
        return self.cfg.pool_pages, None

    def now(self) -> float:
        return time.perf_counter() - self.t0

    # ------------------------------------------------------------------ adapters

    def add_adapter(self, name: str, path: str):
        """Register a PEFT adapter directory; a bad one raises AdapterError and changes nothing."""
        try:
            cfg = self.model.config
            self.register(HostAdapter.from_dir(name, path, cfg.n_layers, cfg.dim))
        except (ValueError, KeyError) as e:
            raise AdapterError(f"adapter {name!r} at {path}: {e}") from None

    def register(self, adapter: HostAdapter):
        """Serve `adapter` under adapter.name to requests submitted from now on. The pool key
        is the name, or name#k while an older version of the name still serves requests."""
        key, k = adapter.name, 1
        while key in self.pool.host:
            key, k = f"{adapter.name}#{k + 1}", k + 1
        self._store(replace(adapter, name=key))   # refuses a bad adapter, changing nothing
        self.adapter_pages[key] = self._pages_of(adapter)
        if adapter.name in self.adapters:
            self._retire(self.adapters[adapter.name])
        self.adapters[adapter.name] = key

    def remove_adapter(self, name: str):
        """Forget a name: new requests for it fail as unknown. Deferred, never refused: requests
        already submitted finish with it, and its pages are freed when the last one ends."""
        if name not in self.adapters:
            raise KeyError(f"adapter {name!r} is not registered")
        self._retire(self.adapters.pop(name))

    def _retire(self, key: str):
        self.retired.add(key)
        self._unregister_if_unused(key)

    def _unregister_if_unused(self, key: Optional[str]):
        if key in self.retired and not any(self.requests[i].adapter == key for i in self.live):
            self.retired.discard(key)
            del self.adapter_pages[key]
            self.pool.unregister(key)

    def _store(self, adapter: HostAdapter):
        """Keep the host copy (checked against the model's shapes)."""
        self.pool.register(adapter)

    def _pages_of(self, adapter: HostAdapter) -> int:
        """Pages the adapter takes when loaded: 2 r per target (paging.py)."""
        return adapter.n_pages

    # ------------------------------------------------------------------ requests

    def submit(self, prompt: List[int], adapter: Optional[str], max_new_tokens: int,
               arrival: Optional[float] = None, temperature: float = 0.0) -> int:
        """Queue a request; returns its id. One that can never be served ends FAILED at once,
        with the reason, holding nothing."""
        rid = len(self.requests)
        req = Request(rid, 0, 0, None, self.now() if arrival is None else arrival)
        self.requests[rid], self.tokens[rid] = req, []
        try:
            self._check_request(prompt, adapter, max_new_tokens, temperature)
            req.prompt_len, req.max_new_tokens = len(prompt), max_new_tokens
            req.adapter = None if adapter is None else self.adapters[adapter]
            self.tokens[rid], self.temperature[rid] = list(prompt), float(temperature)
            self._enqueue(req)
            self.live.add(rid)
        except RequestRejected as e:
            self._end(req, State.FAILED, f"request {rid}: {e}")
        return rid

    def _check_request(self, prompt, adapter, max_new_tokens, temperature):
        """Raise RequestRejected naming the first problem; the scheduler checks the sizes."""
        vocab, limit = self.model.config.vocab_size, self.model.config.max_seq_len
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise RequestRejected(f"the prompt must be a non-empty list of token ids, "
                                  f"got {prompt!r:.40}")
        bad = [t for t in prompt if not _whole(t, 0) or t >= vocab]
        if bad:
            raise RequestRejected(f"token ids must be ints in [0, {vocab}), got {bad[:3]!r:.40}")
        if not _whole(max_new_tokens, 1):
            raise RequestRejected(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r:.40}")
        if len(prompt) + max_new_tokens > limit:
            raise RequestRejected(f"{len(prompt)} + {max_new_tokens} tokens exceed "
                                  f"max_seq_len={limit}")
        if not _finite(temperature, 0):
            raise RequestRejected(f"temperature must be a number >= 0, got {temperature!r:.40}")
        if adapter is not None and adapter not in self.adapters:
            raise RequestRejected(f"unknown adapter {adapter!r:.60} "
                                  f"(registered: {len(self.adapters)} adapters)")

    def _enqueue(self, req: Request):
        self.scheduler.submit(req)

    def generate(self, prompts: List[List[int]], adapter_names: List[Optional[str]],
                 max_new_tokens: int, temperature: float = 0.0) -> List[Union[List[int], Failed]]:
        """The new tokens of each request, or a Failed saying why it has none. Interrupted
        (KeyboardInterrupt), it cancels its requests."""
        if len(prompts) != len(adapter_names):
            raise ValueError(f"{len(prompts)} prompts but {len(adapter_names)} adapter names: "
                             f"give one name (None: the base model) per prompt")
        ids = [self.submit(p, a, max_new_tokens, temperature=temperature)
               for p, a in zip(prompts, adapter_names)]
        try:
            while any(i in self.live for i in ids) and (self.step() or self.pending()):
                pass
        except KeyboardInterrupt:
            for i in ids:
                self.cancel(i)
            raise
        return [self.result(i) for i in ids]

    def result(self, rid: int) -> Union[List[int], Failed]:
        req = self.requests[rid]
        if req.state == State.FINISHED:
            return self.tokens[rid][req.prompt_len:]
        return Failed(self.reasons.get(rid, f"request {rid} is {req.state.value}"), req.state)

    def cancel(self, rid: int) -> bool:
        """End a waiting or running request now (ABORTED), freeing its pages and adapter
        reference; False if it had already ended."""
        if rid not in self.live:
            return False
        self._end(self.requests[rid], State.ABORTED, "cancelled")
        return True

    def pending(self) -> bool:
        return not self.scheduler.idle()

    # ------------------------------------------------------------------ one step

    def step(self) -> bool:
        """One iteration: schedule -> build the Batch -> run the model -> postprocess.
        False when there was nothing to run."""
        scheduled = self._schedule()
        if not scheduled.requests:
            return False
        start, rows = time.perf_counter(), self._prepare(scheduled)
        if not rows:
            return True
        try:
            batch, slots = self._build_batch(rows)
            logits = self._run(batch, slots)
        except Exception as e:   # which request caused it cannot be known: the step's all fail
            for req in rows:
                self._fail(req, "its step failed", e)
            return True
        self._postprocess(scheduled, rows, logits)
        self._record(start, batch, slots)
        return True

    def _schedule(self) -> ScheduledBatch:
        scheduled = self.scheduler.schedule(self.now(), frozenset(self.pool.resident))
        for req in scheduled.aborted:
            self.reasons[req.id] = f"first token not within the SLO of {self.cfg.ttft_slo} s"
            self._free(req)
        return scheduled

    def _prepare(self, scheduled: ScheduledBatch) -> List[Request]:
        """Acquire the adapters of joining requests, grow every KV cache, prefetch. A request
        whose adapter or pages cannot be had fails alone. Returns the others sorted by adapter
        (each adapter's requests side by side: one segment each)."""
        for req in scheduled.prefill:
            if req.adapter is not None:
                try:
                    self._acquire(req.adapter)
                    self.holds_adapter.add(req.id)
                except Exception as e:
                    self._fail(req, f"adapter {req.adapter!r} could not be loaded", e)
        for req in [r for r in scheduled.requests if r.id in self.live]:
            try:
                self.pool.allocate_kv(req.id, req.cache_len())
            except Exception as e:
                self._fail(req, "no KV pages", e)
        try:
            self._prefetch()
        except Exception:   # a load that fails here fails again, with its requests, when they join
            pass
        rows = [r for r in scheduled.requests if r.id in self.live]
        return sorted(rows, key=lambda r: (r.adapter is not None, r.adapter or ""))

    def _build_batch(self, rows: List[Request]):
        """Requests -> one Batch and their AdapterSlots."""
        tokens, positions, seq_ids, last, row_slots, names = [], [], [], [], [], []
        for row, req in enumerate(rows):
            n, end = req.step_tokens(), req.cache_len()
            tokens += self.tokens[req.id][end - n:end]
            positions += range(end - n, end)
            seq_ids += [row] * n
            last.append(len(tokens) - 1)
            if req.adapter is not None and req.adapter not in names:
                names.append(req.adapter)
            row_slots.append(0 if req.adapter is None else 1 + names.index(req.adapter))
        dev = self.pool.tensor.device
        as_tensor = partial(torch.tensor, dtype=torch.int32, device=dev)
        batch = Batch(as_tensor(tokens).long(), as_tensor(positions), as_tensor(seq_ids),
                      self.pool.block_table([r.id for r in rows]),
                      as_tensor([r.cache_len() for r in rows]), as_tensor(last).long())
        lengths = torch.tensor([r.step_tokens() for r in rows], device=dev)
        H, host = self.model.config.dim, self.pool.host
        numbers = sum(host[n].rank * (H + host[n].out[t]) for n in names for t in host[n].targets)
        prefill = any(r.n_generated == 0 for r in rows)
        return batch, AdapterSlots(names, as_tensor(row_slots), lengths, prefill, numbers)

    def _run(self, batch: Batch, slots: AdapterSlots) -> torch.Tensor:
        with torch.no_grad():
            return self.model.forward_paged(batch, self.pool.tensor, self._lora(slots))   # [R, V]

    def _fail(self, req: Request, what: str, error: Exception):
        """Something raised for this request: it fails, and the engine serves on."""
        self._end(req, State.FAILED, f"{what}: {type(error).__name__}: {error}")

    def _postprocess(self, scheduled: ScheduledBatch, rows: List[Request], logits: torch.Tensor):
        """Sample a token for every request, finish those at their end, free what they held.
        A request whose logits are not finite fails alone (each row is one request's)."""
        finite = torch.isfinite(logits).all(-1)                                    # [R]
        new = self._sample(torch.where(finite[:, None], logits, 0.0), rows)
        for req, token, ok in zip(rows, new, finite.tolist()):
            if ok:
                self.tokens[req.id].append(token)
            else:
                self._end(req, State.FAILED, "its logits are not finite (NaN or inf): the adapter "
                                             "or the numbers overflow")
        stopped = frozenset(r.id for r, t in zip(rows, new) if t == self.eos_id)
        for req in self.scheduler.advance(scheduled, self.now(), stopped):
            self._free(req)

    def _sample(self, logits: torch.Tensor, rows: List[Request]) -> List[int]:
        """Each request at its own temperature: one draw per distinct temperature."""
        temps = [self.temperature[r.id] for r in rows]
        out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        for t in set(temps):
            idx = torch.tensor([i for i, x in enumerate(temps) if x == t], device=logits.device)
            out[idx] = sample(logits[idx], t)
        return out.tolist()

    def _record(self, start: float, batch: Batch, slots: AdapterSlots):
        self.stats.append(StepStats(time.perf_counter() - start, int(batch.tokens.numel()),
                                    not slots.prefill, slots.lora_numbers,
                                    int(batch.seq_lens.sum())))

    def _end(self, req: Request, state: State, reason: str):
        """End a request that will not finish (failed, cancelled): free what it holds, say why."""
        self.scheduler.remove(req)
        req.state, req.finished_at, self.reasons[req.id] = state, self.now(), reason
        self._free(req)

    def _free(self, req: Request):
        """Give back a request's KV pages and adapter reference; an old version may go."""
        self.live.discard(req.id)
        self.pool.free_seq(req.id)
        if req.id in self.holds_adapter:
            self.holds_adapter.discard(req.id)
            self._release(req.adapter)
        self._unregister_if_unused(req.adapter)

    # ------------------------------------------------------------------ what the baselines change

    def _acquire(self, name: str):
        self.pool.acquire(name)

    def _release(self, name: str):
        self.pool.release(name)

    def _prefetch(self):
        """S-LoRA 4.2: load the adapters of the next waiting requests before they are scheduled."""
        if self.cfg.prefetch:
            waiting = self.scheduler.waiting[:self.cfg.prefetch]
            self.pool.prefetch([r.adapter for r in waiting if r.adapter is not None])

    def _lora(self, slots: AdapterSlots) -> Optional[Callable]:
        """The step's LoRA function (x [N, H], layer, target) -> delta [N, O] or None: each
        target's tables planned once, then every layer reads its pool pages (kernels.py)."""
        seg_starts, seg_adapter = slots.segments()
        plans = {target: kernels.plan_lora(self.pool.tensor[0], t.page_ids, t.a_start, t.b_start,
                                           t.ranks, t.scales, seg_starts, seg_adapter,
                                           int(t.ranks.max()), per_token=not slots.prefill)
                 for target, t in self.pool.kernel_tables(slots.names).items()
                 if bool((t.ranks > 0).any())}

        def lora(x, layer, target):
            if target not in plans:
                return None
            pool_l = self.pool.tensor[layer]                                       # [P, H]
            return kernels.lora_apply(x, pool_l, plans[target], self.out_dim[target])
        return lora if plans else None


class OwnCopy(NamedTuple):
    """An adapter in tensors of its own (no unified pool): per target A [L, r, H], B^T [L, r, O]."""
    A: Dict[str, torch.Tensor]
    Bt: Dict[str, torch.Tensor]
    scale: float


class NoUnifiedEngine(Engine):
    """Baseline without unified paging: a KV pool of pool_pages - adapter_reserve pages beside
    adapter_reserve pages of adapter memory, each adapter copied into freshly allocated tensors
    when a batch needs it and freed when no running request uses it. Slower than slora because
    the fixed split leaves either KV or adapter memory idle (smaller batches) and adapters are
    copied again each time they return; on a CPU its LoRA arithmetic is slora's CPU path."""

    def __init__(self, model: Llama, eos_id: Optional[int] = None, **options):
        self.own_copies: Dict[str, OwnCopy] = {}
        self.users: Dict[str, int] = {}            # running requests per own copy
        super().__init__(model, eos_id, **options)

    def _memory_split(self):
        reserve = self.cfg.adapter_reserve
        reserve = self.cfg.pool_pages // 2 if reserve is None else reserve
        return self.cfg.pool_pages - reserve, reserve

    def _acquire(self, name: str):
        if name not in self.own_copies:   # a fresh allocation and copy, as without a shared pool
            ad = self.pool.host[name]
            self.own_copies[name] = OwnCopy({t: ad.a(t).clone() for t in ad.targets},
                                            {t: ad.bt(t).clone() for t in ad.targets}, ad.scale)
        self.users[name] = self.users.get(name, 0) + 1

    def _release(self, name: str):
        self.users[name] -= 1
        if self.users[name] == 0:
            del self.own_copies[name], self.users[name]

    def _prefetch(self):
        """Nothing to prefetch into: adapters are copied when a batch needs them."""

    def _lora(self, slots: AdapterSlots) -> Optional[Callable]:
        """A pair of matrix products per run of tokens of one adapter (kernels.lora_runs)."""
        bounds = kernels.segment_starts(slots.lengths).tolist()
        spans: Dict[str, List[int]] = {}        # adapter -> [t0, t1]: its requests are neighbours
        for row, slot in enumerate(slots.row_slots.tolist()):
            if slot:
                spans.setdefault(slots.names[slot - 1], [bounds[row], 0])[1] = bounds[row + 1]

        def lora(x, layer, target):
            copies = [(t0, t1, self.own_copies[n]) for n, (t0, t1) in spans.items()]
            runs = [(t0, t1, c.A[target][layer], c.Bt[target][layer], c.scale)
                    for t0, t1, c in copies if target in c.A]
            return kernels.lora_runs(x, runs, self.out_dim[target]) if runs else None
        return lora if spans else None


class BmmEngine(Engine):
    """Baseline with the unified pool but without the gathered kernels: every step copies the
    step's adapters into zero-padded tensors [S, Rm, H] and runs torch.bmm per token. Slower than
    slora because of that copy each step and the padding of every adapter to the largest rank."""

    def _lora(self, slots: AdapterSlots) -> Optional[Callable]:
        padded = {target: kernels.pad_adapters(self.pool.tensor, t.page_ids, t.a_start, t.b_start,
                                               t.ranks, t.scales, self.out_dim[target])
                  for target, t in self.pool.kernel_tables(slots.names).items()
                  if bool((t.ranks > 0).any())}   # target -> (A [L, S, Rm, H], B^T [L, S, Rm, O])
        token_slots = slots.token_slots()

        def lora(x, layer, target):
            if target not in padded:
                return None
            A, Bt = padded[target]
            return kernels.bmm_lora(x, A[layer], Bt[layer], token_slots)
        return lora if padded else None


class MergedEngine(Engine):
    """The PEFT-style baseline: merge one adapter into the weights (W0 + (alpha/r) B A), batch
    only its requests, restore the weights to switch. Slower than slora because requests of
    other adapters wait for their turn: batches are small and the weights are rewritten at
    every switch."""

    def __init__(self, model: Llama, eos_id: Optional[int] = None, **options):
        self.waiting_turn: List[Request] = []     # requests of other adapters, not yet scheduled
        self.merged: Optional[str] = None
        self.base_weights: Dict[tuple, torch.Tensor] = {}   # (layer, target) -> W0, for the switch
        super().__init__(model, eos_id, **options)

    def _pages_of(self, adapter: HostAdapter) -> int:
        return 0                                  # merged into the weights: no pool pages

    def _enqueue(self, req: Request):
        if self.merged != req.adapter or self.scheduler.idle():
            self.waiting_turn.append(req)         # waits for its adapter's turn (_switch)
        else:
            self.scheduler.submit(req)

    def _end(self, req: Request, state: State, reason: str):
        self.waiting_turn = [r for r in self.waiting_turn if r is not req]
        super()._end(req, state, reason)

    def pending(self) -> bool:
        return bool(self.waiting_turn) or super().pending()

    def _schedule(self) -> ScheduledBatch:
        if self.scheduler.idle():
            self._switch()
        return super()._schedule()

    def _switch(self):
        """Restore the base weights; merge the adapter of the oldest waiting request and move
        every waiting request of it to the scheduler."""
        attn = [layer.self_attn for layer in self.model.model.layers]
        with torch.no_grad():
            for (i, t), w in self.base_weights.items():
                getattr(attn[i], t).weight.copy_(w)
            self.base_weights, self.merged = {}, None
            if not self.waiting_turn:
                return
            name = min(self.waiting_turn, key=lambda r: r.arrival).adapter
            if name is not None:
                ad = self.pool.host[name]
                for i, t in ((i, t) for i in range(len(attn)) for t in ad.targets):
                    w = getattr(attn[i], t).weight                                   # [O, H]
                    self.base_weights[(i, t)] = w.clone()
                    w += ad.scale * ad.bt(t)[i].T.to(w) @ ad.a(t)[i].to(w)   # (alpha/r) B A
        self.merged = name
        for req in [r for r in self.waiting_turn if r.adapter == name]:
            self.waiting_turn.remove(req)
            self.scheduler.submit(req)

    def _acquire(self, name: str):
        """Merged into the weights: nothing to load."""

    def _release(self, name: str):
        """Nothing was loaded."""

    def _prefetch(self):
        """Adapters are merged, not loaded into the pool."""

    def _lora(self, slots: AdapterSlots) -> Optional[Callable]:
        return None


ENGINES = {"slora": Engine, "no-unified": NoUnifiedEngine, "bmm": BmmEngine, "merged": MergedEngine}


def make_engine(mode: str, model: Llama, eos_id: Optional[int] = None, **options) -> Engine:
    """ENGINES[mode](model, eos_id, **options), with a clear error for an unknown mode."""
    if mode not in ENGINES:
        raise ValueError(f"unknown engine mode {mode!r}; choose from {list(ENGINES)}")
    return ENGINES[mode](model, eos_id, **options)
