"""S-LoRA's serving engine (Sheng et al. 2023, arXiv 2311.03285, sections 3-5).

One base model serves many LoRA adapters at once. Each call of `step` is one iteration:
    schedule     scheduler.py: who leaves, who joins, within the page budget of the unified pool
    build, run   runner.py: the step's requests -> one model.Batch -> model.forward_paged, whose
                 LoRA part y += (alpha/r) (x A^T) B^T per token comes from kernels.py reading A
                 and B^T straight from the pool's pages
    postprocess  sample, append, finish requests: free their KV pages, release their adapters
The engine composes small parts: the memory (memory.py: the unified pool), the scheduler, the
adapter registry (adapters.py: names, versions, reference counts), one RequestRecord per request
(records.py), validate_request, the model runner (runner.py).
The paper's baselines (baselines.py) are subclasses that override only what differs; the
benchmark's fifth mode, base, is Engine with every request on the base model.

Every request ends FINISHED, FAILED (with the reason: refused at submission, its adapter could not
be loaded, its logits turned non-finite, its step raised) or ABORTED (first token late, or
cancelled). Registering a name again replaces the adapter for later requests; requests already
submitted finish on their version, whose pages are freed when the last of them ends.
Simplified: one thread (the caller steps); a step that raises fails all its requests, since which
one caused it cannot be known.
Demo: `python serve.py --adapters 20 --duration 3 --layers 4` replays a trace over every engine.
Letters: R requests of a step, V vocabulary, H model dim, I and O input and output width of a
target.
"""
import time
from collections import Counter
from dataclasses import dataclass, fields
from functools import partial
from typing import Dict, List, Optional, Set, Tuple, Union

import torch

import cli
from adapters import AdapterRegistry
from model import Llama, SamplingParams
from memory import PoolMemory
from paging import kv_pages
from quant import ROWS
from records import (Failed, RequestRecord, RequestTable, is_finite, is_whole,  # noqa: F401
                     validate_request)
from runner import ModelRunner, StepStats
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
    host_adapters: Optional[int] = cli.flag(None, "adapters registered by path kept in host memory "
                                                  "at most, the others read from their files when "
                                                  "needed (default: all; synthetic ones stay)", int)
    adapter_dtype: str = cli.flag("float", "adapter rows in the pool: float (the model's dtype) "
                                           "or int8 (quantized per row when loaded, a quarter of "
                                           "the pages in float32; slora and bmm modes)")

    @staticmethod
    def of(options: dict) -> "EngineConfig":
        try:
            return EngineConfig(**options)
        except TypeError as e:   # e.g. mode=...: the class is the mode (ENGINES)
            names = [f.name for f in fields(EngineConfig)]
            raise ValueError(f"{e}; engine options: {names} "
                             "(a mode: baselines.ENGINES[mode])") from None

    def __post_init__(self):   # checked here, so that no engine starts on a bad option
        rules = {"pool_pages": (is_whole(self.pool_pages, 1), "an int >= 1"),
                 "policy": (self.policy in ("fcfs", "cluster"), "fcfs or cluster"),
                 "ttft_slo": (self.ttft_slo is None or is_finite(self.ttft_slo, 0) and self.ttft_slo > 0,
                              "None or a number of seconds > 0"),
                 "max_prefill_tokens": (self.max_prefill_tokens is None
                                        or is_whole(self.max_prefill_tokens, 1), "None or an int > 0"),
                 "prefetch": (is_whole(self.prefetch, 0), "an int >= 0"),
                 "adapter_reserve": (self.adapter_reserve is None or is_whole(self.adapter_reserve, 1)
                                     and self.adapter_reserve < self.pool_pages,
                                     "None or an int in [1, pool_pages - 1]"),
                 "host_adapters": (self.host_adapters is None or is_whole(self.host_adapters, 1),
                                   "None or an int >= 1"),
                 "adapter_dtype": (self.adapter_dtype in ROWS, f"one of {list(ROWS)}")}
        problems = [f"{k} = {getattr(self, k)!r}: {rule}" for k, (ok, rule) in rules.items()
                    if not ok]
        if problems:
            raise ValueError("engine options: " + "; ".join(problems))


class Engine:
    """S-LoRA: KV cache and adapters in one unified pool, LoRA by kernels gathering its pages;
    composed of memory, registry, scheduler, runner and the request records."""

    def __init__(self, model: Llama, eos_id: Optional[int] = None, **options):
        self.cfg = EngineConfig.of(options)
        self.model, self.eos_id = model, eos_id
        self.memory = self._make_memory()
        self.pool = self.memory.pool
        self.registry = AdapterRegistry(self.pool, self.memory.pages_of, self.memory.store,
                                        self.cfg.host_adapters)
        sched_cfg = SchedulerConfig(self.cfg.policy, self.cfg.max_prefill_tokens, ttft_slo=self.cfg.ttft_slo)
        pages_for = partial(kv_pages, tokens_per_page=self.pool.g)   # n tokens -> KV pages
        self.scheduler = Scheduler(sched_cfg, self.memory.kv_budget, pages_for,
                                   self.registry.pages, self.memory.adapter_budget)
        self.runner = self._make_runner()
        self.records = RequestTable()                 # request id -> record, until forgotten
        self.live: Set[int] = set()                   # ids queued and not ended
        self.stats: List[StepStats] = []
        self.ended: Counter = Counter()               # State -> requests that ended in it
        self.generated = self.next_id = 0              # counts for metrics
        self.t0 = time.perf_counter()

    def _make_memory(self) -> PoolMemory:
        return PoolMemory(self.model, self.cfg)

    def _make_runner(self) -> ModelRunner:
        return ModelRunner(self.model, self.pool)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def add_adapter(self, name: str, path: str):
        """Register a PEFT adapter directory; a bad one raises AdapterError and changes nothing."""
        self.registry.add(name, path, self.model.config.n_layers, self.model.config.dim)

    def remove_adapter(self, name: str) -> int:
        """Forget a name (new requests for it fail as unknown); requests already submitted
        finish with it first. Returns how many still use it (0: freed now)."""
        return self.registry.remove(name)

    def has_adapter(self, name: str) -> bool:
        return name in self.registry.current

    def adapter_names(self) -> List[str]:
        return list(self.registry.current)

    def submit(self, prompt: List[int], adapter: Optional[str], max_new_tokens: int,
               arrival: Optional[float] = None, temperature: float = 0.0,
               sampling: Optional[SamplingParams] = None, stop_ids=()) -> int:
        """Queue a request; returns its id. It samples with `sampling` (default: at `temperature`)
        from its own generator seeded by sampling.seed, and ends at a token of stop_ids or EOS.
        One that can never be served ends FAILED at once, with the reason, holding nothing."""
        rid, self.next_id = self.next_id, self.next_id + 1
        req = Request(rid, 0, 0, None, self.now() if arrival is None else arrival)
        rec = self.records[rid] = RequestRecord(req)
        params = SamplingParams(temperature) if sampling is None else sampling
        try:
            self._validate(prompt, adapter, max_new_tokens, params, stop_ids)
            key = None if adapter is None else self.registry.current[adapter]
            rec.start(prompt, max_new_tokens, key, params, stop_ids, self.eos_id,
                      self.pool.tensor.device)
            self._enqueue(req)
        except RequestRejected as e:
            self._end(rec, State.FAILED, str(e))
            return rid
        if adapter is not None:
            self.registry.hold(adapter)
        self.live.add(rid)
        return rid

    def _validate(self, prompt, adapter, max_new_tokens, params, stop_ids):
        c = self.model.config
        validate_request(prompt, max_new_tokens, params, stop_ids, c.vocab_size, c.max_seq_len)
        if adapter is not None and not self.has_adapter(adapter):
            raise RequestRejected(f"unknown adapter {adapter!r:.60} "
                                  f"(registered: {len(self.registry.current)} adapters)")

    def _enqueue(self, req: Request):
        self.scheduler.submit(req)

    def generate(self, prompts: List[List[int]], adapter_names: List[Optional[str]],
                 max_new_tokens: int, temperature: float = 0.0) -> List[Union[List[int], Failed]]:
        """The new tokens of each request, or a Failed saying why; cancelled if interrupted."""
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
        return [self.records.result(i) for i in ids]

    def forget(self, rid: int):
        """Drop the record of an ended request (a server that runs for days keeps none)."""
        if rid in self.live:
            raise ValueError(f"request {rid} has not ended: cancel it first")
        self.records.pop(rid, None)

    def cancel(self, rid: int) -> bool:
        """End a waiting or running request now (ABORTED); False if it had already ended."""
        if rid not in self.live:
            return False
        self._end(self.records[rid], State.ABORTED, "cancelled")
        return True

    def pending(self) -> bool:
        return not self.scheduler.idle()

    def metrics(self) -> Dict[str, Tuple[str, int]]:
        return engine_metrics(self)

    def step(self) -> bool:
        """One iteration: schedule -> build the Batch -> run -> postprocess; False if idle."""
        scheduled = self._schedule()
        if not scheduled.requests:
            return False
        start, rows = time.perf_counter(), self._prepare(scheduled)
        if not rows:
            return True
        try:
            batch, slots = self.runner.build(rows)
            logits = self.runner.run(batch, slots)
        except Exception as e:   # which request caused it cannot be known: the step's all fail
            for rec in rows:
                self._fail(rec, "its step failed", e)
            return True
        self._postprocess(scheduled, rows, logits)
        self.stats.append(self.runner.stats(time.perf_counter() - start, batch, slots))
        return True

    def _schedule(self) -> ScheduledBatch:
        scheduled = self.scheduler.schedule(self.now(), frozenset(self.pool.resident))
        for req in scheduled.aborted:
            rec = self.records[req.id]
            rec.reason = f"first token not within the SLO of {self.cfg.ttft_slo} s"
            self._free(rec)
        return scheduled

    def _prepare(self, scheduled: ScheduledBatch) -> List[RequestRecord]:
        """Acquire joining requests' adapters, grow every KV cache, prefetch; a request that cannot
        have its adapter or pages fails alone. The others, sorted by adapter (a segment each)."""
        for rec in [self.records[r.id] for r in scheduled.prefill if r.adapter is not None]:
            try:
                self.memory.acquire(rec.request.adapter)
                rec.holds_pages = True
            except Exception as e:
                self._fail(rec, f"adapter {rec.request.adapter!r} could not be loaded", e)
        for req in [r for r in scheduled.requests if r.id in self.live]:
            try:
                self.pool.allocate_kv(req.id, req.cache_len())
            except Exception as e:
                self._fail(self.records[req.id], "no KV pages", e)
        self.memory.prefetch_for(self.scheduler.waiting[:self.cfg.prefetch])
        rows = [self.records[r.id] for r in scheduled.requests if r.id in self.live]
        return sorted(rows, key=lambda r: (r.request.adapter is not None, r.request.adapter or ""))

    def _fail(self, rec: RequestRecord, what: str, error: Exception):
        """Something raised for this request: it fails, and the engine serves on."""
        self._end(rec, State.FAILED, f"{what}: {type(error).__name__}: {error}")

    def _postprocess(self, scheduled: ScheduledBatch, rows: List[RequestRecord], logits):
        """Sample a token for every request, finish those at their end, free what they held; a
        request whose logits are not finite fails alone (each row is one request's)."""
        finite = finite_rows(logits)                                               # [R]
        new = self.runner.sample(logits if finite.all() else logits.where(finite[:, None], 0), rows)
        for rec, token, ok in zip(rows, new, finite.tolist()):
            if ok:
                rec.tokens.append(token)
            else:
                self._end(rec, State.FAILED, "its logits are not finite (NaN or inf): the adapter "
                                             "or the numbers overflow")
        self.generated += int(finite.sum())
        stopped = frozenset(r.request.id for r, t in zip(rows, new) if t in r.stops)
        for req in self.scheduler.advance(scheduled, self.now(), stopped):
            self._free(self.records[req.id])

    def _end(self, rec: RequestRecord, state: State, reason: str):
        """End a request that will not finish (failed, cancelled): free what it holds, say why."""
        self.scheduler.remove(rec.request)
        rec.request.state, rec.request.finished_at, rec.reason = state, self.now(), reason
        self._free(rec)

    def _free(self, rec: RequestRecord):
        """Give back a request's KV pages and adapter reference; an old version may go."""
        req = rec.request
        self.ended[req.state] += 1
        self.pool.free_seq(req.id)
        if rec.holds_pages:
            rec.holds_pages = False
            self.memory.release(req.adapter)
        if req.id in self.live:
            self.live.discard(req.id)
            if req.adapter is not None:
                self.registry.release(req.adapter)


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """[R] bool, True where a row of logits [R, V] has no NaN or inf: each row's sum first (one
    pass; a NaN or inf makes it one), number by number only if a sum is not (it may overflow)."""
    finite = logits.sum(-1).isfinite()
    return finite if finite.all() else torch.isfinite(logits).all(-1)


def engine_metrics(engine: Engine) -> Dict[str, Tuple[str, int]]:
    """name -> (help, value): the queue, the pool and the adapters, for /metrics."""
    states = Counter(engine.records[i].request.state for i in engine.live)
    pool, reg, ended = engine.pool.stats(), engine.registry, engine.ended
    return {"requests_waiting": ("requests queued", states[State.WAITING]),
            "requests_running": ("requests in the running batch", states[State.RUNNING]),
            "requests_finished": ("requests finished", ended[State.FINISHED]),
            "requests_failed": ("requests failed", ended[State.FAILED]),
            "requests_aborted": ("requests cancelled or aborted", ended[State.ABORTED]),
            "tokens_generated": ("tokens generated", engine.generated),
            "pages_free": ("free pages of the unified pool", pool.free),
            "pages_kv": ("pages holding KV cache", pool.kv),
            "pages_adapter": ("pages holding adapter weights", pool.adapter),
            "adapters_registered": ("adapter names served", len(reg.current)),
            "adapters_resident": ("adapters in the pool", len(engine.pool.resident)),
            "adapter_loads": ("adapter copies into the pool", engine.memory.loads),
            "adapter_evictions": ("adapters evicted from the pool",
                                  engine.memory.loads - len(engine.pool.resident) - reg.dropped),
            "adapters_in_host_memory": ("adapters whose weights are in host memory",
                                        reg.in_host_memory()),
            "adapter_disk_reads": ("adapter directories read (at registration, and again when "
                                   "a dropped host copy is loaded)",
                                   0 if reg.host_store is None else reg.host_store.reads)}
