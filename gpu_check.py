"""One prepared check on a GPU: S-LoRA's kernels, its serving experiment and LoRA training.

Runs the project's own functions on one CUDA device and writes one markdown report (--out), line
by line; each part is bounded in time, and a part that fails or runs out of time writes why
before the next part runs:
  (a) every Triton kernel of kernels.py against its plain-PyTorch reference, float32 and bfloat16,
      float adapter rows and int8 ones (quant.py)
  (b) S-LoRA's decode shape (Sheng et al. 2023, section 5: H = 4096, 256 tokens, 100 adapters of
      ranks 8-64 on shuffled pages): shrink and expand in GB/s against a device-to-device copy,
      and the LoRA part against the base GEMM of the same tokens, x W [N, H] x [H, H]
  (b) goals: shrink + expand >= 70% of copy bandwidth; LoRA <= 1/3 of the base GEMM's time
  (b) the same with int8 adapter rows: a quarter of the adapter bytes, and their GB/s
  (c) serve.py's experiment (section 7) on SmolLM2-135M's shape in bfloat16, with 5, 100 and 1000
      adapters, every mode; goal: slora with 1000 adapters >= 90% of its throughput with 5, and
      slora-int8 (int8 adapter rows) >= 85%
  (d) a LoRA training step against a full fine-tuning step (trainer.py, bfloat16 autocast): LoRA
      trains fewer parameters and keeps no optimizer state for the frozen ones (Hu et al. 2021,
      section 4.2)
  (e) 4 adapters of batch 2 trained in one batch against one after another (multi_train.bench)
Kernel times on a GPU: triton.testing.do_bench, the median of CUDA-event timings with the L2
cache flushed before each call (the H200's 60 MB of L2 would otherwise hold the adapters).
Simplified: random weights of SmolLM2-135M's exact shape unless $LORA_MODEL_PATH names the model
file (requests run to their length without an end token, so throughput does not depend on the
weight values); one short trace per adapter count; a part is stopped by SIGALRM.
Demo: `python gpu_check.py` on a GPU (under 10 minutes on an H100 or H200); on a CPU,
`TRITON_INTERPRET=1 python gpu_check.py --device cpu --small` (tiny sizes, Triton's interpreter).
Letters: N tokens, H model dim, P pool pages, nh query heads, nkv KV heads, D head dim.
"""
import copy
import math
import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import triton
import triton.testing

import cli
import attention
import kernel_bench
import kernels
import multi_train
import serve
import trainer
from checkpoints import load_model, placement
from engine import EngineConfig
from model import Llama, ModelConfig
from quant import quantize_rows

flag = cli.flag
MODES = ("slora", "slora-int8", "no-unified", "bmm", "base", "merged")   # merged rewrites weights
FEW = ("slora", "slora-int8")                             # the modes also run with 5 adapters
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}    # max |kernel - reference| / max |ref|


@dataclass
class CheckConfig:
    out: str = flag("gpu_check.md", "the markdown report, written line by line")
    device: str = flag("cuda", "cuda; or cpu with --small (the kernels need TRITON_INTERPRET=1)")
    small: bool = flag(False, "tiny sizes: the whole check in seconds on a CPU (tests this script)")
    parts: str = flag("a,b,c,d,e", "the parts to run, comma separated")
    limits: str = flag("a=90,b=45,c=300,d=45,e=60", "seconds each part may run before it stops")
    mode_seconds: float = flag(22.0, "(c): seconds one mode's replay may run before it is stopped")


@dataclass(frozen=True)
class Sizes:
    """What each part runs: S-LoRA's decode shape and SmolLM2's shape, or tiny ones (--small)."""
    lora: kernel_bench.BenchConfig      # (a): a random step for shrink and expand
    heads: tuple                   # (a): attention shapes (nh, nkv, D)
    kv_lens: tuple                 # (a): cached tokens of each request
    decode: kernel_bench.BenchConfig    # (b)
    model: ModelConfig             # (c), (d)
    adapters: tuple                # (c): adapter counts; the first is slora's reference alone
    trace: dict                    # (c): serve.TraceConfig fields besides adapters
    pool_pages: int                # (c)
    batch: tuple                   # (d): (rows, tokens per row)
    real_model: bool               # (c): serve $LORA_MODEL_PATH's model when it is set


GPU = Sizes(lora=kernel_bench.BenchConfig(hidden=1024, tokens=96, adapters=20),
            heads=((9, 3, 64), (8, 2, 32), (32, 8, 128), (4, 4, 16)), kv_lens=(1, 37, 300),
            decode=kernel_bench.BenchConfig(hidden=4096, tokens=256, adapters=100),
            model=ModelConfig(), adapters=(5, 100, 1000),
            trace=dict(rate=400.0, duration=1.0, input_len="8,32", output_len="8,32"),
            pool_pages=60000, batch=(8, 128), real_model=True)
SMALL = Sizes(lora=kernel_bench.BenchConfig(hidden=40, tokens=12, adapters=3, ranks="2,4",
                                            prefill_len=5),
              heads=((6, 2, 8),), kv_lens=(1, 7),
              decode=kernel_bench.BenchConfig(hidden=128, tokens=16, adapters=5, ranks="4,8"),
              model=ModelConfig.tiny(), adapters=(2, 4, 8),
              trace=dict(rate=100.0, duration=0.04, input_len="2,4", output_len="2,3"),
              pool_pages=800, batch=(2, 16), real_model=False)


class TimeLimit(Exception):
    """A part or a mode ran past its seconds."""


@contextmanager
def time_limit(seconds: float):
    """TimeLimit raised inside the block after `seconds` (SIGALRM, main thread). Inside another
    time_limit the sooner of the two ends the block, and the outer one runs on afterwards."""
    outer = signal.getitimer(signal.ITIMER_REAL)[0]        # seconds left of an enclosing one, or 0
    start = time.monotonic()

    def ring(signum, frame):
        raise TimeLimit(f"past its {seconds:g} s limit")
    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer) if outer else seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3))


class Report:
    """The markdown report, appended to and flushed line by line: a run cut short keeps all it
    measured. Each line is printed too."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "w"):
            pass

    def __call__(self, line: str = ""):
        with open(self.path, "a") as f:
            f.write(line + "\n")
        print(line, flush=True)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def seconds(fn, device: torch.device) -> tuple:
    """(median seconds of one call of fn, how it was timed)."""
    if device.type != "cuda":
        return kernel_bench.seconds(fn, 5, device), "wall clock"
    return triton.testing.do_bench(fn, rep=50, return_mode="median") / 1e3, "CUDA events, L2 flushed"


# ------------------------------------------------------------------ (a) kernels against references

def lora_pairs(cfg: kernel_bench.BenchConfig, device, dtype):
    """(what, kernel output, reference output) of shrink and expand on one random step of
    cfg.shape, expand to the pool width and to a third of it (k_proj, v_proj under GQA), or to
    cfg.out_dim; rows wider than a page (cfg.in_dim, cfg.out_dim) span several pages."""
    x, pool_l, _, _, plan = kernel_bench.random_step(cfg, device, dtype)
    z = kernels.lora_shrink_ref(x, pool_l, plan)                           # [N, Rm] float32
    yield (f"shrink {cfg.shape}, I={x.shape[1]}", kernels.lora_shrink(x, pool_l, plan, use_triton=True),
           z)
    for out_dim in (cfg.out_dim,) if cfg.out_dim else (cfg.hidden, cfg.hidden // 3):
        yield (f"expand {cfg.shape}, O={out_dim}",
               kernels.lora_expand(z, pool_l, plan, out_dim, use_triton=True),
               kernels.lora_expand_ref(z, pool_l, plan, out_dim))


def int8_pairs(cfg: kernel_bench.BenchConfig, device, dtype):
    """lora_pairs on the pool's rows quantized (quant.quantize_rows): the INT8 kernels."""
    x, pool_l, _, _, plan = kernel_bench.random_step(cfg, device, dtype)
    q, scale = quantize_rows(pool_l)                              # [P, H] int8, [P] float32
    z = kernels.lora_shrink_ref(x, q, plan, scale)
    yield (f"shrink {cfg.shape}, I={x.shape[1]}, int8 rows",
           kernels.lora_shrink(x, q, plan, row_scale=scale, use_triton=True), z)
    out_dim = cfg.out_dim or cfg.hidden
    yield (f"expand {cfg.shape}, O={out_dim}, int8 rows",
           kernels.lora_expand(z, q, plan, out_dim, row_scale=scale, dtype=dtype, use_triton=True),
           kernels.lora_expand_ref(z, q, plan, out_dim, scale, dtype))


def attention_pairs(nh, nkv, D, lens, device, dtype):
    """(what, kernel output, reference output) of paged attention over random pages: decode (a
    query per request at its last position) and prefill (the last 4 tokens of each request)."""
    g = torch.Generator().manual_seed(nh * D)
    per_page, blocks = nh // nkv, max(math.ceil(n / (nh // nkv)) for n in lens)   # tokens a page
    P = 2 * blocks * len(lens) + 7
    pool_l = torch.randn(P, nh * D, generator=g).to(device, dtype)                   # [P, H]
    table = torch.randperm(P, generator=g)[:2 * blocks * len(lens)]
    table = table.view(len(lens), blocks, 2).int().to(device)                       # [R, MB, 2]
    q = torch.randn(len(lens), nh, D, generator=g).to(device, dtype)                # [R, nh, D]
    dec = (q, pool_l, table, torch.tensor(lens, dtype=torch.int32, device=device), nkv)
    what = f"nh={nh} nkv={nkv} D={D}, g={per_page}"
    yield (f"attention decode, {what}", attention.paged_attention_decode(*dec, use_triton=True),
           attention.paged_attention_decode_ref(*dec))
    rows = [(r, p) for r, n in enumerate(lens) for p in range(max(0, n - 4), n)]
    seq_ids, positions = (torch.tensor(c, dtype=torch.int32, device=device) for c in zip(*rows))
    qp = torch.randn(len(rows), nh, D, generator=g).to(device, dtype)               # [N, nh, D]
    pre = (qp, pool_l, table, seq_ids, positions, nkv)
    yield (f"attention prefill, {what}", attention.paged_attention_prefill(*pre, use_triton=True),
           attention.paged_attention_prefill_ref(*pre))


def part_a(s: Sizes, device, cfg: CheckConfig, write):
    """Every kernel (each tile variant the engine launches) against its reference."""
    write("| kernel | dtype | max abs diff | max abs reference | relative | tolerance | result |")
    write("| --- | --- | --- | --- | --- | --- | --- |")
    results = []
    for dtype in TOLERANCE:
        F = s.lora.hidden * 8 // 3                      # an ffn_dim: gate/up/down rows on 3 pages
        cases = [pair for shape in ("decode", "prefill") for wide in ({}, {"in_dim": F}, {"out_dim": F})
                 for pairs in (lora_pairs, int8_pairs)
                 for pair in pairs(replace(s.lora, shape=shape, **wide), device, dtype)]
        cases += [pair for heads in s.heads for pair in attention_pairs(*heads, s.kv_lens, device,
                                                                         dtype)]
        for what, got, want in cases:
            diff = (got.float() - want.float()).abs().max().item()
            scale = max(want.float().abs().max().item(), 1e-6)
            results.append(diff / scale <= TOLERANCE[dtype])
            write(f"| {what} | {str(dtype)[6:]} | {diff:.2e} | {scale:.2e} | {diff / scale:.1e} "
                  f"| {TOLERANCE[dtype]:.0e} | {verdict(results[-1])} |")
    write(f"\n{sum(results)} of {len(results)} kernel runs within tolerance: {verdict(all(results))}")


# ------------------------------------------------------------------ (b) the decode shape

def part_b(s: Sizes, device, cfg: CheckConfig, write):
    """Shrink, expand and both at S-LoRA's decode shape in bfloat16: the bytes each must move at
    least (x, each used adapter's rows once, z, the output) over its time, against a copy."""
    c = s.decode
    x, pool_l, tables, slots, plan = kernel_bench.random_step(c, device, torch.bfloat16)
    N, H, e = c.tokens, c.hidden, x.element_size()
    used = int(tables[3][slots.unique()].sum())              # rows of A (and of B^T) read
    z_bytes = N * plan.max_rank * 4                          # z [N, Rm] float32
    z = kernels.lora_shrink(x, pool_l, plan)
    W = (torch.randn(H, H, generator=torch.Generator().manual_seed(1)) / H ** 0.5).to(device, x.dtype)
    shrink_bytes, expand_bytes = e * (N + used) * H + z_bytes, z_bytes + e * (used + N) * H
    q, scale = quantize_rows(pool_l)                 # int8 rows: 1 byte a number, 4 a row
    int8_bytes = 2 * (e * N * H + z_bytes + used * (H + 4))
    timed = {"shrink (x A^T)": (lambda: kernels.lora_shrink(x, pool_l, plan), shrink_bytes),
             "expand (z B^T)": (lambda: kernels.lora_expand(z, pool_l, plan, H), expand_bytes),
             "shrink + expand (lora_apply)": (lambda: kernels.lora_apply(x, pool_l, plan, H),
                                              shrink_bytes + expand_bytes),
             "shrink + expand, int8 rows": (
                 lambda: kernels.lora_apply(x, q, plan, H, row_scale=scale), int8_bytes),
             "base GEMM x W [N,H]x[H,H]": (lambda: x @ W, e * (2 * N * H + H * H))}
    copy = kernel_bench.copy_bandwidth(device)
    write(f"N={N} tokens, H={H}, {c.adapters} adapters of ranks {c.ranks} on shuffled pages "
          f"({len(slots.unique())} used, {used} rows of A), bfloat16; device-to-device copy "
          f"{copy / 1e9:.0f} GB/s (bytes read + written)\n")
    write("| variant | time (us) | timed by | bytes moved (MB) | GB/s | of copy bandwidth |")
    write("| --- | --- | --- | --- | --- | --- |")
    sec = {}
    for what, (fn, nbytes) in timed.items():
        sec[what], how = seconds(fn, device)
        write(f"| {what} | {sec[what] * 1e6:.1f} | {how} | {nbytes / 1e6:.3g} | "
              f"{nbytes / sec[what] / 1e9:.0f} | {nbytes / sec[what] / copy:.2f} |")
    lora, base = sec["shrink + expand (lora_apply)"], sec["base GEMM x W [N,H]x[H,H]"]
    share = (shrink_bytes + expand_bytes) / lora / copy
    write(f"\nshrink + expand at {share:.2f} of copy bandwidth (goal >= 0.70): {verdict(share >= 0.7)}")
    write(f"LoRA / base GEMM time {lora / base:.2f} (goal <= 0.33): {verdict(lora / base <= 1 / 3)}")


# ------------------------------------------------------------------ (c) the serving experiment

def serving_model(s: Sizes, device) -> tuple:
    """(the base model in bfloat16 on device, what it is): $LORA_MODEL_PATH's file where it
    exists and s.real_model, else random weights of s.model's shape."""
    path = os.environ.get("LORA_MODEL_PATH")
    torch.manual_seed(0)
    if s.real_model and path and os.path.exists(path):
        return load_model(path, "bfloat16")[0].to(device), path
    model = Llama(s.model).to(device, torch.bfloat16).eval()
    shape = "SmolLM2-135M's shape" if s.model == ModelConfig() else "a tiny shape"
    return model, (f"random weights of {shape} ({s.model.n_layers} layers, dim {s.model.dim}, "
                   f"vocabulary {s.model.vocab_size})")


def replay_one(model, mode: str, n_adapters: int, s: Sizes, device, limit: float) -> dict:
    """serve.py's replay of one mode with n_adapters synthetic adapters, bounded by `limit`
    seconds. merged rewrites the weights it serves, so it gets its own copy of the model."""
    t = serve.TraceConfig(adapters=n_adapters, **s.trace)
    b = serve.BenchConfig(modes=mode, device=device.type, dtype="bfloat16")
    e = EngineConfig(pool_pages=s.pool_pages)
    served = copy.deepcopy(model) if mode == "merged" else model
    make_engine = lambda m: serve.engine_for(m, served, e)   # noqa: E731
    with time_limit(limit):
        (_, engine, row), = serve.replay_modes(served, [mode], b, t, make_engine, lambda *a, **k: None)
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def part_c(s: Sizes, device, cfg: CheckConfig, write):
    """Every mode with 100 and 1000 adapters (slora alone with 5, the reference of the goal)."""
    model, what = serving_model(s, device)
    t = serve.TraceConfig(**s.trace)
    write(f"base: {what}, bfloat16; each trace {round(t.rate * t.duration)} requests arriving at "
          f"{t.rate:.0f}/s (cv {t.cv}), prompts {t.input_len} and outputs {t.output_len} tokens, "
          f"adapters of ranks {t.ranks}, pool {s.pool_pages} pages; no end token: every request "
          f"runs to its length, so throughput does not depend on the weight values\n")
    write("| adapters | mode | req/s | tok/s | avg latency (s) | avg first token (s) | aborted "
          "| decode step (ms) |")
    write("| --- | --- | --- | --- | --- | --- | --- | --- |")
    slora = {}
    for n in s.adapters:
        for mode in FEW if n == s.adapters[0] else MODES:
            try:
                r = replay_one(model, mode, n, s, device, cfg.mode_seconds)
            except TimeLimit as err:
                write(f"| {n} | {mode} | stopped: {err} | | | | | |")
                continue
            if mode in FEW:
                slora[mode, n] = r["req/s"]
            write(f"| {n} | {mode} | {r['req/s']:.2f} | {r['tok/s']:.0f} | {r['latency']:.2f} | "
                  f"{r['ttft']:.2f} | {r['aborted']} | {1000 * r['decode_step']:.1f} |")
    few, many = s.adapters[0], s.adapters[-1]
    for mode, goal in zip(FEW, (0.90, 0.85)):
        if slora.get((mode, few)) and slora.get((mode, many)):
            ratio = slora[mode, many] / slora[mode, few]
            write(f"\n{mode} with {many} adapters: {ratio:.2f} of its throughput with {few} "
                  f"(goal >= {goal:.2f}): {verdict(ratio >= goal)}")


# ------------------------------------------------------------------ (d) a training step

def step_seconds(net, cfg: trainer.LoopConfig, micro, device, repeats: int = 5) -> tuple:
    """(median seconds of trainer.train_step after 2 warm-up steps, its last loss)."""
    opt, times = trainer.make_optimizer(net, cfg), []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in range(2 + repeats):
        sync()
        start = time.perf_counter()
        loss, _ = trainer.train_step(net, opt, micro, step, cfg)
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times[2:])[repeats // 2], loss


def part_d(s: Sizes, device, cfg: CheckConfig, write):
    """trainer.py's optimizer step, LoRA (r=4 on q, v, the paper's E2E setting) against full
    fine-tuning, on the same batch of random tokens, float32 weights; bfloat16 autocast on a GPU
    (float32 on a CPU, where autocast only slows the tiny model down)."""
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    torch.manual_seed(0)
    model = Llama(s.model).to(device)
    B, T = s.batch
    tokens = torch.randint(0, s.model.vocab_size, (B, T))                       # [B, T]
    mask = torch.zeros(B, T - 1, dtype=torch.bool)
    mask[:, T // 2:] = True                                                    # the second half
    micro = [(tokens, mask, B * T)]
    write(f"batch {B} x {T} tokens (targets: the second half of each row), "
          f"{'bfloat16 autocast' if dtype == 'bfloat16' else 'float32'}, "
          f"AdamW; {s.model.n_layers} layers, dim {s.model.dim}\n")
    write("| method | trainable parameters | step (ms) | peak memory (MiB) | loss |")
    write("| --- | --- | --- | --- | --- |")
    sec = {}
    for method in ("lora", "full"):
        tcfg = trainer.LoopConfig(method=method, dtype=dtype, warmup=0, lr=2e-4, steps=100,
                                  batch_size=B)
        net, _ = trainer.prepare(copy.deepcopy(model), tcfg)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sec[method], loss = step_seconds(net.train(), tcfg, micro, device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else math.nan
        trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
        write(f"| {method} | {trainable:,} | {sec[method] * 1e3:.1f} | {peak:.0f} | {loss:.3f} |")
        del net
    write(f"\nLoRA step / full fine-tuning step: {sec['lora'] / sec['full']:.2f}")


def part_e(s: Sizes, device, cfg: CheckConfig, write):
    """multi_train.bench: 4 adapters (r=4 on q, v) of 2 rows each in one joint step against 4
    steps of one adapter each, and the frozen base's share; bfloat16 autocast on a GPU."""
    torch.manual_seed(0)
    model = Llama(s.model).to(device)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    tcfg = trainer.LoopConfig(batch_size=2, dtype=dtype)
    med = multi_train.bench(model, 4, tcfg, repeat=1 if cfg.small else 3,
                            steps=1 if cfg.small else 5, log=lambda line: None)
    write(f"4 adapters x 2 rows of 40-60 tokens, {tcfg.dtype}, AdamW; medians\n")
    write("| variant | optimizer step (ms) |")
    write("| --- | --- |")
    for k in ("together", "one after another", "frozen base only"):
        write(f"| {k} | {med[k] * 1e3:.1f} |")
    write(f"\ntogether / one after another: {med['speedup']:.2f}x; the frozen base's forward and "
          f"backward: {100 * med['frozen base only'] / med['together']:.0f}% of the joint step")


# ------------------------------------------------------------------ the report

PARTS = {"a": ("(a) Every kernel against its reference", part_a),
         "b": ("(b) Shrink and expand at the decode shape", part_b),
         "c": ("(c) Serving benchmark, 5, 100 and 1000 adapters", part_c),
         "d": ("(d) A LoRA training step against a full fine-tuning step", part_d),
         "e": ("(e) Four adapters trained in one batch against one after another", part_e)}


def header(cfg: CheckConfig, device, write):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    write("# GPU check: kernels, serving, training\n")
    write(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {name}; torch {torch.__version__}"
          f" (CUDA {torch.version.cuda}), triton {triton.__version__}"
          f"{', TRITON_INTERPRET=1' if kernels._INTERPRETED else ''}; sizes: "
          f"{'--small (tiny, a test of this script)' if cfg.small else 'full'}; command: "
          f"`python {' '.join(sys.argv)}`")


def run_part(key: str, s: Sizes, device, cfg: CheckConfig, limit: float, write):
    """One part under its time limit; an error or the limit is written, and the check goes on."""
    title, fn = PARTS[key]
    write(f"\n## {title}\n")
    start = time.monotonic()
    try:
        with time_limit(limit):
            fn(s, device, cfg, write)
    except TimeLimit as err:
        write(f"\n**stopped**: {err}")
    except Exception as err:     # the report says what failed; the next part still runs
        tail = traceback.format_exc().strip().splitlines()[-6:]
        write(f"\n**failed**: {type(err).__name__}: {err}\n\n```\n" + "\n".join(tail) + "\n```")
    write(f"\n({time.monotonic() - start:.1f} s)")


def main(cfg: CheckConfig):
    try:
        device, _ = placement(cfg.device, "bfloat16")
    except ValueError as err:
        raise SystemExit(f"gpu_check.py: {err}")
    try:
        limits = {k: float(v) for k, v in (kv.split("=") for kv in cfg.limits.split(","))}
    except ValueError:
        raise SystemExit(f"gpu_check.py: --limits {cfg.limits!r}: expected part=seconds pairs, "
                         "comma separated, such as a=90,b=45,c=300,d=45,e=60")
    parts = cfg.parts.split(",")
    unknown = [p for p in parts if p not in PARTS or p not in limits]
    if unknown:
        raise SystemExit(f"gpu_check.py: parts {unknown} unknown or without a --limits entry; "
                         f"parts are {list(PARTS)}")
    if device.type == "cpu" and not cfg.small:
        raise SystemExit("gpu_check.py: --device cpu runs with --small only (the full sizes through "
                         "the references and the interpreter would take hours)")
    if device.type == "cpu":
        torch.set_num_threads(1)   # tiny matrices: a second thread costs more than it saves
    write = Report(cfg.out)
    header(cfg, device, write)
    for key in parts:
        run_part(key, SMALL if cfg.small else GPU, device, cfg, limits[key], write)


if __name__ == "__main__":
    main(*cli.parse([CheckConfig], "The kernels, serving and training on a GPU, in one report."))
