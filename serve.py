"""What users run: S-LoRA behind an HTTP API, and S-LoRA's experiment (Sheng et al. 2023, sec. 7).

`python serve.py --port 8000` serves the base model and every `--adapter NAME=PATH` through the
OpenAI-compatible API of server.py (the request's `model` names the adapter) until Ctrl-C.
Without --port it replays one trace over the serving engines and prints the comparison.

The engines (engine.py, baselines.py) compared on the same trace:
    slora       unified pool + gathered kernels (MBGMM for steps with prompts, MBGMV for decode)
    no-unified  memory split statically, each adapter copied into its own tensors when needed
    bmm         adapters in the pool, copied every step into padded tensors for torch.bmm
    merged      one adapter merged into the weights at a time (PEFT-style)
    base        the base model alone, every request without adapter (the cost floor)

Trace (section 7.1): n = rate x duration requests, Gamma inter-arrival times with coefficient of
variation cv, adapter popularity drawn from numpy's power distribution with exponent alpha
(alpha = 1 is uniform, smaller alpha concentrates requests on the first adapters), uniform lengths.
Synthetic adapters are random rank-r adapters on q, k, v, o; real PEFT adapters join with
`--adapter name=path`. `--tp N` runs slora and base over N processes (tp.py).
Simplified: arrivals are replayed on the wall clock of one process; random base weights unless
`--base` names a checkpoint (the server's default is the real SmolLM2).
Demo: `python serve.py --adapters 20 --duration 3 --layers 4`; `python serve.py --port 8000`.
Letters: L layers, H model dim.
"""
import importlib.util
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import numpy as np
import torch

import cli
import kernels
import server
import tp
from baselines import ENGINES
from checkpoints import default_model_path, load_model, save_hf
from lora import AdapterError, LoRAConfig, add_lora, lora_layers, save_adapter
from engine import Engine, EngineConfig
from model import Llama, ModelConfig
from paging import HostAdapter, target_widths
from scheduler import State

MODES = (*ENGINES, "base")


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
    modes: str = cli.flag(",".join(MODES), "modes to compare, comma separated")
    slo: float = cli.flag(5.0, "first-token SLO (s) for attainment (--ttft-slo also aborts)")
    base: Optional[str] = cli.flag(None, "GGUF file or HF directory (default: random weights of "
                                         "SmolLM2's shape; with --port the real SmolLM2)", str)
    layers: int = cli.flag(30, "layers of the random base model")
    threads: int = cli.flag(1, "torch CPU threads (1 is steadiest; with --tp: cores / tp each)")
    adapter: List[str] = cli.flag([], "name=path of a PEFT adapter to serve (repeatable)")
    tp: int = cli.flag(1, "tensor parallelism over this many processes (S-LoRA section 6, tp.py): "
                          "gloo on a CPU, NCCL on GPUs; rank 0 prints")
    repeat: int = cli.flag(1, "replay the trace this many times: the median and range of each ratio")
    vs_peft: bool = cli.flag(False, "time the engine against PEFT's mixed-adapter generate on the "
                                    "real model (needs transformers and peft; --repeat: runs each)")


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
                       seed: int = 0) -> List[HostAdapter]:
    """n random rank-r adapters on q, k, v, o. To hold thousands in host memory, each adapter's
    weights are a view at its own random offset into one shared random bank; loading still copies
    each adapter's own rows into the pool, which is the cost being measured."""
    gen = torch.Generator().manual_seed(seed)
    bank = torch.randn(cfg.n_layers, 8 * max(ranks), cfg.dim, generator=gen)    # [L, rows, H]
    bank /= math.sqrt(cfg.dim)
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
    reqs = [engine.requests[k] for k in ids]
    done = [r for r in reqs if r.state == State.FINISHED]
    span = max(r.finished_at for r in reqs if r.finished_at is not None) - trace[0]["arrival"]
    decode = [st for st in engine.stats if st.decode]
    mc, elem = engine.model.config, engine.pool.tensor.element_size()
    per_layer_mib = mc.n_layers * elem / 2**20        # MiB per number read in every layer

    def mean(xs):
        return float(np.mean(xs)) if xs else float("nan")
    return {"req/s": len(done) / span, "tok/s": sum(r.n_generated for r in done) / span,
            "latency": mean([r.finished_at - r.arrival for r in done]),
            "ttft": mean([r.first_token_at - r.arrival for r in done]),
            "slo": sum(r.first_token_at - r.arrival <= slo for r in done) / len(reqs),
            "aborted": sum(r.state == State.ABORTED for r in reqs),
            "decode_step": mean([st.seconds for st in decode]),
            "lora_mib": mean([st.lora_numbers * per_layer_mib for st in decode]),
            "kv_mib": mean([st.cached_tokens * 2 * mc.kv_dim * per_layer_mib for st in decode]),
            "steps": len(engine.stats)}


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


def replay_modes(model: Llama, modes: List[str], b: BenchConfig, t: TraceConfig, make_engine, say):
    """The same trace and adapters over each mode; yields (mode, engine, row of the report)."""
    cfg, ranks = model.config, [int(r) for r in t.ranks.split(",")]
    trace = make_trace(t, cfg.vocab_size)
    say(f"base: {b.base or f'random weights, {cfg.n_layers} layers, dim {cfg.dim}'}; "
        f"{len(trace)} requests, {t.adapters} adapters of ranks {ranks}, rate {t.rate}/s, "
        f"cv {t.cv}, alpha {t.alpha}")
    adapters = synthetic_adapters(t.adapters, ranks, cfg, t.seed)
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
    for other in ("merged", "no-unified", "bmm", "base"):
        if other in rows:
            print(f"slora / {other} throughput: {r['req/s'] / rows[other]['req/s']:.2f}x")
    bw = kernels.copy_bandwidth()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    lora, kv, mib = r["lora_mib"] * 2**20, r["kv_mib"] * 2**20, 2**20
    floor = (weights + lora + kv) / bw
    print(f"slora decode step {1000 * r['decode_step']:.0f} ms; bandwidth floor = (weights "
          f"{weights / mib:.0f} MiB + adapters {lora / mib:.0f} MiB + KV cache {kv / mib:.0f} MiB) "
          f"/ copy bandwidth {bw / 2**30:.1f} GiB/s = {1000 * floor:.0f} ms: "
          f"{r['decode_step'] / floor:.1f}x the floor")
    print(f"the adapters a decode step reads are {lora / weights:.2f} of the base weights: at the "
          f"floor a slora step costs {(weights + lora + kv) / (weights + kv):.2f}x a base-model step")


# ------------------------------------------------------------------ one device or several

def _base_model(b: BenchConfig) -> Llama:
    torch.manual_seed(0)   # every device of --tp builds the same model, then keeps its part
    return load_model(b.base)[0] if b.base else Llama(ModelConfig(n_layers=b.layers)).eval()


def benchmark(b: BenchConfig, t: TraceConfig, e: EngineConfig) -> Optional[Dict[str, dict]]:
    """Replay the trace over b.modes and print the report (rank 0 prints it under --tp)."""
    modes = b.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; choose from {list(MODES)}")
    if b.tp > 1:
        try:
            tp.launch(b.tp, _benchmark_on_device, modes, b, t, e)
        except tp.TensorParallelError as err:
            raise SystemExit(f"tensor-parallel benchmark failed: {err}")
        return None
    torch.set_num_threads(b.threads)
    model = _base_model(b)

    def make_engine(mode):
        return ENGINES.get(mode, Engine)(model, None, **asdict(e))   # base: slora without adapters
    if b.repeat < 1:
        raise SystemExit(f"--repeat must be at least 1, got {b.repeat}")
    runs = [{mode: row for mode, _, row in replay_modes(model, modes, b, t, make_engine, print)}
            for _ in range(b.repeat)]
    report(runs[-1], model)
    if b.repeat > 1:
        report_repeats(runs)
    return runs[-1]


def report_repeats(runs: List[Dict[str, dict]]):
    """Arrivals follow the wall clock, so batches differ from run to run: the median and the
    range of each throughput ratio over the repeated replays."""
    for other in ("merged", "no-unified", "bmm", "base"):
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
    model = _base_model(b).to(comm.device)
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


# ------------------------------------------------------------------ against PEFT (--vs-peft)

@dataclass(frozen=True)
class PeftWorkload:
    """--vs-peft: every request submitted at once, greedy, all new tokens generated (no EOS)."""
    requests: int = 48
    adapters: int = 12
    ranks: tuple = (8, 16, 32, 64)          # adapter i has rank ranks[i % 4], on q, k, v, o
    prompt_len: tuple = (16, 64)            # uniform, inclusive
    new_tokens: int = 32
    seed: int = 0


def write_peft_adapters(cfg: ModelConfig, w: PeftWorkload, directory: str) -> Dict[str, str]:
    """Random adapters written by lora.py in PEFT's format: name -> directory. A model shell on
    the meta device gives the module names; only the LoRA weights are real (A ~ N(0, 1/H) and
    B ~ N(0, 1/r), so that each adapter changes the greedy text)."""
    gen, paths = torch.Generator().manual_seed(w.seed), {}
    for i in range(w.adapters):
        lcfg = LoRAConfig(r=w.ranks[i % len(w.ranks)], alpha=16.0,
                          targets=("q_proj", "k_proj", "v_proj", "o_proj"))
        with torch.device("meta"):
            shell = add_lora(Llama(cfg), lcfg)
        for m in lora_layers(shell).values():
            for lin, std in ((m.lora_A, cfg.dim ** -0.5), (m.lora_B, 1 / lcfg.r)):
                lin.to_empty(device="cpu")
                torch.nn.init.normal_(lin.weight, std=std, generator=gen)
        paths[f"adapter-{i}"] = os.path.join(directory, f"adapter-{i}")
        save_adapter(shell, paths[f"adapter-{i}"], lcfg, cfg.name)
    return paths


def _peft_model(hf_dir: str, adapters: Dict[str, str]):
    """transformers' Llama with every adapter loaded by PEFT (imported here: not dependencies)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    (first, path), *rest = adapters.items()
    peft_model = PeftModel.from_pretrained(hf, path, adapter_name=first)
    for name, path in rest:
        peft_model.load_adapter(path, adapter_name=name)
    return peft_model.eval()


def _peft_generate(peft_model, prompts: List[List[int]], names: List[str], new_tokens: int):
    """PEFT's mixed-adapter batch: prompts left-padded to the longest, adapter_names per row."""
    T0 = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (T0 - len(p)) + p for p in prompts])                     # [B, T0]
    mask = torch.tensor([[0] * (T0 - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = peft_model.generate(input_ids=ids, attention_mask=mask, adapter_names=names,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, pad_token_id=0)
    return out[:, T0:].tolist()


def vs_peft(b: BenchConfig, e: EngineConfig):
    """The engine against PEFT's own mixed-adapter generate: same weights (save_hf), same PEFT
    adapter files, same process and threads, each side b.repeat times (at least 2) in
    alternating order; prints the median times, their ratio and how many outputs agree."""
    missing = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"--vs-peft needs transformers and peft, which are not dependencies of "
                         f"this project; missing here: {', '.join(missing)}")
    torch.set_num_threads(b.threads)
    w, (model, _) = PeftWorkload(), load_model(b.base or default_model_path())
    rng = np.random.default_rng(w.seed)
    prompts = [rng.integers(0, model.config.vocab_size, rng.integers(w.prompt_len[0],
                                                                     w.prompt_len[1] + 1)).tolist()
               for _ in range(w.requests)]
    names = [f"adapter-{i % w.adapters}" for i in range(w.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, os.path.join(tmp, "base"))
        paths = write_peft_adapters(model.config, w, tmp)
        peft_model = _peft_model(os.path.join(tmp, "base"), paths)
        engine = Engine(model, None, **asdict(e))
        for name, path in paths.items():
            engine.add_adapter(name, path)
        sides = {"engine": lambda: engine.generate(prompts, names, w.new_tokens),
                 "peft": lambda: _peft_generate(peft_model, prompts, names, w.new_tokens)}
        times, outputs = {"engine": [], "peft": []}, {}
        for k in range(max(2, b.repeat)):
            for side in (("engine", "peft") if k % 2 == 0 else ("peft", "engine")):
                start = time.perf_counter()
                outputs[side] = sides[side]()
                times[side].append(time.perf_counter() - start)
    _report_vs_peft(w, times, outputs)


def _report_vs_peft(w: PeftWorkload, times: Dict[str, List[float]], outputs: Dict[str, list]):
    med = {side: float(np.median(t)) for side, t in times.items()}
    same = sum(a == p for a, p in zip(outputs["engine"], outputs["peft"]))
    print(f"{w.requests} requests over {w.adapters} adapters (ranks {list(w.ranks)}, q,k,v,o), "
          f"prompts of {w.prompt_len[0]}-{w.prompt_len[1]} tokens, {w.new_tokens} new tokens, "
          f"greedy, {torch.get_num_threads()} thread(s), medians of {len(times['engine'])}")
    for side in ("peft", "engine"):
        print(f"{side:>7}: {med[side]:.2f} s  (runs: {', '.join(f'{t:.2f}' for t in times[side])})")
    print(f"engine / PEFT speed: {med['peft'] / med['engine']:.2f}x; outputs identical: "
          f"{same}/{w.requests}")


# ------------------------------------------------------------------ the HTTP server

def serve_http(s: ServerConfig, b: BenchConfig, e: EngineConfig):
    """Load the base model and the adapters, serve them over HTTP until Ctrl-C, then stop
    cleanly: running requests get a few seconds to finish, the others end with the reason."""
    torch.set_num_threads(b.threads)
    path = b.base or default_model_path()
    model, tok = load_model(path)
    base_id = os.path.basename(os.path.normpath(path)).split(".")[0]  # SmolLM2-135M-Instruct
    engine = Engine(model, tok.eos_id, **asdict(e))
    try:
        for name, adapter_path in (kv.split("=", 1) for kv in b.adapter):
            engine.add_adapter(name, adapter_path)
        httpd = server.start_server(engine, tok, base_id, s.host, s.port)
    except (AdapterError, OSError, ValueError) as err:
        raise SystemExit(f"serve.py: {err}")
    print(f"serving at http://{s.host}:{httpd.server_address[1]}/v1 (Ctrl-C stops): base model "
          f"{base_id!r}, adapters {engine.adapter_names()}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down: running requests get 5 s to finish", flush=True)
        server.stop_server(httpd, grace_s=5.0)


if __name__ == "__main__":
    try:
        trace_cfg, bench_cfg, engine_cfg, server_cfg = cli.parse(
            [TraceConfig, BenchConfig, EngineConfig, ServerConfig],
            "Serve LoRA adapters over HTTP (--port), or replay an S-LoRA trace over serving modes.")
    except ValueError as e:   # a config that checks itself (EngineConfig) refused a flag
        raise SystemExit(f"serve.py: {e}")
    if server_cfg.port is not None:
        serve_http(server_cfg, bench_cfg, engine_cfg)
    elif bench_cfg.vs_peft:
        vs_peft(bench_cfg, engine_cfg)
    else:
        benchmark(bench_cfg, trace_cfg, engine_cfg)
