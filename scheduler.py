"""Iteration-level scheduling of LoRA requests (Orca, OSDI 2022; S-LoRA arXiv 2311.03285, section 3).

Orca's idea: schedule at every model step, not per batch. At each step finished requests leave and
waiting ones join, so a short request never waits for a long one to end; the prompt tokens of the
joining requests (prefill) and the one new token of each running request (decode) share the step.
S-LoRA adds two things on top: adapter clustering (prefer requests whose adapter is already in GPU
memory, so fewer adapters are loaded and the LoRA kernels see fewer distinct adapters) and admission
control with early abort (a request that can no longer get its first token before its deadline is
dropped instead of being served late, which would only delay the others).

Admission reserves the worst case, as S-LoRA does: a request joins only if the pool can hold the KV
pages of prompt + max_new_tokens tokens next to everything already reserved, plus its adapter's pages
if no running request uses that adapter yet. Pages of KV are still allocated lazily (paging.py), but
the reservation guarantees that every admitted request can grow to its end: nothing is ever preempted,
so there is no swapping or recomputation code, at the price of a smaller batch when requests stop
early (an end-of-sequence token releases the unused reservation at once). Resident adapters that no
running request uses count as free, since the pool evicts them whenever pages are wanted.

The scheduler deals in request ids and page counts only; serve.py turns a `Step` into tensors.
Simplified: no chunked prefill (a prompt joins whole), one clock given by the caller.
Demo: `python scheduler.py` simulates a random trace with integer decode and compares the policies.
"""
import argparse
import enum
import random
import typing
from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional

from paging import kv_pages


class RequestRejected(ValueError):
    """A request that can never be served (unknown adapter, or larger than the pool or the step)."""


class State(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"    # dropped by early abort: its first-token deadline could no longer be met
    FAILED = "failed"      # rejected at submission, or failed by the engine


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
    policy: str = field(default="fcfs", metadata={"help": "fcfs (arrival order) or cluster (resident adapters first)"})
    max_prefill_tokens: Optional[int] = field(default=None, metadata={"help": "cap on prompt tokens joining per step"})
    max_wait: float = field(default=5.0, metadata={"help": "cluster: a request waiting longer goes first (s)"})
    ttft_slo: Optional[float] = field(default=None, metadata={"help": "first-token deadline after arrival, "
                                                                     "enables early abort (s)"})


@dataclass
class Step:
    """What one model step runs: requests joining (prefill) and running ones (decode), plus the
    requests dropped by early abort this step. serve.py builds the Batch from prefill + decode."""
    prefill: List[Request]
    decode: List[Request]
    aborted: List[Request]

    @property
    def requests(self) -> List[Request]:
        return self.prefill + self.decode


class Scheduler:
    """Waiting queue -> running batch, admission against the page budget of the unified pool."""

    def __init__(self, cfg: SchedulerConfig, total_pages: int, tokens_per_page: int, adapter_pages: Dict[str, int],
                 adapter_budget: Optional[int] = None):
        if cfg.policy not in ("fcfs", "cluster"):
            raise ValueError(f"unknown policy {cfg.policy!r} (fcfs or cluster)")
        self.cfg, self.total_pages, self.g = cfg, total_pages, tokens_per_page
        # None: adapters share total_pages with the KV cache (unified paging). A number: adapters have
        # their own memory of that many pages and total_pages is the KV cache's alone (no unified pool).
        self.adapter_budget = adapter_budget
        self.adapter_pages = adapter_pages   # the adapters that exist (registered in the pool): name -> pages
        self.waiting: List[Request] = []
        self.running: List[Request] = []

    def kv_reserve(self, req: Request) -> int:
        return kv_pages(req.prompt_len + req.max_new_tokens, self.g)

    def reserved_pages(self) -> int:
        """Worst-case pages of the running batch: KV to their end plus each adapter in use once."""
        return sum(self._reserved())

    def _reserved(self) -> tuple:
        used = {r.adapter for r in self.running if r.adapter is not None}
        return sum(self.kv_reserve(r) for r in self.running), sum(self.adapter_pages[a] for a in used)

    def _fits(self, kv: int, adapters: int) -> bool:
        if self.adapter_budget is None:
            return kv + adapters <= self.total_pages
        return kv <= self.total_pages and adapters <= self.adapter_budget

    def submit(self, req: Request):
        """Queue a request, or mark it FAILED and raise RequestRejected if it can never be served."""
        problem = None
        if req.adapter is not None and req.adapter not in self.adapter_pages:
            problem = f"unknown adapter {req.adapter!r}"
        elif req.prompt_len < 1 or req.max_new_tokens < 1:
            problem = f"needs prompt_len >= 1 and max_new_tokens >= 1, got {req.prompt_len}, {req.max_new_tokens}"
        elif not self._fits(self.kv_reserve(req), self.adapter_pages.get(req.adapter, 0)):
            problem = (f"needs {self.kv_reserve(req)} KV pages + {self.adapter_pages.get(req.adapter, 0)} adapter "
                       f"pages, more than the whole pool ({self.total_pages} pages)")
        elif self.cfg.max_prefill_tokens is not None and req.prompt_len > self.cfg.max_prefill_tokens:
            problem = f"prompt of {req.prompt_len} tokens exceeds max_prefill_tokens={self.cfg.max_prefill_tokens}"
        if problem:
            req.state = State.FAILED
            raise RequestRejected(f"request {req.id}: {problem}")
        self.waiting.append(req)

    def _order(self, now: float, resident: frozenset) -> List[Request]:
        """Candidates in the order they may join. cluster: those waiting longer than max_wait first
        (so no request starves), then those whose adapter is resident or in use (or none), then the rest."""
        fcfs = sorted(self.waiting, key=lambda r: (r.arrival, r.id))
        if self.cfg.policy == "fcfs":
            return fcfs
        warm = resident | {r.adapter for r in self.running}

        def rank(r: Request) -> int:
            if now - r.arrival > self.cfg.max_wait:
                return 0
            return 1 if r.adapter is None or r.adapter in warm else 2
        return sorted(fcfs, key=rank)   # sorted is stable: arrival order within each rank

    def _abort_late(self, now: float) -> List[Request]:
        """S-LoRA's early abort: a waiting request whose first-token deadline has passed is dropped."""
        if self.cfg.ttft_slo is None:
            return []
        # The first token comes at the end of a step that starts now at the earliest.
        late = [r for r in self.waiting if now >= r.arrival + self.cfg.ttft_slo]
        for r in late:
            r.state, r.finished_at = State.ABORTED, now
            self.waiting.remove(r)
        return late

    def schedule(self, now: float, resident: frozenset = frozenset()) -> Step:
        """Decide the next step. `resident`: names of adapters now in the pool (for clustering).
        Candidates join in order until the first that does not fit: stopping there, rather than
        letting later small requests overtake, keeps a large request from waiting forever."""
        aborted = self._abort_late(now)
        decode = list(self.running)
        (kv, adapters), in_use = self._reserved(), {r.adapter for r in self.running}
        budget = self.cfg.max_prefill_tokens   # prompt tokens that may still join; None = no cap
        prefill = []
        for req in self._order(now, resident):
            adapter_cost = 0 if req.adapter is None or req.adapter in in_use else self.adapter_pages[req.adapter]
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
        return Step(prefill, decode, aborted)

    def advance(self, step: Step, now: float, stopped: frozenset = frozenset()) -> List[Request]:
        """After the model ran `step`, each of its requests has one new token. Requests that reached
        max_new_tokens, or whose id is in `stopped` (end-of-sequence), finish; they are returned so the
        engine frees their KV pages and releases their adapters."""
        done = []
        for req in step.requests:
            if req.state != State.RUNNING:   # failed by the engine during the step
                continue
            req.n_generated += 1
            if req.first_token_at is None:
                req.first_token_at = now
            if req.n_generated == req.max_new_tokens or req.id in stopped:
                req.state, req.finished_at = State.FINISHED, now
                self.running.remove(req)
                done.append(req)
        return done

    def fail(self, req: Request, now: float):
        """The engine could not serve a queued or running request (e.g. its adapter file broke)."""
        for queue in (self.waiting, self.running):
            if req in queue:
                queue.remove(req)
        req.state, req.finished_at = State.FAILED, now

    def idle(self) -> bool:
        return not self.waiting and not self.running


# ------------------------------------------------------------------ demo: a simulated trace, integers only

@dataclass
class TraceConfig:
    n_requests: int = field(default=400, metadata={"help": "requests in the trace"})
    n_adapters: int = field(default=20, metadata={"help": "distinct adapters, chosen uniformly"})
    rate: float = field(default=16.0, metadata={"help": "Poisson arrival rate (requests per simulated second)"})
    pages: int = field(default=600, metadata={"help": "pages in the pool"})
    seed: int = field(default=0, metadata={"help": "random seed"})


def random_trace(t: TraceConfig) -> List[Request]:
    rng, now, trace = random.Random(t.seed), 0.0, []
    for i in range(t.n_requests):
        now += rng.expovariate(t.rate)
        trace.append(Request(i, rng.randint(4, 64), rng.randint(4, 64), f"a{rng.randrange(t.n_adapters)}", now))
    return trace


def simulate(cfg: SchedulerConfig, trace: List[Request], pages: int, adapter_pages: Dict[str, int]) -> dict:
    """Run a trace with a cost model instead of a model: a step costs 10 ms + 0.1 ms per token +
    2 ms per adapter that must be loaded (not used by the previous step)."""
    sched, pending, now = Scheduler(cfg, pages, 3, adapter_pages), list(trace), 0.0
    loads, steps, previous = 0, 0, frozenset()
    while pending or not sched.idle():
        while pending and pending[0].arrival <= now:
            sched.submit(pending.pop(0))
        step = sched.schedule(now, previous)
        if not step.requests:
            now = pending[0].arrival if pending else now
            continue
        new = {r.adapter for r in step.prefill} - previous
        loads, steps = loads + len(new), steps + 1
        now += 0.010 + 0.0001 * sum(r.step_tokens() for r in step.requests) + 0.002 * len(new)
        sched.advance(step, now)
        previous = frozenset(r.adapter for r in sched.running)
    served = [r for r in trace if r.state == State.FINISHED]
    ttft = sorted(r.first_token_at - r.arrival for r in served)
    return {"finished": len(served), "aborted": sum(r.state == State.ABORTED for r in trace), "steps": steps,
            "adapter loads": loads, "mean TTFT ms": round(1000 * sum(ttft) / max(len(ttft), 1), 1),
            "throughput req/s": round(len(served) / now, 1)}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Simulate iteration-level scheduling policies on a random trace.")
    for f in fields(TraceConfig) + tuple(f for f in fields(SchedulerConfig) if f.name != "policy"):  # both run
        kind = typing.get_args(f.type)[0] if typing.get_origin(f.type) is typing.Union else f.type   # Optional[T]
        ap.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default, help=f.metadata["help"])
    args = vars(ap.parse_args())
    tcfg = TraceConfig(**{f.name: args[f.name] for f in fields(TraceConfig)})
    scfg = SchedulerConfig(**{f.name: args[f.name] for f in fields(SchedulerConfig) if f.name != "policy"})
    adapters = {f"a{i}": 2 * 2 * 4 * (1 + i % 4) for i in range(tcfg.n_adapters)}   # 2 T r: q, v; r = 4..16
    for policy in ("fcfs", "cluster"):
        stats = simulate(SchedulerConfig(policy, scfg.max_prefill_tokens, scfg.max_wait, scfg.ttft_slo),
                         random_trace(tcfg), tcfg.pages, adapters)
        print(f"{policy:8s}", "  ".join(f"{k} {v}" for k, v in stats.items()))
