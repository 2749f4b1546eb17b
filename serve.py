"""What users run: S-LoRA behind an HTTP API, and S-LoRA's experiment (Sheng et al. 2023, sec. 7).

`python serve.py --port 8000` serves the base model and every `--adapter NAME=PATH` through the
OpenAI-compatible API of server.py (the request's `model` names the adapter) until Ctrl-C.
Without --port it replays one trace over the serving engines and prints the comparison
(http_bench.py replays it through that server, to price the HTTP front end).

The engines (engine.py, baselines.py) compared on the same trace:
    slora       unified pool + gathered kernels (MBGMM for steps with prompts, MBGMV for decode)
    no-unified  memory split statically, each adapter copied into its own tensors when needed
    bmm         adapters in the pool, copied every step into padded tensors for torch.bmm
    merged      one adapter merged into the weights at a time (PEFT-style)
    base        the base model alone, every request without adapter (the cost floor)
    slora-int8  slora with int8 adapter rows (quant.py; --adapter-dtype int8 for slora or bmm)

Trace (section 7.1): n = rate x duration requests, Gamma inter-arrival times with coefficient of
variation cv, adapter popularity drawn from numpy's power distribution with exponent alpha
(alpha = 1 is uniform, smaller alpha concentrates requests on the first adapters), uniform lengths.
Synthetic adapters are random rank-r adapters on q, k, v, o; real PEFT adapters join with
`--adapter name=path` (`--host-adapters N`: at most N of these in host memory, the others read from
their files when loaded; the synthetic ones have no files and stay, views of one random bank).
`--tp N` runs slora and base over N processes (tp.py; spawned, or torchrun's), and under torchrun
the server too (tp_serve.py: rank 0 serves, every rank steps its shard); `--vs-peft` times the
engine against transformers + PEFT's mixed-adapter generate (vs_peft.py).
Simplified: arrivals are replayed on the wall clock of one process; random base weights unless
`--base` names a checkpoint (the server's default is the real SmolLM2).
Demo: `python serve.py --adapters 20 --duration 3 --layers 4`; `python serve.py --port 8000`.
Letters: L layers, H model dim.
"""
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional

import numpy as np
import torch

import cli
import figures
import kernel_bench
import server
import tp
import tp_serve
import vs_peft
from adapters import HostAdapter, target_widths
from baselines import ENGINES
from checkpoints import default_model_path, load_model, placement
from engine import Engine, EngineConfig
from lora import AdapterError
from model import Llama, ModelConfig
from scheduler import State

MODES = (*ENGINES, "slora-int8", "base")   # slora-int8: slora with --adapter-dtype int8
COMPARED = tuple(m for m in MODES if m != "slora")   # the report's slora / mode ratios


@dataclass
class TraceConfig:
    adapters: int = cli.flag(100, "number of distinct adapters")
    rate: float = cli.flag(8.0, "requests per second")
    duration: float = cli.flag(10.0, "seconds of arrivals; requests = rate x duration")
    cv: float = cli.flag(1.0, "coefficient of variation of inter-arrival times (1 = Poisson)")
    alpha: float = cli.flag(1.0, "adapter popularity exponent (1 = uniform)")
    input_len: str = cli.flag("8,32", "prompt length range lo,hi")
    output_len: str = cli.flag("8,32", "output length range lo,hi")
    ranks: str = cli.flag("8,16,32,64", "adapter ranks to draw from (S-LoRA's S2)")
    seed: int = cli.flag(0, "random seed")


@dataclass
class BenchConfig:
    modes: str = cli.flag(",".join((*ENGINES, "base")), f"modes to compare, comma separated "
                                                        f"(of {', '.join(MODES)})")
    slo: float = cli.flag(5.0, "first-token SLO (s) for attainment (--ttft-slo also aborts)")
    base: Optional[str] = cli.flag(None, "GGUF file or HF directory (default: random weights of "
                                         "SmolLM2's shape; with --port the real SmolLM2)", str)
    layers: int = cli.flag(30, "layers of the random base model")
    ignore_config_key: List[str] = cli.flag([], "a config.json key unknown to the loader that you "
                                                "know leaves the computation unchanged (repeatable; warns)")
    threads: int = cli.flag(1, "torch CPU threads (1 is steadiest; with --tp: cores / tp each)")
    adapter: List[str] = cli.flag([], "name=path of a PEFT adapter to serve (repeatable)")
    tp: int = cli.flag(1, "tensor parallelism over this many processes (S-LoRA section 6, tp.py): "
                          "gloo on a CPU, NCCL on GPUs; rank 0 prints")
    repeat: int = cli.flag(1, "replay the trace this many times: the median and range of each ratio")
    device: str = cli.flag("cpu", "cpu or cuda: the model, the unified pool and the adapters' "
                                  "pages live there; cuda runs the Triton kernels, host adapters "
                                  "pinned and copied on a side stream")
    dtype: str = cli.flag("float32", "float32, bfloat16 or float16: the base weights, the pool (KV "
                                     "cache and adapter pages) and the activations")
    vs_peft: bool = cli.flag(False, "time the engine against PEFT's mixed-adapter generate on the "
                                    "real model (needs transformers and peft; --repeat: runs each)")
    figure5: Optional[str] = cli.flag(None, "draw S-LoRA's Figure 5 from live runs to this file: "
                                            "throughput and mean latency of every mode against "
                                            "--figure-adapters (needs matplotlib; numbers in .json "
                                            "beside it)", str)
    figure_adapters: str = cli.flag("5,100,1000", "--figure5: the adapter counts, comma separated")
    figure6: Optional[str] = cli.flag(None, "draw S-LoRA's Figure 6 from live runs to this file: "
                                            "slora with early abort (--slo) against FCFS over "
                                            "--figure-rates (needs matplotlib)", str)
    figure_rates: str = cli.flag("2,4,8,16", "--figure6: the request rates, comma separated")


@dataclass
class ServerConfig:
    port: Optional[int] = cli.flag(None, "serve the OpenAI-compatible HTTP API on this port "
                                         "(server.py) instead of running the benchmark", int)
    host: str = cli.flag("127.0.0.1", "address to listen on (0.0.0.0: every interface)")


# ------------------------------------------------------------------ traces and synthetic adapters

def make_trace(t: TraceConfig, vocab_size: int) -> List[dict]:
    """Arrival times, adapter index, prompt tokens and output length of rate x duration requests."""
    rng = np.random.default_rng(t.seed)
    n = max(1, round(t.rate * t.duration))
    shape = 1.0 / t.cv ** 2                # Gamma(k, theta): mean k theta = 1/rate, cv = 1/sqrt(k)
    arrivals = np.cumsum(rng.gamma(shape, 1.0 / (t.rate * shape), n))
    adapters = np.minimum((rng.power(t.alpha, n) * t.adapters).astype(int), t.adapters - 1)
    (ilo, ihi), (olo, ohi) = [map(int, s.split(",")) for s in (t.input_len, t.output_len)]
    return [dict(arrival=float(a), adapter=int(k), max_new_tokens=int(rng.integers(olo, ohi + 1)),
                 prompt=rng.integers(0, vocab_size, rng.integers(ilo, ihi + 1)).tolist())
            for a, k in zip(arrivals, adapters)]


def synthetic_adapters(n: int, ranks: List[int], cfg: ModelConfig,
                       seed: int = 0, pin: bool = False) -> List[HostAdapter]:
    """n random rank-r adapters on q, k, v, o. To hold thousands in host memory, each adapter's
    weights are a view at its own random offset into one shared random bank; loading still copies
    each adapter's own rows into the pool, which is the cost being measured. pin: the bank in
    pinned memory, for copies to a GPU that overlap compute (paging.py)."""
    gen = torch.Generator().manual_seed(seed)
    bank = torch.randn(cfg.n_layers, 8 * max(ranks), cfg.dim, generator=gen)    # [L, rows, H]
    bank /= math.sqrt(cfg.dim)
    bank = bank.pin_memory() if pin else bank
    out = target_widths(cfg)
    adapters = []
    for i in range(n):
        r = ranks[int(torch.randint(len(ranks), (1,), generator=gen))]
        offsets = torch.randint(0, bank.shape[1] - 2 * r + 1, (len(out),), generator=gen).tolist()
        weights = {t: bank[:, o:o + 2 * r] for t, o in zip(out, offsets)}   # [L, 2r, H]: A, B^T
        adapters.append(HostAdapter(f"adapter-{i}", r, 16.0 / r, weights, dict(out)))
    return adapters


# ------------------------------------------------------------------ replay and report

def replay(engine: Engine, trace: List[dict], names: List[Optional[str]], slo: float) -> dict:
    """Submit each request at its arrival time (wall clock), step until all are done."""
    ids, i = [], 0
    engine.t0 = time.perf_counter()
    while i < len(trace) or engine.pending():
        while i < len(trace) and trace[i]["arrival"] <= engine.now():
            r = trace[i]
            ids.append(engine.submit(r["prompt"], names[i], r["max_new_tokens"], r["arrival"]))
            i += 1
        if not engine.step() and i < len(trace):
            time.sleep(max(0.0, min(0.01, trace[i]["arrival"] - engine.now())))
    reqs = [engine.records[k].request for k in ids]
    done = [r for r in reqs if r.state == State.FINISHED]
    span = max(r.finished_at for r in reqs if r.finished_at is not None) - trace[0]["arrival"]
    decode = [st for st in engine.stats if st.decode]
    mc, elem = engine.model.config, engine.pool.tensor.element_size()
    per_layer_mib = mc.n_layers * elem / 2**20        # MiB per number read in every layer
    adapter_mib = mc.n_layers * engine.pool.rows.number_bytes / 2**20   # int8 rows: 1 + scale

    def mean(xs):
        return float(np.mean(xs)) if xs else float("nan")
    return {"req/s": len(done) / span, "tok/s": sum(r.n_generated for r in done) / span,
            "latency": mean([r.finished_at - r.arrival for r in done]),
            "ttft": mean([r.first_token_at - r.arrival for r in done]),
            "slo": sum(r.first_token_at - r.arrival <= slo for r in done) / len(reqs),
            "aborted": sum(r.state == State.ABORTED for r in reqs),
            "decode_step": mean([st.seconds for st in decode]),
            "lora_mib": mean([st.lora_numbers * adapter_mib for st in decode]),
            "kv_mib": mean([st.cached_tokens * 2 * mc.kv_dim * per_layer_mib for st in decode]),
            "steps": len(engine.stats)}


def run_mode(engine: Engine, mode: str, trace, adapters, real: Dict[str, str], slo: float) -> dict:
    """Register the adapters, then replay the trace."""
    return replay(engine, trace, register_adapters(engine, mode, trace, adapters, real), slo)


def register_adapters(engine: Engine, mode: str, trace, adapters,
                      real: Dict[str, str]) -> List[Optional[str]]:
    """Register the synthetic and the real (name -> path) adapters; returns the adapter of each
    request of the trace (in the base mode every request runs without adapter)."""
    for ad in adapters:
        engine.registry.register(ad)
    for name, path in real.items():
        engine.add_adapter(name, path)
    pool_names = [a.name for a in adapters] + list(real)
    return [None if mode == "base" else pool_names[r["adapter"] % len(pool_names)] for r in trace]


def replay_modes(model: Llama, modes: List[str], b: BenchConfig, t: TraceConfig, make_engine, say):
    """The same trace and adapters over each mode; yields (mode, engine, row of the report)."""
    cfg, ranks = model.config, [int(r) for r in t.ranks.split(",")]
    trace = make_trace(t, cfg.vocab_size)
    say(f"base: {b.base or f'random weights, {cfg.n_layers} layers, dim {cfg.dim}'}; "
        f"{len(trace)} requests, {t.adapters} adapters of ranks {ranks}, rate {t.rate}/s, "
        f"cv {t.cv}, alpha {t.alpha}")
    adapters = synthetic_adapters(t.adapters, ranks, cfg, t.seed, pin=b.device == "cuda")
    real = dict(kv.split("=", 1) for kv in b.adapter)
    for mode in modes:
        engine = make_engine(mode)
        row = run_mode(engine, mode, trace, adapters, real, b.slo)
        say(f"{mode:>10}: " + "  ".join(f"{k} {v:.3g}" for k, v in row.items()), flush=True)
        yield mode, engine, row


def report(rows: Dict[str, dict], model: Llama):
    print("\n| mode | req/s | tok/s | avg latency (s) | avg first token (s) | SLO attainment "
          "| decode step (ms) |\n| --- | --- | --- | --- | --- | --- | --- |")
    for mode, r in rows.items():
        print(f"| {mode} | {r['req/s']:.2f} | {r['tok/s']:.1f} | {r['latency']:.2f} | "
              f"{r['ttft']:.2f} | {100 * r['slo']:.0f}% | {1000 * r['decode_step']:.0f} |")
    if "slora" not in rows:
        return
    r = rows["slora"]
    for other in COMPARED:
        if other in rows:
            print(f"slora / {other} throughput: {r['req/s'] / rows[other]['req/s']:.2f}x")
    bw = kernel_bench.copy_bandwidth(model.lm_head.weight.device)
    weights, mib = sum(p.numel() * p.element_size() for p in model.parameters()), 2**20
    for mode in [m for m in ("slora", "slora-int8") if m in rows]:
        r = rows[mode]
        lora, kv = r["lora_mib"] * mib, r["kv_mib"] * mib
        floor = (weights + lora + kv) / bw
        print(f"{mode} decode step {1000 * r['decode_step']:.0f} ms; bandwidth floor = (weights "
              f"{weights / mib:.0f} MiB + adapters {lora / mib:.0f} MiB + KV cache "
              f"{kv / mib:.0f} MiB) / copy bandwidth {bw / 2**30:.1f} GiB/s = "
              f"{1000 * floor:.0f} ms: {r['decode_step'] / floor:.1f}x the floor")
        print(f"the adapters a {mode} decode step reads are {lora / weights:.3f} of the base "
              f"weights: at the floor its step costs {(weights + lora + kv) / (weights + kv):.2f}x "
              "a base-model step")


# ------------------------------------------------------------------ one device or several

def base_model(b: BenchConfig) -> Llama:
    """The base model in --dtype, on the CPU (the caller moves it to its device)."""
    torch.manual_seed(0)   # every device of --tp builds the same model, then keeps its part
    if b.base:
        return load_model(b.base, b.dtype, b.ignore_config_key)[0]
    return Llama(ModelConfig(n_layers=b.layers)).to(getattr(torch, b.dtype)).eval()


def engine_for(mode: str, model: Llama, e: EngineConfig) -> Engine:
    """The engine of a mode: baselines.ENGINES, slora-int8 (slora, int8 adapter rows) or base
    (slora, run without adapters)."""
    options = {**asdict(e), **({"adapter_dtype": "int8"} if mode == "slora-int8" else {})}
    return ENGINES.get(mode, Engine)(model, None, **options)


def benchmark(b: BenchConfig, t: TraceConfig, e: EngineConfig) -> Optional[List[Dict[str, dict]]]:
    """Replay the trace over b.modes --repeat times and print the report (rank 0 prints it under
    --tp); the rows of every run (None under --tp)."""
    modes = b.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; choose from {list(MODES)}")
    try:
        device, _ = placement(b.device, b.dtype)
    except ValueError as err:
        raise SystemExit(f"serve.py: {err}")
    if b.tp > 1:
        try:
            tp.launch(b.tp, _benchmark_on_device, modes, b, t, e, device_type=b.device)
        except tp.TensorParallelError as err:
            raise SystemExit(f"tensor-parallel benchmark failed: {err}")
        return None
    torch.set_num_threads(b.threads)
    model = base_model(b).to(device)

    def make_engine(mode):
        return engine_for(mode, model, e)
    if b.repeat < 1:
        raise SystemExit(f"--repeat must be at least 1, got {b.repeat}")
    try:
        runs = [{mode: row for mode, _, row in replay_modes(model, modes, b, t, make_engine, print)}
                for _ in range(b.repeat)]
    except ValueError as err:    # an engine option the mode refuses (--adapter-dtype int8)
        raise SystemExit(f"serve.py: {err}")
    report(runs[-1], model)
    if b.repeat > 1:
        report_repeats(runs)
    return runs


def figure5(b: BenchConfig, t: TraceConfig, e: EngineConfig):
    """S-LoRA's Figure 5 from live runs: every mode at each --figure-adapters count."""
    counts = _figure_xs("--figure5", b, "figure_adapters", int)
    points = {}
    for n in counts:
        print(f"\n--figure5: {n} adapters", flush=True)
        runs = benchmark(b, replace(t, adapters=n), e)
        points[n] = {mode: [run[mode] for run in runs] for mode in runs[0]}
    title = (f"S-LoRA Figure 5 from serve.py: {b.layers}-layer model of SmolLM2's shape, "
             f"{t.rate:g} req/s for {t.duration:g} s, ranks {t.ranks}, {b.repeat} run(s) per point")
    print(f"wrote {b.figure5} and {figures.figure5(points, b.figure5, title)}")


def figure6(b: BenchConfig, t: TraceConfig, e: EngineConfig):
    """S-LoRA's Figure 6 from live runs: slora with early abort against FCFS at each rate."""
    rates = _figure_xs("--figure6", b, "figure_rates", float)
    variants = {f"early abort (SLO {b.slo:g} s)": replace(e, ttft_slo=b.slo),
                "FCFS, no abort": replace(e, ttft_slo=None)}
    points = {}
    for rate in rates:
        points[rate] = {}
        for label, cfg in variants.items():
            print(f"\n--figure6: {rate:g} requests/s, {label}", flush=True)
            runs = benchmark(replace(b, modes="slora"), replace(t, rate=rate), cfg)
            points[rate][label] = [run["slora"] for run in runs]
    title = (f"S-LoRA Figure 6 from serve.py: slora, {t.adapters} adapters, {b.layers}-layer "
             f"model, {t.duration:g} s of arrivals, {b.repeat} run(s) per point")
    print(f"wrote {b.figure6} and {figures.figure6(points, b.figure6, title)}")


def _figure_xs(flag: str, b: BenchConfig, field: str, kind) -> list:
    figures.require_matplotlib(flag)
    if b.tp > 1:
        raise SystemExit(f"{flag} runs on one device (drop --tp)")
    text = getattr(b, field)
    try:
        return [kind(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"--{field.replace('_', '-')} {text!r}: expected numbers, comma separated")


def report_repeats(runs: List[Dict[str, dict]]):
    """Arrivals follow the wall clock, so batches differ from run to run: the median and the
    range of each throughput ratio over the repeated replays."""
    for other in COMPARED:
        if "slora" in runs[0] and other in runs[0]:
            ratios = sorted(r["slora"]["req/s"] / r[other]["req/s"] for r in runs)
            print(f"slora / {other} throughput over {len(runs)} runs: median "
                  f"{ratios[len(ratios) // 2]:.2f}x, range {ratios[0]:.2f}-{ratios[-1]:.2f}x")


def _benchmark_on_device(comm: tp.Comm, modes: List[str], b: BenchConfig, t: TraceConfig,
                         e: EngineConfig):
    """One device of --tp: its shard of the model, slora and base only."""
    def say(*args, **kw):
        if comm.rank == 0:
            print(*args, **kw)
    model = base_model(b).to(comm.device)
    shard = tp.shard_model(model, comm)
    say(f"{comm.world} devices ({comm.device.type}); only slora and base are sharded: other modes "
        f"are skipped")
    rows = {}
    sharded = [m for m in modes if m in ("slora", "base")]
    def make_engine(mode):
        return tp.ShardedEngine(model, comm, shard, None, **asdict(e))
    for mode, engine, row in replay_modes(model, sharded, b, t, make_engine, say):
        rows[mode] = row
        base, lora = (sum(col) / len(engine.step_bytes) / 1024 for col in zip(*engine.step_bytes))
        say(f"{'':>10}  bytes per step and device: base {base:.1f} KiB, LoRA {lora:.1f} KiB "
            f"(LoRA / base {lora / base:.3f})", flush=True)
    if comm.rank == 0:
        report(rows, model)


# ------------------------------------------------------------------ the HTTP server

def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve_http(s: ServerConfig, b: BenchConfig, e: EngineConfig, net: server.NetworkConfig):
    """Load the base model and the adapters, serve them over HTTP until Ctrl-C or SIGTERM, then
    stop cleanly: running requests get a few seconds to finish, the others end with the reason.
    Under torchrun with --tp N: every rank holds its shard, rank 0 serves (tp_serve.py)."""
    if "WORLD_SIZE" in os.environ or b.tp > 1:
        if "WORLD_SIZE" not in os.environ:
            raise SystemExit(f"serve.py: the server over tensor parallelism runs under torchrun: "
                             f"torchrun --standalone --nproc-per-node {b.tp} serve.py --port "
                             f"{s.port} --tp {b.tp} ...")
        try:
            tp.launch(b.tp, _serve_on_device, s, b, e, net, device_type=b.device)
        except tp.TensorParallelError as err:
            raise SystemExit(f"serve.py: {err}")
        return
    torch.set_num_threads(b.threads)
    try:
        device, _ = placement(b.device, b.dtype)
    except ValueError as err:
        raise SystemExit(f"serve.py: {err}")
    model, tok, base_id = _served_model(b)
    model.to(device)
    _serve(Engine(model, tok.eos_id, **asdict(e)), tok, base_id, s, b, net)


def _served_model(b: BenchConfig) -> tuple:
    """(model, tokenizer, the model's id: the file or folder name, e.g. SmolLM2-135M-Instruct)."""
    path = b.base or default_model_path()
    model, tok = load_model(path, b.dtype, b.ignore_config_key)
    return model, tok, os.path.basename(os.path.normpath(path)).split(".")[0]


def _serve_on_device(comm: tp.Comm, s: ServerConfig, b: BenchConfig, e: EngineConfig,
                     net: server.NetworkConfig):
    """One rank of the server over tensor parallelism: its shard; rank 0 serves, the others
    follow."""
    model, tok, base_id = _served_model(b)
    model.to(comm.device)
    shard = tp.shard_model(model, comm)
    engine = tp_serve.ReplicatedEngine(model, comm, shard, tok.eos_id, **asdict(e))
    if comm.rank != 0:
        return tp_serve.follow(engine)
    _serve(engine, tok, base_id, s, b, net)
    engine.stop()                                  # the others return from follow


def _serve(engine: Engine, tok, base_id: str, s: ServerConfig, b: BenchConfig,
           net: server.NetworkConfig):
    try:
        for name, adapter_path in (kv.split("=", 1) for kv in b.adapter):
            engine.add_adapter(name, adapter_path)
        httpd = server.start_server(engine, tok, base_id, s.host, s.port, net)
    except (AdapterError, OSError, ValueError) as err:
        raise SystemExit(f"serve.py: {err}")
    print(f"serving at http://{s.host}:{httpd.server_address[1]}/v1 (Ctrl-C or SIGTERM stops): base model "
          f"{base_id!r}, adapters {engine.adapter_names()}", flush=True)
    if net.key() is None and s.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: {s.host} is reachable from the network and no --api-key is set", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)   # SIGTERM stops as Ctrl-C does
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while httpd.loop.fatal is None:
            time.sleep(0.2)
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a repeated SIGTERM keeps the grace period
        print("shutting down: running requests get 5 s to finish", flush=True)
        server.stop_server(httpd, grace_s=5.0)
        return
    server.stop_server(httpd, grace_s=0.0)
    raise SystemExit(f"serve.py: the engine stopped: {httpd.loop.fatal}")


if __name__ == "__main__":
    try:
        trace_cfg, bench_cfg, engine_cfg, server_cfg, net_cfg = cli.parse(
            [TraceConfig, BenchConfig, EngineConfig, ServerConfig, server.NetworkConfig],
            "Serve LoRA adapters over HTTP (--port), or replay an S-LoRA trace over serving modes.")
    except ValueError as e:   # a config that checks itself (EngineConfig) refused a flag
        raise SystemExit(f"serve.py: {e}")
    if server_cfg.port is not None:
        serve_http(server_cfg, bench_cfg, engine_cfg, net_cfg)
    elif bench_cfg.vs_peft:
        vs_peft.compare(bench_cfg.base, bench_cfg.threads, bench_cfg.repeat, engine_cfg)
    elif bench_cfg.figure5 or bench_cfg.figure6:
        (figure5 if bench_cfg.figure5 else figure6)(bench_cfg, trace_cfg, engine_cfg)
    else:
        benchmark(bench_cfg, trace_cfg, engine_cfg)
