"""Iteration-level scheduling of LoRA requests (Orca, OSDI 2022; S-LoRA arXiv 2311.03285, sec. 3).

Orca's idea: schedule at every model step, not per batch. At each step finished requests leave
and waiting ones join, so a short request never waits for a long one to end; the prompt tokens of
the joining requests (prefill) and the new token of each running request (decode) share the step.
S-LoRA adds adapter clustering (prefer requests whose adapter is already in GPU memory: fewer
loads, fewer distinct adapters in the kernels) and admission control with early abort. The rule
here: a request still waiting when its first-token deadline (arrival + ttft_slo) has come is
dropped, since the earliest first token ends a step that starts now; serving it late would only
delay the others.

Admission reserves the worst case: a request joins only if the pool can hold the KV pages of
prompt + max_new_tokens tokens next to everything already reserved, plus its adapter's pages if
no running request uses that adapter yet. KV pages are still allocated lazily (paging.py), but
every admitted request can grow to its end: nothing is preempted, so there is no swapping or
recomputation, at the price of a smaller batch when requests stop early. Resident adapters that
no running request uses count as free: the pool evicts them when pages are wanted.

States: WAITING -> RUNNING -> FINISHED, or ABORTED by early abort, are set here; FAILED (and
cancelled) are the engine's verdicts: it takes the request out with `remove` and sets the state.
The scheduler deals in request ids and page counts only (the KV pages of n tokens are the pool's
rule, passed in); engine.py turns a `ScheduledBatch` into tensors.
Simplified: no chunked prefill (a prompt joins whole), one clock given by the caller.
Demo: `python scheduler.py` simulates a random trace with a cost model and compares the policies.
"""
import enum
import math
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import cli


class RequestRejected(ValueError):
    """A request that can never be served (unknown adapter, or larger than the pool or the step)."""


class State(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"    # early abort (first-token deadline missed) or cancelled by the caller
    FAILED = "failed"      # refused at submission, or failed by the engine


@dataclass
class Request:
    id: int
    prompt_len: int
    max_new_tokens: int
    adapter: Optional[str] = None   # None = the base model
    arrival: float = 0.0
    state: State = State.WAITING
    n_generated: int = 0            # tokens produced so far
    first_token_at: Optional[float] = None
    finished_at: Optional[float] = None

    def step_tokens(self) -> int:
        """Tokens fed to the model this step: the whole prompt first, then the last new token."""
        return self.prompt_len if self.n_generated == 0 else 1

    def cache_len(self) -> int:
        """Tokens in this request's KV cache after this step (the newest token is not fed yet)."""
        return self.prompt_len + self.n_generated


@dataclass
class SchedulerConfig:
    policy: str = cli.flag("fcfs", "fcfs (arrival order) or cluster (resident adapters first)")
    max_prefill_tokens: Optional[int] = cli.flag(None, "cap on prompt tokens joining per step", int)
    max_wait: float = cli.flag(5.0, "cluster: a request waiting longer goes first (s)")
    ttft_slo: Optional[float] = cli.flag(None, "first-token deadline after arrival, enables early "
                                               "abort (s)", float)


@dataclass
class ScheduledBatch:
    """The requests of the next model step: joining (prefill) and running (decode), plus those
    dropped by early abort. The engine builds one Batch from prefill + decode."""
    prefill: List[Request]
    decode: List[Request]
    aborted: List[Request]

    @property
    def requests(self) -> List[Request]:
        return self.prefill + self.decode


class Scheduler:
    """Waiting queue -> running batch, admission against the page budget of the unified pool."""

    def __init__(self, cfg: SchedulerConfig, total_pages: int, kv_pages: Callable[[int], int],
                 adapter_pages: Dict[str, int], adapter_budget: Optional[int] = None):
        if cfg.policy not in ("fcfs", "cluster"):
            raise ValueError(f"unknown policy {cfg.policy!r} (fcfs or cluster)")
        self.cfg, self.total_pages, self.kv_pages = cfg, total_pages, kv_pages   # n tokens -> pages
        # None: adapters share total_pages with the KV cache (unified paging). A number: adapters
        # have their own memory of that many pages, and total_pages is the KV cache's alone.
        self.adapter_budget = adapter_budget
        self.adapter_pages = adapter_pages   # the adapters that exist: name -> pages
        self.waiting: List[Request] = []
        self.running: List[Request] = []

    def kv_reserve(self, req: Request) -> int:
        return self.kv_pages(req.prompt_len + req.max_new_tokens)

    def reserved(self) -> Tuple[int, int]:
        """(KV pages, adapter pages) that the running batch may need: KV to each request's end,
        each adapter in use once."""
        used = {r.adapter for r in self.running if r.adapter is not None}
        kv = sum(self.kv_reserve(r) for r in self.running)
        return kv, sum(self.adapter_pages[a] for a in used)

    def _fits(self, kv: int, adapters: int) -> bool:
        if self.adapter_budget is None:
            return kv + adapters <= self.total_pages
        return kv <= self.total_pages and adapters <= self.adapter_budget

    def submit(self, req: Request):
        """Queue a request, or raise RequestRejected if it can never be served."""
        kv, adapter = self.kv_reserve(req), self.adapter_pages.get(req.adapter, 0)
        cap = self.cfg.max_prefill_tokens
        problem = None
        if req.adapter is not None and req.adapter not in self.adapter_pages:
            problem = f"unknown adapter {req.adapter!r}"
        elif req.prompt_len < 1 or req.max_new_tokens < 1:
            problem = (f"needs prompt_len >= 1 and max_new_tokens >= 1, "
                       f"got {req.prompt_len}, {req.max_new_tokens}")
        elif not self._fits(kv, adapter):
            problem = (f"needs {kv} KV pages + {adapter} adapter pages, more than the whole pool "
                       f"({self.total_pages} pages)")
        elif cap is not None and req.prompt_len > cap:
            problem = f"prompt of {req.prompt_len} tokens exceeds max_prefill_tokens={cap}"
        if problem:
            raise RequestRejected(problem)
        self.waiting.append(req)

    def remove(self, req: Request):
        """Take a waiting or running request out (the engine failed or cancelled it)."""
        self.waiting = [r for r in self.waiting if r is not req]
        self.running = [r for r in self.running if r is not req]

    def _order(self, now: float, resident: frozenset) -> List[Request]:
        """Candidates in the order they may join. cluster: those waiting longer than max_wait
        first (so no request starves), then those whose adapter is resident or in use (or none),
        then the rest."""
        fcfs = sorted(self.waiting, key=lambda r: (r.arrival, r.id))
        if self.cfg.policy == "fcfs":
            return fcfs
        warm = resident | {r.adapter for r in self.running}

        def priority(r: Request) -> int:   # 0 joins first
            if now - r.arrival > self.cfg.max_wait:
                return 0
            return 1 if r.adapter is None or r.adapter in warm else 2
        return sorted(fcfs, key=priority)   # sorted is stable: arrival order within a priority

    def _abort_late(self, now: float) -> List[Request]:
        """S-LoRA's early abort: a waiting request whose first-token deadline has passed."""
        if self.cfg.ttft_slo is None:
            return []
        # The first token comes at the end of a step that starts now at the earliest.
        late = [r for r in self.waiting if now >= r.arrival + self.cfg.ttft_slo]
        for r in late:
            r.state, r.finished_at = State.ABORTED, now
            self.waiting.remove(r)
        return late

    def schedule(self, now: float, resident: frozenset = frozenset()) -> ScheduledBatch:
        """Decide the next step. `resident`: names of adapters now in the pool (for clustering).
        Candidates join in order until the first that does not fit: stopping there, rather than
        letting later small requests overtake, keeps a large request from waiting forever."""
        aborted = self._abort_late(now)
        decode = list(self.running)
        (kv, adapters), in_use = self.reserved(), {r.adapter for r in self.running}
        budget = self.cfg.max_prefill_tokens   # prompt tokens that may still join; None = no cap
        prefill = []
        for req in self._order(now, resident):
            new_adapter = req.adapter is not None and req.adapter not in in_use
            adapter_cost = self.adapter_pages[req.adapter] if new_adapter else 0
            if not self._fits(kv + self.kv_reserve(req), adapters + adapter_cost) or \
                    (budget is not None and req.prompt_len > budget):
                break
            kv, adapters = kv + self.kv_reserve(req), adapters + adapter_cost
            in_use.add(req.adapter)
            if budget is not None:
                budget -= req.prompt_len
            prefill.append(req)
        for req in prefill:
            req.state = State.RUNNING
            self.waiting.remove(req)
            self.running.append(req)
        return ScheduledBatch(prefill, decode, aborted)

    def advance(self, batch: ScheduledBatch, now: float,
                stopped: frozenset = frozenset()) -> List[Request]:
        """After the model ran `batch`, each of its requests still running has one new token.
        Requests that reached max_new_tokens, or whose id is in `stopped` (end-of-sequence),
        finish; they are returned so that the engine frees their pages and adapters."""
        running, done = {r.id for r in self.running}, []
        for req in batch.requests:
            if req.id not in running:   # removed by the engine during the step
                continue
            req.n_generated += 1
            if req.first_token_at is None:
                req.first_token_at = now
            if req.n_generated == req.max_new_tokens or req.id in stopped:
                req.state, req.finished_at = State.FINISHED, now
                self.running.remove(req)
                done.append(req)
        return done

    def idle(self) -> bool:
        return not self.waiting and not self.running


# ------------------------------------------------------------------ demo: a simulated trace

@dataclass
class TraceConfig:
    n_requests: int = cli.flag(400, "requests in the trace")
    n_adapters: int = cli.flag(20, "distinct adapters, chosen uniformly")
    rate: float = cli.flag(16.0, "Poisson arrival rate (requests per simulated second)")
    pages: int = cli.flag(600, "pages in the pool")
    seed: int = cli.flag(0, "random seed")


def random_trace(t: TraceConfig) -> List[Request]:
    rng, now, trace = random.Random(t.seed), 0.0, []
    for i in range(t.n_requests):
        now += rng.expovariate(t.rate)
        prompt_len, max_new_tokens = rng.randint(4, 64), rng.randint(4, 64)
        trace.append(Request(i, prompt_len, max_new_tokens, f"a{rng.randrange(t.n_adapters)}", now))
    return trace


def simulate(cfg: SchedulerConfig, trace: List[Request], pages: int,
             adapter_pages: Dict[str, int]) -> dict:
    """Run a trace with a cost model instead of a model: a step costs 10 ms + 0.1 ms per token +
    2 ms per adapter that must be loaded (not used by the previous step). A KV page holds the K
    (or V) of 3 tokens, as for SmolLM2 in paging.py."""
    sched = Scheduler(cfg, pages, lambda n: 2 * math.ceil(n / 3), adapter_pages)
    pending, now, loads, steps, previous = list(trace), 0.0, 0, 0, frozenset()
    while pending or not sched.idle():
        while pending and pending[0].arrival <= now:
            sched.submit(pending.pop(0))
        batch = sched.schedule(now, previous)
        if not batch.requests:
            now = pending[0].arrival if pending else now
            continue
        new = {r.adapter for r in batch.prefill} - previous
        loads, steps = loads + len(new), steps + 1
        now += 0.010 + 0.0001 * sum(r.step_tokens() for r in batch.requests) + 0.002 * len(new)
        sched.advance(batch, now)
        previous = frozenset(r.adapter for r in sched.running)
    served = [r for r in trace if r.state == State.FINISHED]
    ttft = sorted(r.first_token_at - r.arrival for r in served)
    return {"finished": len(served), "aborted": sum(r.state == State.ABORTED for r in trace),
            "steps": steps, "adapter loads": loads,
            "mean TTFT ms": round(1000 * sum(ttft) / max(len(ttft), 1), 1),
            "throughput req/s": round(len(served) / now, 1)}


if __name__ == "__main__":
    trace_cfg, sched_cfg = cli.parse([TraceConfig, SchedulerConfig], "Simulate both scheduling "
                                     "policies on a random trace (--policy is not used).")
    # Pages of a rank-r adapter on T targets of one layer: an A row and a B^T row per rank.
    targets = 2
    adapters = {f"a{i}": 2 * targets * 4 * (1 + i % 4) for i in range(trace_cfg.n_adapters)}  # ranks 4-16
    for policy in ("fcfs", "cluster"):
        sched_cfg.policy = policy
        stats = simulate(sched_cfg, random_trace(trace_cfg), trace_cfg.pages, adapters)
        print(f"{policy:8s}", "  ".join(f"{k} {v}" for k, v in stats.items()))
