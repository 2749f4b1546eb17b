"""Benchmarks of kernels.py: S-LoRA's gathered LoRA against the padded-bmm baseline.

S-LoRA (Sheng et al. 2023, arXiv 2311.03285, section 5) computes each token's LoRA part with A_s
and B_s^T gathered straight from the unified pool's pages; the baseline it improves on first
copies every adapter into zero-padded tensors [S, Rm, I] and [S, Rm, O], then runs torch.bmm
over the padded rank, gathering each token's adapter once more. On one random step (adapters of
mixed ranks on shuffled pages, slot 0 the base model) this times, as medians after a warm-up:
    gathered from pages    kernels.lora_apply (the Triton kernels on a GPU, the reference on a CPU)
                           on the rows as they are, and on the same rows in int8 (quant.py; its
                           difference is the rounding to int8, not an error of the kernels)
    bmm                    the padding copy included, and on weights already padded
    base GEMM              x W [N, I] x [I, O], the projection the LoRA part sits beside
and each variant's largest difference from lora_apply; on a GPU also the bytes lora_apply must
move at least over its time, against the bandwidth of a device-to-device copy (a kernel that
only reads adapter rows and x, and writes y, cannot beat a copy). --compile instead compiles
every LoRA kernel variant for sm_80 and sm_90 with Triton's ptxas (no GPU needed) and prints
registers, spilled bytes and shared memory (`python attention.py`: attention's).
Benchmarks live apart from the ops (as in punica): kernels.py never imports this file;
gpu_check.py reuses random_step and seconds, gpu_check.py and serve.py copy_bandwidth.
Letters: N tokens, H pool width (model dim), I input width, O output width, S adapter slots,
Rm max rank, G segments.
Simplified: random weights and tables; wall-clock timings (gpu_check.py times with CUDA events).
Demo: `python kernel_bench.py --small` (a quick CPU run), `python kernel_bench.py --shape prefill`,
`python kernel_bench.py --hidden 576 --tokens 48 --adapters 1000 --pages in-order` (a SmolLM2
decode step's q_proj, adapters on consecutive pages as in the engine, float and int8 rows),
`python kernel_bench.py --in-dim 1536` (rows wider than a page, as down_proj has), `python
kernel_bench.py --compile`.
"""
import itertools
import time
from dataclasses import dataclass
from typing import Optional

import torch

import cli
import gpu_compile
import kernels
import kernels_train
from quant import quantize_rows


@dataclass
class BenchConfig:
    hidden: int = cli.flag(4096, "H, model dim = page width")
    in_dim: Optional[int] = cli.flag(None, "I, width of A's rows (None: H; down_proj: ffn_dim, "
                                           "rows over several pages)", int)
    out_dim: Optional[int] = cli.flag(None, "O, width of B^T's rows (None: H; gate, up: ffn_dim)",
                                      int)
    tokens: int = cli.flag(256, "N, tokens in the batch")
    adapters: int = cli.flag(100, "adapters resident in the pool")
    ranks: str = cli.flag("8,16,32,64", "ranks to draw from, comma list")
    shape: str = cli.flag("decode", "decode: a token per request (MBGMV); prefill: MBGMM")
    prefill_len: int = cli.flag(64, "tokens per request, prefill shape")
    dtype: str = cli.flag("auto", "float32, float16, bfloat16; auto: float16 on GPU, float32 "
                                  "on CPU")
    repeats: int = cli.flag(5, "timed runs per variant (after a warm-up)")
    threads: int = cli.flag(1, "CPU threads for torch (1: steady timings when shared; 0: all)")
    small: bool = cli.flag(False, "H=1024, 64 tokens, 20 adapters: a quick run on a laptop CPU")
    pages: str = cli.flag("shuffled", "shuffled: adapter rows on pages anywhere; in-order: each "
                                      "adapter's on consecutive pages, as the pool allocates them")
    compile: bool = cli.flag(False, "compile every kernel for sm_80 and sm_90 (no GPU needed), "
                                    "print registers, spilled bytes and shared memory")


def random_step(cfg: BenchConfig, device, dtype):
    """x [N, I]; a pool layer whose adapters (slot 0 = base model) lie on shuffled pages among as
    many free ones; the tables; each token's slot [N] and the step's plan."""
    g = torch.Generator().manual_seed(0)
    choices = torch.tensor([int(r) for r in cfg.ranks.split(",")], dtype=torch.int32)
    ranks = choices[torch.randint(len(choices), (cfg.adapters + 1,), generator=g)]
    ranks[0] = 0
    I, O = cfg.in_dim or cfg.hidden, cfg.out_dim or cfg.hidden
    ca, cb = -(-I // cfg.hidden), -(-O // cfg.hidden)                      # pages per row
    a_start = torch.cumsum((ca + cb) * ranks, 0, dtype=torch.int32) - (ca + cb) * ranks
    pages = 2 * int((ca + cb) * ranks.sum())                            # A rows, then B^T rows
    page_ids = (torch.randperm(pages, generator=g) if cfg.pages == "shuffled"
                else torch.arange(pages))[:pages // 2].int()           # in-order: slices of the pool
    tables = [page_ids, a_start, a_start + ca * ranks,
              ranks, 1.0 + torch.rand(cfg.adapters + 1, generator=g)]
    slots = torch.randint(1, cfg.adapters + 1, (cfg.tokens,), generator=g, dtype=torch.int32)
    if cfg.shape == "prefill":   # requests of prefill_len tokens, one adapter each: segments
        slots = slots[::cfg.prefill_len].repeat_interleave(cfg.prefill_len)[:cfg.tokens]
        seg_adapter, lengths = torch.unique_consecutive(slots, return_counts=True)      # [G]
        segments = kernels.segment_starts(lengths), seg_adapter
    else:                        # decode: sorted by adapter as the engine sorts, one token each
        slots = slots.sort().values
        segments = torch.arange(cfg.tokens + 1, dtype=torch.int32), slots
    x = torch.randn(cfg.tokens, I, generator=g).to(device, dtype)
    pool_l = (torch.randn(pages, cfg.hidden, generator=g) / I ** 0.5).to(device, dtype)
    tables, slots = [t.to(device) for t in tables], slots.to(device)
    plan = kernels.plan_lora(pool_l, *tables, *(s.to(device) for s in segments), int(ranks.max()),
                             per_token=cfg.shape == "decode", a_chunks=ca, b_chunks=cb)  # once
    return x, pool_l, tables, slots, plan


def seconds(fn, repeats, device):
    """Median wall time of `repeats` calls after a warm-up (which compiles Triton kernels)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats + 1):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[repeats // 2]


def copy_bandwidth(device="cpu", nbytes=256 << 20) -> float:
    """Bytes per second of a large tensor copy on `device` (each byte read once, written once)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / seconds(lambda: dst.copy_(src), 5, torch.device(device))


def benchmark(cfg: BenchConfig):
    """Print each variant's time, its ratio to lora_apply's and its largest difference."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = cfg.dtype if cfg.dtype != "auto" else ("float16" if device.type == "cuda" else "float32")
    x, pool_l, tables, slots, plan = random_step(cfg, device, getattr(torch, name))
    H, I, O = cfg.hidden, cfg.in_dim, cfg.out_dim
    padded = lambda: [w[0] for w in kernels.pad_adapters(pool_l[None], plan, I, O)]  # one layer
    A, Bt = padded()                                                   # [S, Rm, I], [S, Rm, O]
    W = torch.randn(I, O, device=device).to(x.dtype) / I ** 0.5
    q, row_scale = quantize_rows(pool_l)          # the same rows in int8, one scale each (quant.py)
    variants = {"gathered from pages (lora_apply)": lambda: kernels.lora_apply(x, pool_l, plan, O),
                "gathered, int8 rows": lambda: kernels.lora_apply(x, q, plan, O,
                                                                  row_scale=row_scale),
                "bmm, padding copy included": lambda: kernels.bmm_lora(x, *padded(), slots),
                "bmm, weights already padded": lambda: kernels.bmm_lora(x, A, Bt, slots),
                "base GEMM x W [N,I]x[I,O]": lambda: x @ W}
    print(f"{cfg.shape}: N={cfg.tokens} H={H} I={I} O={O} adapters={cfg.adapters} "
          f"ranks={cfg.ranks} {name} {device}")
    want, sec = kernels.lora_apply(x, pool_l, plan, O).float(), {}
    for label, fn in variants.items():
        sec[label] = seconds(fn, cfg.repeats, device)
        lora = sec["gathered from pages (lora_apply)"]
        diff = f"  max|diff| {(fn().float() - want).abs().max():.1e}" if "GEMM" not in label else ""
        print(f"  {label:34s} {sec[label] * 1e3:9.3f} ms  x{sec[label] / lora:6.2f}{diff}")
    print(f"  LoRA (gathered) / base GEMM: {lora / sec['base GEMM x W [N,I]x[I,O]']:.2f}")
    if device.type == "cuda":   # bytes moved at least: x, y and each used adapter once
        used = int(tables[3][slots.unique()].sum())
        nbytes = x.element_size() * (cfg.tokens * (I + O) + used * (I + O))
        copy = copy_bandwidth(device)
        print(f"  gathered: {nbytes / lora / 1e9:.1f} GB/s = {nbytes / lora / copy:.2f} of copy "
              f"bandwidth ({copy / 1e9:.0f} GB/s)")
    else:
        print("  On a CPU the gathered path is the reference (lora_runs), a Python loop of two\n"
              "  small matrix products per run of tokens of one adapter, so bmm (one library call\n"
              "  over padded copies) can win here. The kernels are made for a GPU: no copy, no\n"
              "  padded rank, one launch.")


if __name__ == "__main__":
    cfg, = cli.parse([BenchConfig], "Time S-LoRA's gathered LoRA against the padded-bmm baseline.")
    if cfg.shape not in ("decode", "prefill"):
        raise SystemExit(f"--shape must be decode or prefill, got {cfg.shape!r}")
    if cfg.pages not in ("shuffled", "in-order"):
        raise SystemExit(f"--pages must be shuffled or in-order, got {cfg.pages!r}")
    if cfg.small:
        cfg.hidden, cfg.tokens, cfg.adapters = 1024, 64, 20
    cfg.in_dim, cfg.out_dim = cfg.in_dim or cfg.hidden, cfg.out_dim or cfg.hidden
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if cfg.compile:
        gpu_compile.print_compiled(itertools.chain(kernels.kernel_variants(),
                                               kernels_train.kernel_variants()))
    else:
        benchmark(cfg)
