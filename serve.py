"""S-LoRA serving: the engine, synthetic traces and the benchmark (Sheng et al. 2023, sections 4-7).

One base model serves many LoRA adapters at once. Every step the engine
    schedules (scheduler.py: who leaves, who joins, within the page budget of the pool),
    builds one explicit `Batch` (token ids, positions, page tables, per-token adapter slots),
    runs the ragged forward (model.py) whose LoRA part, y += scale[a] (x A[a]) B[a], comes from
    the gathered kernels over the unified pool (kernels.py, paging.py), then samples and
    postprocesses (finished requests free their pages and release their adapters).

Serving modes compared on the same trace (the paper's baselines, section 7):
    slora       unified pool + gathered kernels (MBGMM for steps with prefill, MBGMV for decode)
    no-unified  memory split statically: a KV pool of pool_pages - adapter_reserve pages, and adapter
                memory of adapter_reserve pages in which each adapter is copied into its own freshly
                allocated tensors when a batch needs it and freed when no running request does
                (the fragmentation and the reloads that S-LoRA's unified pool avoids); its LoRA
                arithmetic is slora's CPU path on those tensors, so on a CPU the two modes differ
                in memory management only
    bmm         adapters in the pool, but each step copies them into padded contiguous tensors
                [S, H, r_max] and computes x A B with torch.bmm (padding to the largest rank)
    merged      the PEFT-style baseline: merge one adapter into the weights, batch only its
                requests, unmerge (restore the weights) to switch
    base        the base model alone, every request without adapter (the cost floor)

Trace (section 7.1): n = rate x duration requests, Gamma inter-arrival times with coefficient of
variation cv, adapter popularity drawn from numpy's power distribution with exponent alpha
(alpha = 1 is uniform, smaller alpha concentrates requests on the first adapters), uniform lengths.
Demo: `python serve.py --adapters 100`. Letters: N tokens of a step, R requests, H model dim.
"""
import argparse
import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List, NamedTuple, Optional

import numpy as np
import torch

import kernels
from lora import AdapterError
from checkpoints import load_model
from model import Batch, Llama, ModelConfig, sample
from paging import SERVABLE, HostAdapter, PoolConfig, UnifiedPool
from scheduler import Request, RequestRejected, Scheduler, SchedulerConfig, State

MODES = ("slora", "no-unified", "bmm", "merged")


@dataclass
class EngineConfig:
    pool_pages: int = 6000              # pages of H numbers in the unified pool
    mode: str = "slora"                 # one of MODES
    policy: str = "fcfs"                # fcfs or cluster (adapter clustering)
    ttft_slo: Optional[float] = None    # first-token deadline (s); enables early abort
    max_prefill_tokens: Optional[int] = None  # cap on prompt tokens joining per step
    prefetch: int = 4                   # adapters of the next waiting requests to load ahead
    adapter_reserve: Optional[int] = None  # no-unified: pages of adapter memory (None: half the pool)
    temperature: float = 0.0            # 0 = greedy


class StepTime(NamedTuple):
    """What one engine step took and read (for the benchmark's bandwidth floor)."""
    seconds: float
    tokens: int            # N, tokens in the batch
    decode: bool           # every request decoding (no prompt in the step)
    lora_numbers: int      # numbers of A and B^T read in each layer: its distinct adapters, once each
    cached_tokens: int     # tokens whose K and V the step's attention reads


@dataclass
class Failed:
    """The outcome of a request that could not be served, with the reason."""
    reason: str


class Engine:
    """schedule -> Batch -> forward_paged -> sample -> postprocess, over one unified pool."""

    def __init__(self, model: Llama, eos_id: Optional[int] = None, **options):
        self.cfg, self.model, self.eos_id = EngineConfig(**options), model, eos_id
        if self.cfg.mode not in MODES:
            raise ValueError(f"unknown mode {self.cfg.mode!r}; choose from {MODES}")
        mc, w = model.config, model.lm_head.weight
        reserve = None
        if self.cfg.mode == "no-unified":   # a static split: KV pool + adapter memory = pool_pages
            reserve = self.cfg.pool_pages // 2 if self.cfg.adapter_reserve is None else self.cfg.adapter_reserve
        kv_pages = self.cfg.pool_pages - (reserve or 0)
        self.pool = UnifiedPool(PoolConfig.for_model(mc, kv_pages, str(w.dtype).split(".")[-1], str(w.device)))
        self.adapter_pages: Dict[str, int] = {}   # pages each registered adapter takes
        self.sched = Scheduler(SchedulerConfig(self.cfg.policy, self.cfg.max_prefill_tokens, ttft_slo=self.cfg.ttft_slo),
                               kv_pages, self.pool.g, self.adapter_pages, adapter_budget=reserve)
        self.out_dim = {t: getattr(model.model.layers[0].self_attn, t).out_features for t in SERVABLE}
        self.requests: Dict[int, Request] = {}
        self.tokens: Dict[int, List[int]] = {}     # request id -> prompt + generated tokens
        self.failed: Dict[int, str] = {}
        self.loose: Dict[str, Dict] = {}           # no-unified: adapters in their own tensors
        self.held: List[Request] = []              # merged: requests of other adapters, not yet submitted
        self.merged: Optional[str] = None
        self.originals = {}                        # merged: the base weights, restored on unmerge
        self.step_times: List[StepTime] = []
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    # ------------------------------------------------------------------ adapters and requests

    def add_adapter(self, name: str, path: str):
        """Register a PEFT adapter directory; a bad one raises AdapterError and changes nothing."""
        try:
            self.register(HostAdapter.from_dir(name, path, self.model.config.n_layers))
        except (ValueError, KeyError) as e:
            raise AdapterError(f"adapter {name!r} at {path}: {e}") from None

    def register(self, adapter: HostAdapter):
        self.pool.register(adapter)
        self.adapter_pages[adapter.name] = adapter.n_pages if self.cfg.mode != "merged" else 0

    def submit(self, prompt: List[int], adapter: Optional[str], max_new_tokens: int, arrival=None) -> int:
        rid = len(self.requests)
        req = Request(rid, len(prompt), max_new_tokens, adapter, self.now() if arrival is None else arrival)
        self.requests[rid], self.tokens[rid] = req, list(prompt)
        try:
            if len(prompt) + max_new_tokens > self.model.config.max_seq_len:
                raise RequestRejected(f"request {rid}: {len(prompt)} + {max_new_tokens} tokens exceed "
                                      f"max_seq_len={self.model.config.max_seq_len}")
            if adapter is not None and adapter not in self.adapter_pages:
                raise RequestRejected(f"request {rid}: unknown adapter {adapter!r} "
                                      f"(registered: {len(self.adapter_pages)} adapters)")
            if self.cfg.mode == "merged" and (self.merged != adapter or self.sched.idle()):
                self.held.append(req)             # waits for its adapter's turn (see _switch_merged)
            else:
                self.sched.submit(req)
        except RequestRejected as e:
            req.state, self.failed[rid] = State.FAILED, str(e)
        return rid

    def generate(self, prompts, adapter_names, max_new_tokens, temperature=0.0):
        """New tokens of each request (a Failed where a request could not be served)."""
        self.cfg.temperature = temperature
        ids = [self.submit(p, a, max_new_tokens) for p, a in zip(prompts, adapter_names)]
        while self.step() or self.pending():
            pass
        return [Failed(self.failed[i]) if i in self.failed else self.tokens[i][self.requests[i].prompt_len:]
                for i in ids]

    def pending(self) -> bool:
        return bool(self.held) or not self.sched.idle()

    # ------------------------------------------------------------------ one step

    def step(self) -> bool:
        """Run one model step; False when there was nothing to run."""
        if self.cfg.mode == "merged":
            self._switch_merged()
        plan = self.sched.schedule(self.now(), frozenset(self.pool.resident))
        if not plan.requests:
            return False
        start = time.perf_counter()
        for req in plan.prefill:
            if req.adapter is not None:
                self._acquire(req.adapter)
        for req in plan.requests:
            self.pool.allocate_kv(req.id, req.cache_len())
        if self.cfg.mode in ("slora", "bmm") and self.cfg.prefetch:
            self.pool.prefetch([r.adapter for r in self.sched.waiting[:self.cfg.prefetch] if r.adapter])
        # Requests of one adapter side by side: each adapter is one segment of the LoRA kernels.
        reqs = sorted(plan.requests, key=lambda r: (r.adapter is not None, r.adapter or ""))
        batch, slots, names = self._batch(reqs)
        lora = self._lora(batch, reqs, bool(plan.prefill), slots, names)
        with torch.no_grad():
            logits = self.model.forward_paged(batch, self.pool.tensor, lora)      # [R, V]
        new = sample(logits, self.cfg.temperature).tolist()
        for req, t in zip(reqs, new):
            self.tokens[req.id].append(t)
        stopped = frozenset(r.id for r, t in zip(reqs, new) if t == self.eos_id)
        for req in self.sched.advance(plan, self.now(), stopped):
            self.pool.free_seq(req.id)
            if req.adapter is not None:
                self._release(req.adapter)
        H, host = self.model.config.dim, self.pool.host
        self.step_times.append(StepTime(time.perf_counter() - start, int(batch.tokens.numel()), not plan.prefill,
                                        sum(host[n].rank * (H + host[n].out[t]) for n in names for t in host[n].targets),
                                        sum(r.cache_len() for r in reqs)))
        return True

    def _batch(self, reqs):
        """Scheduled requests -> one Batch; each request's tokens are one segment of its adapter."""
        tokens, positions, seq_ids, last, slots, names = [], [], [], [], [], []
        for row, req in enumerate(reqs):
            n, end = req.step_tokens(), req.cache_len()
            tokens += self.tokens[req.id][end - n:end]
            positions += range(end - n, end)
            seq_ids += [row] * n
            last.append(len(tokens) - 1)
            if req.adapter is not None and req.adapter not in names:
                names.append(req.adapter)
            slots.append(0 if req.adapter is None else 1 + names.index(req.adapter))   # slot 0 = base model
        dev = self.pool.tensor.device
        as_t = lambda xs: torch.tensor(xs, dtype=torch.int32, device=dev)
        batch = Batch(as_t(tokens).long(), as_t(positions), as_t(seq_ids), self.pool.block_table([r.id for r in reqs]),
                      as_t([r.cache_len() for r in reqs]), as_t(last).long())
        return batch, slots, names

    # ------------------------------------------------------------------ the LoRA part of each mode

    def _lora(self, batch, reqs, prefill, slots, names):
        if not names or self.cfg.mode == "merged":
            return None
        dev = batch.tokens.device
        lengths = torch.tensor([r.step_tokens() for r in reqs], device=dev)
        seg_adapter = torch.tensor(slots, dtype=torch.int32, device=dev)                   # [R]
        token_slots = seg_adapter.repeat_interleave(lengths)                               # [N]
        if self.cfg.mode == "no-unified":
            return self._lora_loose(names, token_slots)
        tables = self.pool.kernel_tables(names)
        max_rank = max(self.pool.host[n].rank for n in names)
        if self.cfg.mode == "bmm":
            return self._lora_bmm(tables, token_slots, max_rank)
        if prefill:    # MBGMM: one segment per request, its tokens share an adapter
            segments = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).int(), seg_adapter       # [R + 1], [R]
        else:          # MBGMV: every token its own segment
            segments = torch.arange(len(token_slots) + 1, dtype=torch.int32, device=dev), token_slots  # [N + 1], [N]
        steps = {target: kernels.plan_lora(self.pool.tensor[0], t.page_ids, t.a_start, t.b_start, t.ranks, t.scales,
                                           *segments, max_rank,
                                           per_token=not prefill) for target, t in tables.items()}

        def lora(x, layer, target):  # x [N, H] -> scale[a] (x A[a]) B[a]  [N, O]
            step = steps.get(target)
            if step is None or not step.runs:
                return None
            return kernels.lora_apply(x, self.pool.tensor[layer], step, self.out_dim[target])
        return lora

    def _lora_bmm(self, tables, token_slots, max_rank):
        """Baseline: copy every adapter of the step into padded tensors, then per-token torch.bmm."""
        padded = {}
        for target, t in tables.items():
            S, O = t.ranks.numel(), self.out_dim[target]
            A = self.pool.tensor.new_zeros(self.model.config.n_layers, S, max_rank, self.pool.tensor.shape[2])
            Bt = self.pool.tensor.new_zeros(self.model.config.n_layers, S, max_rank, O)
            for s in range(1, S):
                r, a0, b0 = int(t.ranks[s]), int(t.a_start[s]), int(t.b_start[s])
                A[:, s, :r] = self.pool.tensor[:, t.page_ids[a0:a0 + r].long()]                # [L, r, H]
                Bt[:, s, :r] = self.pool.tensor[:, t.page_ids[b0:b0 + r].long(), :O] * t.scales[s]
            padded[target] = (A, Bt)
        idx = token_slots.long()

        def lora(x, layer, target):
            if target not in padded:
                return None
            A, Bt = padded[target]
            z = torch.bmm(x[:, None, :], A[layer, idx].transpose(1, 2))                        # [N, 1, r_max]
            return torch.bmm(z, Bt[layer, idx])[:, 0]                                          # [N, O]
        return lora

    def _lora_loose(self, names, token_slots):
        """Baseline without unified paging: each adapter in its own tensors, one pair of matrix products
        per run of tokens that share an adapter (the CPU path of kernels.lora_apply, on these tensors)."""
        slots, counts = torch.unique_consecutive(token_slots, return_counts=True)
        ends = counts.cumsum(0).tolist()
        runs = [(end - n, end, names[s - 1]) for s, n, end in zip(slots.tolist(), counts.tolist(), ends) if s > 0]

        def lora(x, layer, target):
            delta = None
            for t0, t1, name in runs:
                ad = self.loose[name]
                if target in ad["A"]:
                    delta = x.new_zeros(x.shape[0], self.out_dim[target]) if delta is None else delta
                    delta[t0:t1].addmm_(x[t0:t1] @ ad["A"][target][layer].T, ad["Bt"][target][layer], alpha=ad["scale"])
            return delta
        return lora

    def _acquire(self, name):
        if self.cfg.mode in ("slora", "bmm"):
            self.pool.acquire(name)
        elif self.cfg.mode == "no-unified":
            if name not in self.loose:   # a fresh allocation and copy, as without a shared pool
                ad = self.pool.host[name]
                self.loose[name] = {"A": {t: ad.a(t).clone() for t in ad.targets},
                                    "Bt": {t: ad.bt(t).clone() for t in ad.targets}, "scale": ad.scale, "refs": 0}
            self.loose[name]["refs"] += 1

    def _release(self, name):
        if self.cfg.mode in ("slora", "bmm"):
            self.pool.release(name)
        elif self.cfg.mode == "no-unified":
            self.loose[name]["refs"] -= 1
            if self.loose[name]["refs"] == 0:
                del self.loose[name]

    def _switch_merged(self):
        """merged mode: once the batch of the merged adapter is done, restore the base weights; then
        merge the adapter of the oldest held request and submit every held request of it."""
        if not self.sched.idle():
            return
        attn = [layer.self_attn for layer in self.model.model.layers]
        with torch.no_grad():
            for (i, t), w in self.originals.items():
                getattr(attn[i], t).weight.copy_(w)
            self.originals, self.merged = {}, None
            if not self.held:
                return
            name = min(self.held, key=lambda r: r.arrival).adapter
            if name is not None:
                ad = self.pool.host[name]
                for i, t in ((i, t) for i in range(len(attn)) for t in ad.targets):
                    w = getattr(attn[i], t).weight                                   # [O, H]
                    self.originals[(i, t)] = w.clone()
                    w += ad.scale * ad.bt(t)[i].T.to(w) @ ad.a(t)[i].to(w)           # W0 + (alpha/r) B A
        self.merged = name
        for req in [r for r in self.held if r.adapter == name]:
            self.held.remove(req)
            self.sched.submit(req)


# ---------------------------------------------------------------------- traces and synthetic adapters

@dataclass
class TraceConfig:
    adapters: int = field(default=100, metadata={"help": "number of distinct adapters"})
    rate: float = field(default=8.0, metadata={"help": "requests per second"})
    duration: float = field(default=10.0, metadata={"help": "seconds of arrivals; requests = rate x duration"})
    cv: float = field(default=1.0, metadata={"help": "coefficient of variation of inter-arrival times (1 = Poisson)"})
    alpha: float = field(default=1.0, metadata={"help": "adapter popularity exponent (1 = uniform)"})
    input_len: str = field(default="8,32", metadata={"help": "prompt length range lo,hi"})
    output_len: str = field(default="8,32", metadata={"help": "output length range lo,hi"})
    ranks: str = field(default="8,16,32,64", metadata={"help": "adapter ranks to draw from (S-LoRA's S2)"})
    seed: int = field(default=0, metadata={"help": "random seed"})


def make_trace(t: TraceConfig, vocab_size: int) -> List[dict]:
    """Arrival times, adapter index, prompt tokens and output length of rate x duration requests."""
    rng = np.random.default_rng(t.seed)
    n = max(1, round(t.rate * t.duration))
    shape = 1.0 / t.cv ** 2                        # Gamma(k, theta): mean k theta = 1/rate, cv = 1/sqrt(k)
    arrivals = np.cumsum(rng.gamma(shape, 1.0 / (t.rate * shape), n))
    adapters = np.minimum((rng.power(t.alpha, n) * t.adapters).astype(int), t.adapters - 1)
    (ilo, ihi), (olo, ohi) = [map(int, s.split(",")) for s in (t.input_len, t.output_len)]
    return [dict(arrival=float(a), adapter=int(k), max_new_tokens=int(rng.integers(olo, ohi + 1)),
                 prompt=rng.integers(0, vocab_size, rng.integers(ilo, ihi + 1)).tolist())
            for a, k in zip(arrivals, adapters)]


def synthetic_adapters(n: int, ranks: List[int], cfg: ModelConfig, seed: int = 0) -> List[HostAdapter]:
    """n random rank-r adapters on q, k, v, o. To hold thousands in host memory, each adapter's
    weights are a view at its own random offset into one shared random bank; loading still copies
    each adapter's own rows into the pool, which is the cost being measured."""
    gen = torch.Generator().manual_seed(seed)
    bank = torch.randn(cfg.n_layers, 8 * max(ranks), cfg.dim, generator=gen) / math.sqrt(cfg.dim)  # [L, rows, H]
    out = {"q_proj": cfg.dim, "k_proj": cfg.kv_dim, "v_proj": cfg.kv_dim, "o_proj": cfg.dim}
    adapters = []
    for i in range(n):
        r = ranks[int(torch.randint(len(ranks), (1,), generator=gen))]
        offsets = torch.randint(0, bank.shape[1] - 2 * r + 1, (len(out),), generator=gen).tolist()
        weights = {t: bank[:, o:o + 2 * r] for t, o in zip(out, offsets)}         # [L, 2r, H]: A rows, B^T rows
        adapters.append(HostAdapter(f"adapter-{i}", r, 16.0 / r, weights, dict(out)))
    return adapters


# ---------------------------------------------------------------------- the benchmark

@dataclass
class BenchConfig:
    modes: str = field(default="slora,no-unified,bmm,merged,base", metadata={"help": "modes to compare, comma separated"})
    policy: str = field(default="fcfs", metadata={"help": "fcfs or cluster"})
    pool_pages: int = field(default=12000, metadata={"help": "pages in the unified pool (a page: H numbers x L layers)"})
    adapter_reserve: int = field(default=6000, metadata={"help": "no-unified: pages held back for adapters"})
    slo: float = field(default=5.0, metadata={"help": "first-token SLO (s) for attainment"})
    abort: bool = field(default=False, metadata={"help": "early-abort requests that miss the SLO"})
    base: str = field(default="", metadata={"help": "GGUF file or HF directory (default: random weights, real shape)"})
    layers: int = field(default=30, metadata={"help": "layers of the random base model"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (1 is steadiest on a shared machine)"})
    adapter: List[str] = field(default_factory=list, metadata={"help": "name=path of a PEFT adapter to serve (repeatable)"})
    tp: int = field(default=1, metadata={"help": "tensor parallelism over this many processes (S-LoRA section 6, "
                                                 "tp.py): gloo on a CPU, NCCL on GPUs; rank 0 prints"})


def replay(engine: Engine, trace: List[dict], names: List[Optional[str]], slo: float) -> dict:
    """Submit each request at its arrival time (wall clock), step until all are done."""
    ids, i = [], 0
    engine.t0 = time.perf_counter()
    while i < len(trace) or engine.pending():
        while i < len(trace) and trace[i]["arrival"] <= engine.now():
            r = trace[i]
            ids.append(engine.submit(r["prompt"], names[i], r["max_new_tokens"], arrival=r["arrival"]))
            i += 1
        if not engine.step() and i < len(trace):
            time.sleep(max(0.0, min(0.01, trace[i]["arrival"] - engine.now())))
    reqs = [engine.requests[k] for k in ids]
    done = [r for r in reqs if r.state == State.FINISHED]
    span = max(r.finished_at for r in reqs if r.finished_at is not None) - trace[0]["arrival"]
    decode = [st for st in engine.step_times if st.decode]
    mc, elem = engine.model.config, engine.pool.tensor.element_size()
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")   # noqa: E731
    return {"req/s": len(done) / span, "tok/s": sum(r.n_generated for r in done) / span,
            "latency": float(np.mean([r.finished_at - r.arrival for r in done])),
            "ttft": float(np.mean([r.first_token_at - r.arrival for r in done])),
            "slo": sum(r.first_token_at - r.arrival <= slo for r in done) / len(reqs),
            "aborted": sum(r.state == State.ABORTED for r in reqs),
            "decode_step": mean([st.seconds for st in decode]),
            "lora_mib": mean([st.lora_numbers * mc.n_layers * elem / 2**20 for st in decode]),
            "kv_mib": mean([st.cached_tokens * 2 * mc.kv_dim * mc.n_layers * elem / 2**20 for st in decode]),
            "steps": len(engine.step_times)}


def run_mode(engine: Engine, mode: str, trace, adapters, real: Dict[str, str], slo: float) -> dict:
    """Register the synthetic and the real (name -> path) adapters, then replay the trace; in the
    base mode every request runs without adapter."""
    for ad in adapters:
        engine.register(ad)
    for name, path in real.items():
        engine.add_adapter(name, path)
    pool_names = [a.name for a in adapters] + list(real)
    names = [None if mode == "base" else pool_names[r["adapter"] % len(pool_names)] for r in trace]
    return replay(engine, trace, names, slo)


def copy_bandwidth(nbytes=256 << 20) -> float:
    """Bytes per second moved by a large tensor copy (each byte read once and written once)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    return 2 * nbytes * 5 / (time.perf_counter() - start)


def benchmark(b: BenchConfig, t: TraceConfig):
    if b.tp > 1:
        import tp   # imported here only: tp.py imports this module
        return tp.benchmark(b, t)
    torch.manual_seed(0)
    torch.set_num_threads(b.threads)
    model = load_model(b.base)[0] if b.base else Llama(ModelConfig(n_layers=b.layers)).eval()
    cfg, ranks = model.config, [int(r) for r in t.ranks.split(",")]
    trace = make_trace(t, cfg.vocab_size)
    print(f"base: {b.base or f'random weights, {cfg.n_layers} layers, dim {cfg.dim}'}; {len(trace)} requests, "
          f"{t.adapters} adapters of ranks {ranks}, rate {t.rate}/s, cv {t.cv}, alpha {t.alpha}", flush=True)
    adapters, real = synthetic_adapters(t.adapters, ranks, cfg, t.seed), dict(kv.split("=", 1) for kv in b.adapter)
    rows = {}
    for mode in b.modes.split(","):
        engine = Engine(model, None, mode="slora" if mode == "base" else mode, policy=b.policy, pool_pages=b.pool_pages,
                        adapter_reserve=b.adapter_reserve, ttft_slo=b.slo if b.abort else None)
        rows[mode] = run_mode(engine, mode, trace, adapters, real, b.slo)
        print(f"{mode:>10}: " + "  ".join(f"{k} {v:.3g}" for k, v in rows[mode].items()), flush=True)
    report(rows, model)
    return rows


def report(rows, model):
    print("\n| mode | req/s | tok/s | avg latency (s) | avg first token (s) | SLO attainment | decode step (ms) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode, r in rows.items():
        print(f"| {mode} | {r['req/s']:.2f} | {r['tok/s']:.1f} | {r['latency']:.2f} | {r['ttft']:.2f} | "
              f"{100 * r['slo']:.0f}% | {1000 * r['decode_step']:.0f} |")
    if "slora" not in rows:
        return
    for other in ("merged", "no-unified", "bmm", "base"):
        if other in rows:
            print(f"slora / {other} throughput: {rows['slora']['req/s'] / rows[other]['req/s']:.2f}x")
    bw, weights = copy_bandwidth(), sum(p.numel() * p.element_size() for p in model.parameters())
    r = rows["slora"]
    lora, kv = r["lora_mib"] * 2**20, r["kv_mib"] * 2**20
    floor = (weights + lora + kv) / bw
    print(f"slora decode step {1000 * r['decode_step']:.0f} ms; bandwidth floor = (weights {weights / 2**20:.0f} MiB "
          f"+ adapters {lora / 2**20:.0f} MiB + KV cache {kv / 2**20:.0f} MiB) / copy bandwidth {bw / 2**30:.1f} GiB/s "
          f"= {1000 * floor:.0f} ms: {r['decode_step'] / floor:.1f}x the floor")
    print(f"the adapters a decode step reads are {lora / weights:.2f} of the base weights: at the floor a slora step "
          f"costs {(weights + lora + kv) / (weights + kv):.2f}x a base-model step")


def _parse() -> tuple:
    ap = argparse.ArgumentParser(description="Replay an S-LoRA trace over several serving modes.")
    for f in fields(TraceConfig) + fields(BenchConfig):
        if f.name == "adapter":
            ap.add_argument("--adapter", action="append", default=[], help=f.metadata["help"])
        elif f.type is bool:
            ap.add_argument("--" + f.name, action="store_true", help=f.metadata["help"])
        else:
            ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                            help=f.metadata["help"])
    args = vars(ap.parse_args())
    pick = lambda cls: cls(**{f.name: args[f.name] for f in fields(cls)})
    return pick(BenchConfig), pick(TraceConfig)


if __name__ == "__main__":
    benchmark(*_parse())
