"""The HTTP front end priced against the engine in process (S-LoRA's serving, Sheng et al. 2023,
section 7, behind the OpenAI-compatible API of server.py).

Two benchmarks, each run side by side in one process:
    the trace   serve.py's trace replayed by slora in process, then through server.py on an
                ephemeral port of 127.0.0.1, each request a streaming client thread started at its
                arrival time (greedy, the prompt as token ids, adapters by name): throughput, first
                token and time per token of both, and whether the streamed tokens are the same.
    --long N    one greedy N-token completion alone, in process and streamed: time per token over
                tokens 2-101 against the last 100 (the server decodes text incrementally, so what
                it adds per token should not grow with the output).
Simplified: the random base model has no vocabulary; TokenIdText writes id t as the text " t".
Demo: `python http_bench.py --adapters 100 --layers 4 --rate 16 --duration 4`;
`python http_bench.py --long 1000 --layers 4`.
"""
import http.client
import json
import threading
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

import cli
import server
from engine import Engine, EngineConfig
from model import Llama
from scheduler import State
from serve import (BenchConfig, TraceConfig, base_model, make_trace, register_adapters,
                   replay_modes, synthetic_adapters)


@dataclass
class HttpBenchConfig:
    long: int = cli.flag(0, "instead of the trace: one greedy completion of this many tokens (>= 101) "
                            "in process and streamed; time per token, first 100 against last 100")


class TokenIdText:
    """The HTTP benchmark's tokenizer for a random base model (which has no vocabulary): id t is
    the text " t", so a client reads the ids back from the streamed text. No id ends a request
    (eos_id is past the vocabulary), as with the in-process replay's eos None."""
    special: Dict[str, int] = {}

    def __init__(self, vocab_size: int):
        self.eos_id = vocab_size

    def decode(self, ids) -> str:
        return "".join(f" {t}" for t in ids)


Timed = Tuple[float, float, float, List[int]]   # (arrival, first token, end) in s, token ids


def stream_one(port: int, body: dict, t0: float) -> Optional[Timed]:
    """One streamed /v1/completions request to 127.0.0.1:port (http.client, Server-Sent Events);
    its times since t0, or None if it did not finish."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json"})
        resp, first, ids = conn.getresponse(), None, []
        for line in resp:
            if line.startswith(b"data: [DONE]") or not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return None
            if event["choices"][0]["text"]:
                first = time.perf_counter() - t0 if first is None else first
                ids += [int(t) for t in event["choices"][0]["text"].split()]
        return (0.0, first, time.perf_counter() - t0, ids) if resp.status == 200 and ids else None
    finally:
        conn.close()


def replay_http(port: int, trace: List[dict], names: List[Optional[str]],
                base_id: str) -> List[Optional[Timed]]:
    """Each request of the trace from a client thread of its own, started at its arrival time
    (wall clock), greedy, the prompt as token ids; as `replay` does in process."""
    results: List[Optional[Timed]] = [None] * len(trace)

    def client(i, r, name):
        body = {"model": name or base_id, "prompt": r["prompt"], "max_tokens": r["max_new_tokens"],
                "temperature": 0}
        timed = stream_one(port, body, t0)
        results[i] = None if timed is None else (r["arrival"], *timed[1:])
    t0, threads = time.perf_counter(), []
    for i, (r, name) in enumerate(zip(trace, names)):
        time.sleep(max(0.0, r["arrival"] - (time.perf_counter() - t0)))
        threads.append(threading.Thread(target=client, args=(i, r, name), daemon=True))
        threads[-1].start()
    for th in threads:
        th.join()
    return results


def latency_row(timed: List[Optional[Timed]], engine: Engine) -> dict:
    """req/s as `replay` counts it; first token (median, p90) and time per output token after the
    first, (end - first) / (n - 1), median over requests; the engine's median decode step."""
    done = [x for x in timed if x is not None]
    decode = [st.seconds for st in engine.stats if st.decode]
    span = max(end for _, _, end, _ in done) - min(a for a, _, _, _ in done)
    ttft = [first - arrival for arrival, first, _, _ in done]
    tpot = [(end - first) / (len(ids) - 1) for _, first, end, ids in done if len(ids) > 1]
    return {"req/s": len(done) / span, "ttft_p50": float(np.median(ttft)),
            "ttft_p90": float(np.percentile(ttft, 90)), "tpot_p50": float(np.median(tpot)),
            "decode_step": float(np.median(decode)), "failed": len(timed) - len(done)}


def in_process(model: Llama, b: BenchConfig, t: TraceConfig, e: EngineConfig):
    """slora in process (replay_modes); (latency row, each request's tokens, or None)."""
    def make_engine(mode):
        return Engine(model, None, **asdict(e))
    (_, engine, _), = replay_modes(model, ["slora"], b, t, make_engine, print)
    reqs = [engine.records[i].request for i in sorted(engine.records)]   # in trace order
    timed = [(r.arrival, r.first_token_at, r.finished_at, engine.records[r.id].output())
             if r.state == State.FINISHED else None for r in reqs]
    return latency_row(timed, engine), [None if x is None else x[3] for x in timed]


def over_http(model: Llama, b: BenchConfig, t: TraceConfig, e: EngineConfig):
    """The same trace and adapters (synthetic ones registered in the served engine, so reachable
    by name) through server.py; (latency row, each request's streamed tokens, or None)."""
    trace = make_trace(t, model.config.vocab_size)
    engine = Engine(model, None, **asdict(e))
    adapters = synthetic_adapters(t.adapters, [int(r) for r in t.ranks.split(",")], model.config,
                                  t.seed)
    names = register_adapters(engine, "slora", trace, adapters,
                              dict(kv.split("=", 1) for kv in b.adapter))
    httpd = server.start_server(engine, TokenIdText(model.config.vocab_size), "base", port=0)
    try:
        timed = replay_http(httpd.server_address[1], trace, names, "base")
    finally:
        server.stop_server(httpd, grace_s=1.0)
    return latency_row(timed, engine), [None if x is None else x[3] for x in timed]


def token_times(port: int, body: dict) -> List[float]:
    """When each token of one streamed completion arrived (s since the request was sent)."""
    conn, t0, times = http.client.HTTPConnection("127.0.0.1", port, timeout=600), time.perf_counter(), []
    try:
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                     {"Content-Type": "application/json"})
        for line in conn.getresponse():
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                times += [time.perf_counter() - t0] * len(event["choices"][0]["text"].split())
    finally:
        conn.close()
    return times


def long_completion(b: BenchConfig, e: EngineConfig, n: int) -> Dict[str, Tuple[float, float]]:
    """One greedy n-token completion, alone: seconds per token over tokens 2-101 and over the
    last 100, in process (the engine's steps) and streamed through server.py. The engine's own
    ratio includes attention over a longer cache; what the server adds is the difference."""
    torch.set_num_threads(b.threads)
    model, prompt = base_model(b), list(range(8))
    engine = Engine(model, None, **asdict(e))
    engine.generate([prompt], [None], n)
    steps = [st.seconds for st in engine.stats]                 # one token per step
    rows = {"in process": (sum(steps[1:101]) / 100, sum(steps[-100:]) / 100)}
    httpd = server.start_server(Engine(model, None, **asdict(e)),
                                TokenIdText(model.config.vocab_size), "base", port=0)
    try:
        at = token_times(httpd.server_address[1], {"model": "base", "prompt": prompt,
                                                   "max_tokens": n, "temperature": 0})
    finally:
        server.stop_server(httpd, grace_s=1.0)
    assert len(at) == n, f"the stream carried {len(at)} of {n} tokens"
    rows["http"] = ((at[100] - at[0]) / 100, (at[-1] - at[-101]) / 100)
    for mode, (first, last) in rows.items():
        print(f"{mode:10s} {n} tokens: first 100 {1000 * first:.1f} ms/token, last 100 "
              f"{1000 * last:.1f} ms/token, last / first {last / first:.3f}", flush=True)
    return rows


def http_benchmark(b: BenchConfig, t: TraceConfig, e: EngineConfig) -> List[Dict[str, dict]]:
    """slora in process, then over HTTP, --repeat times in one process; the median ratio of their
    throughputs is the cost of the HTTP front end (goal: HTTP >= 0.9x in process)."""
    if b.repeat < 1 or b.tp > 1:
        raise SystemExit("http_bench.py runs on one device (no --tp) with --repeat >= 1")
    torch.set_num_threads(b.threads)
    model, runs = base_model(b), []
    for _ in range(b.repeat):
        local, local_ids = in_process(model, b, t, e)
        served, served_ids = over_http(model, b, t, e)
        same = sum(x is not None and x == y for x, y in zip(local_ids, served_ids))
        print("      http: " + "  ".join(f"{k} {v:.3g}" for k, v in served.items()) +
              f"  (streamed tokens equal to in process: {same} of {len(local_ids)})", flush=True)
        runs.append({"in process": local, "http": served})
    report_http(runs)
    return runs


def report_http(runs: List[Dict[str, dict]]):
    print("\n| run | mode | req/s | first token, median (s) | first token, p90 (s) "
          "| per token, median (ms) | decode step, median (ms) |\n| --- | --- | --- | --- | --- "
          "| --- | --- |")
    for i, rows in enumerate(runs):
        for mode, r in rows.items():
            print(f"| {i + 1} | {mode} | {r['req/s']:.2f} | {r['ttft_p50']:.2f} "
                  f"| {r['ttft_p90']:.2f} | {1000 * r['tpot_p50']:.0f} "
                  f"| {1000 * r['decode_step']:.0f} |")
    ratios = sorted(r["http"]["req/s"] / r["in process"]["req/s"] for r in runs)
    print(f"http / in-process throughput over {len(runs)} runs: median "
          f"{ratios[len(ratios) // 2]:.2f}x, range {ratios[0]:.2f}-{ratios[-1]:.2f}x "
          "(goal: at least 0.90x)")


if __name__ == "__main__":
    try:
        trace_cfg, bench_cfg, engine_cfg, http_cfg = cli.parse(
            [TraceConfig, BenchConfig, EngineConfig, HttpBenchConfig],
            "The HTTP front end (server.py) against the engine in process, on serve.py's trace.")
    except ValueError as e:
        raise SystemExit(f"http_bench.py: {e}")
    if http_cfg.long:
        for _ in range(bench_cfg.repeat):
            long_completion(bench_cfg, engine_cfg, http_cfg.long)
    else:
        http_benchmark(bench_cfg, trace_cfg, engine_cfg)
