"""S-LoRA's serving engine (Sheng et al. 2023, arXiv 2311.03285, sections 3-5).

One base model serves many LoRA adapters at once. Each call of `step` is one iteration:
    schedule     scheduler.py: who leaves, who joins, within the page budget of the unified pool
    build batch  one model.Batch: token ids, positions, page tables; the requests of one adapter
                 side by side, so that each adapter is one segment of the LoRA kernels
    run          model.forward_paged; its LoRA part y += scale (x A^T) B^T per token (the row form
                 of lora.py's h = W0 x + (alpha/r) B A x) comes from kernels.py reading A and B^T
                 straight from the pool pages: MBGMM (a segment per request) when the step has
                 prompts, MBGMV (a segment per token) when every request decodes
    postprocess  sample, append, finish requests: free their KV pages, release their adapters
The paper's baselines (baselines.py) are subclasses that override only what differs; the
benchmark's fifth mode, base, is Engine with every request on the base model.

Every request ends FINISHED, FAILED (with the reason: refused at submission, its adapter could not
be loaded, its logits turned non-finite, its step raised) or ABORTED (first token late, or
cancelled). Registering a name again replaces the adapter for later requests; requests already
submitted finish on their version, whose pages are freed when the last of them ends.
Simplified: one thread (the caller steps); a step that raises fails all its requests, since which
one caused it cannot be known.
Demo: `python serve.py --adapters 20 --duration 3 --layers 4` replays a trace over every engine.
Letters: N tokens of a step, R requests of a step, G segments, L layers, P pool pages, H model
dim, I and O input and output width of a target, V vocabulary, S adapter slots of a step (slot
0 = the base model), Rm their largest rank.
"""
import math
import time
from collections import Counter
from dataclasses import dataclass, fields, replace
from functools import partial
from numbers import Integral, Real
from typing import Callable, Dict, FrozenSet, List, NamedTuple, Optional, Set, Tuple, Union

import torch

import cli
import kernels
from adapters import HostAdapter, HostStore, OnDisk, target_shapes
from lora import AdapterError
from model import Batch, Llama, SamplingParams, sample_one
from paging import PoolConfig, UnifiedPool, kv_pages
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
                                     "None or an int in [1, pool_pages - 1]"),
                 "host_adapters": (self.host_adapters is None or _whole(self.host_adapters, 1),
                                   "None or an int >= 1")}
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
            raise ValueError(f"{e}; engine options: {names} "
                             "(a mode: baselines.ENGINES[mode])") from None
        self.model, self.eos_id = model, eos_id
        kv_budget, adapter_budget = self._memory_split()
        w = model.lm_head.weight
        self.pool = UnifiedPool(PoolConfig.for_model(model.config, kv_budget,
                                                     str(w.dtype).split(".")[-1], str(w.device)))
        self.adapter_pages: Dict[str, int] = {}     # pool key of each adapter version -> its pages
        self.adapters: Dict[str, str] = {}          # public name -> pool key of its newest version
        self.retired: Set[str] = set()              # older versions, unregistered when unused
        limit = self.cfg.host_adapters
        self.host_store = None if limit is None else HostStore(limit)   # None: all in host memory
        sched_cfg = SchedulerConfig(self.cfg.policy, self.cfg.max_prefill_tokens,
                                    ttft_slo=self.cfg.ttft_slo)
        pages_for = partial(kv_pages, tokens_per_page=self.pool.g)   # n tokens -> KV pages
        self.scheduler = Scheduler(sched_cfg, kv_budget, pages_for, self.adapter_pages,
                                   adapter_budget)
        shapes = target_shapes(model.config)                                    # target -> (I, O)
        self.in_dim = {t: i for t, (i, _) in shapes.items()}
        self.out_dim = {t: o for t, (_, o) in shapes.items()}
        self.requests: Dict[int, Request] = {}
        self.tokens: Dict[int, List[int]] = {}      # request id -> prompt + generated tokens
        self.sampling: Dict[int, SamplingParams] = {}
        self.generators: Dict[int, torch.Generator] = {}   # a request's own random stream
        self.stops: Dict[int, FrozenSet[int]] = {}   # token ids that end a request (EOS, ...)
        self.reasons: Dict[int, str] = {}           # why a request FAILED or was ABORTED
        self.live: Set[int] = set()                 # queued and not ended
        self.holds_adapter: Set[int] = set()        # requests holding an adapter reference
        self.stats: List[StepStats] = []
        self.ended: Counter = Counter()             # State -> requests that ended in it
        self.generated = self.loads = self.dropped = self.next_id = 0   # counts for metrics
        self.t0 = time.perf_counter()

    def _memory_split(self):
        """(pages of the KV cache, pages reserved for adapters): S-LoRA shares one pool (None)."""
        return self.cfg.pool_pages, None

    def now(self) -> float:
        return time.perf_counter() - self.t0

    # ------------------------------------------------------------------ adapters

    def add_adapter(self, name: str, path: str):
        """Register a PEFT adapter directory; a bad one raises AdapterError and changes nothing.
        Under a host limit it is read and checked now, then kept as its files (adapters.HostStore)."""
        try:
            cfg = self.model.config
            if self.host_store is None:
                adapter = HostAdapter.from_dir(name, path, cfg.n_layers, cfg.dim)
            else:
                adapter = self.host_store.open(name, path, cfg.n_layers, cfg.dim)
            self.register(adapter)
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

    def remove_adapter(self, name: str) -> int:
        """Forget a name: new requests for it fail as unknown. Deferred, never refused: requests
        already submitted finish with it, and its pages are freed when the last one ends.
        Returns how many requests still use it (0: freed now)."""
        if name not in self.adapters:
            raise KeyError(f"adapter {name!r} is not registered")
        key = self.adapters.pop(name)
        self._retire(key)
        return sum(self.requests[i].adapter == key for i in self.live)

    def has_adapter(self, name: str) -> bool:
        return name in self.adapters

    def adapter_names(self) -> List[str]:
        return list(self.adapters)

    def _retire(self, key: str):
        self.retired.add(key)
        self._unregister_if_unused(key)

    def _unregister_if_unused(self, key: Optional[str]):
        if key in self.retired and not any(self.requests[i].adapter == key for i in self.live):
            self.retired.discard(key)
            del self.adapter_pages[key]
            self.dropped += key in self.pool.resident   # left the pool without an eviction
            self.pool.unregister(key)

    def _store(self, adapter: HostAdapter):
        """Keep the host copy (checked against the model's shapes)."""
        self.pool.register(adapter)

    def _pages_of(self, adapter: HostAdapter) -> int:
        """Pages the adapter takes when loaded: r ceil(I / H) + r ceil(O / H) per target
        (paging.py); 2 r for q, k, v, o."""
        return adapter.n_pages

    # ------------------------------------------------------------------ requests

    def submit(self, prompt: List[int], adapter: Optional[str], max_new_tokens: int,
               arrival: Optional[float] = None, temperature: float = 0.0,
               sampling: Optional[SamplingParams] = None, stop_ids=()) -> int:
        """Queue a request; returns its id. It samples with `sampling` (default: at
        `temperature`, no top-k or top-p) from its own generator, seeded by sampling.seed (else
        at random), and ends at a token of stop_ids or EOS. One that can never be served ends
        FAILED at once, with the reason (`failure`), holding nothing."""
        rid, self.next_id = self.next_id, self.next_id + 1
        req = Request(rid, 0, 0, None, self.now() if arrival is None else arrival)
        self.requests[rid], self.tokens[rid] = req, []
        params = SamplingParams(temperature) if sampling is None else sampling
        try:
            self._check_sampling(params, stop_ids)
            self._check_request(prompt, adapter, max_new_tokens, params.temperature)
            req.prompt_len, req.max_new_tokens = len(prompt), max_new_tokens
            req.adapter = None if adapter is None else self.adapters[adapter]
            self.tokens[rid], self.sampling[rid] = list(prompt), params
            seed = torch.randint(2**62, ()).item() if params.seed is None else params.seed
            self.generators[rid] = torch.Generator(self.pool.tensor.device).manual_seed(seed)
            self.stops[rid] = frozenset(stop_ids) | ({self.eos_id} - {None})
            self._enqueue(req)
            self.live.add(rid)
        except RequestRejected as e:
            self._end(req, State.FAILED, f"request {rid}: {e}")
        return rid

    @staticmethod
    def _check_sampling(params, stop_ids):
        if not isinstance(params, SamplingParams) or params.check():
            raise RequestRejected(params.check() if isinstance(params, SamplingParams) else
                                  f"sampling must be a SamplingParams, got {params!r:.40}")
        if not all(_whole(t, 0) for t in stop_ids):
            raise RequestRejected(f"stop_ids must be token ids, got {stop_ids!r:.40}")

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

    def progress(self, rid: int) -> Tuple[List[int], str, Optional[str]]:
        """(tokens generated so far, state, why it failed or was aborted): what a stream reads."""
        req = self.requests[rid]
        return self.tokens[rid][req.prompt_len:], req.state.value, self.reasons.get(rid)

    def failure(self, rid: int) -> Optional[str]:
        """Why the request failed (right after submit: why it was refused), or None."""
        return self.reasons[rid] if self.requests[rid].state == State.FAILED else None

    def stop_ids(self, rid: int) -> FrozenSet[int]:
        return self.stops.get(rid, frozenset())

    def forget(self, rid: int):
        """Drop the records of an ended request (a server that runs for days keeps none)."""
        if rid in self.live:
            raise ValueError(f"request {rid} has not ended: cancel it first")
        for records in (self.requests, self.tokens, self.sampling, self.generators, self.stops,
                        self.reasons):
            records.pop(rid, None)

    def metrics(self) -> Dict[str, Tuple[str, int]]:
        """name -> (help, value): the queue, the pool and the adapters, for /metrics."""
        states, pool = Counter(self.requests[i].state for i in self.live), self.pool.stats()
        return {"requests_waiting": ("requests queued", states[State.WAITING]),
                "requests_running": ("requests in the running batch", states[State.RUNNING]),
                "requests_finished": ("requests finished", self.ended[State.FINISHED]),
                "requests_failed": ("requests failed", self.ended[State.FAILED]),
                "requests_aborted": ("requests cancelled or aborted", self.ended[State.ABORTED]),
                "tokens_generated": ("tokens generated", self.generated),
                "pages_free": ("free pages of the unified pool", pool.free),
                "pages_kv": ("pages holding KV cache", pool.kv),
                "pages_adapter": ("pages holding adapter weights", pool.adapter),
                "adapters_registered": ("adapter names served", len(self.adapters)),
                "adapters_resident": ("adapters in the pool", len(self.pool.resident)),
                "adapter_loads": ("adapter copies into the pool", self.loads),
                "adapter_evictions": ("adapters evicted from the pool",
                                      self.loads - len(self.pool.resident) - self.dropped),
                "adapters_in_host_memory": ("adapters whose weights are in host memory",
                                            self._in_host_memory()),
                "adapter_disk_reads": ("adapter directories read (at registration, and again when "
                                       "a dropped host copy is loaded)",
                                       0 if self.host_store is None else self.host_store.reads)}

    def _in_host_memory(self) -> int:
        """Adapters held whole in host memory, and the host copies of those kept as files."""
        held = sum(not isinstance(a.weights, OnDisk) for a in self.pool.host.values())
        return held + (0 if self.host_store is None else len(self.host_store.copies))

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
        host = self.pool.host
        numbers = sum(host[n].rank * (host[n].in_width(t) + host[n].out[t])
                      for n in names for t in host[n].targets)
        prefill = any(r.n_generated == 0 for r in rows)
        return batch, AdapterSlots(names, as_tensor(row_slots), lengths, prefill, numbers)

    def _run(self, batch: Batch, slots: AdapterSlots) -> torch.Tensor:
        with torch.inference_mode():   # no autograd records, no version counters on activations
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
        self.generated += int(finite.sum())
        stopped = frozenset(r.id for r, t in zip(rows, new) if t in self.stops[r.id])
        for req in self.scheduler.advance(scheduled, self.now(), stopped):
            self._free(req)

    def _sample(self, logits: torch.Tensor, rows: List[Request]) -> List[int]:
        """Greedy rows by one argmax; each other row with its own parameters and generator, so
        that a seeded request draws the same tokens whatever shares its batch."""
        out = logits.argmax(-1).tolist()                                             # [R]
        for i, req in enumerate(rows):
            if self.sampling[req.id].temperature > 0:
                out[i] = sample_one(logits[i], self.sampling[req.id], self.generators[req.id])
        return out

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
        self.ended[req.state] += 1
        self.pool.free_seq(req.id)
        if req.id in self.holds_adapter:
            self.holds_adapter.discard(req.id)
            self._release(req.adapter)
        self._unregister_if_unused(req.adapter)

    # ------------------------------------------------------------------ what the baselines change

    def _acquire(self, name: str):
        fresh = name not in self.pool.resident
        self.pool.acquire(name)
        self.loads += fresh

    def _release(self, name: str):
        self.pool.release(name)

    def _prefetch(self):
        """S-LoRA 4.2: load the adapters of the next waiting requests before they are scheduled."""
        if self.cfg.prefetch:
            waiting = self.scheduler.waiting[:self.cfg.prefetch]
            self.loads += len(self.pool.prefetch([r.adapter for r in waiting if r.adapter]))

    def _lora(self, slots: AdapterSlots) -> Optional[Callable]:
        """The step's LoRA function (x [N, I], layer, target) -> delta [N, O] or None: each
        target's tables planned once, then every layer reads its pool pages (kernels.py)."""
        seg_starts, seg_adapter = slots.segments()
        plans = {target: kernels.plan_lora(self.pool.tensor[0], t.page_ids, t.a_start, t.b_start,
                                           t.ranks, t.scales, seg_starts, seg_adapter,
                                           int(t.ranks.max()), per_token=not slots.prefill,
                                           a_chunks=t.a_chunks, b_chunks=t.b_chunks)
                 for target, t in self.pool.kernel_tables(slots.names).items()}

        def lora(x, layer, target):
            if target not in plans:
                return None
            pool_l = self.pool.tensor[layer]                                       # [P, H]
            return kernels.lora_apply(x, pool_l, plans[target], self.out_dim[target])
        return lora if plans else None
