"""Many LoRA adapters trained in one batch, with S-LoRA's segments (training's twin of kernels.py).

LoRA (Hu et al. 2021, arXiv 2106.09685, end of section 4.2) names its own limitation: inputs of
tasks with different A and B are not simply batched in one forward pass. S-LoRA (arXiv 2311.03285,
section 5) batches them for serving: tokens in segments, each segment with its own adapter, one base GEMM
for all. The same holds for training. One optimizer step here takes a joint batch whose rows are
every adapter's own micro-batch, grouped: adapter 0's rows, then adapter 1's, ... A segment is a
run of consecutive rows of one adapter (kernels.py's word, for rows of a batch instead of tokens
of a step). Each adapted projection computes, for the rows x of segment s,

    y = x W0^T + (alpha_s / r_s) (dropout_s(x) A_s^T) B_s^T        W0 once for every row

and the loss is the sum of every adapter's own loss, L = sum_s L_s, each L_s the mean over its
own target tokens (trainer.accumulate's normalisation). Rows never mix (attention stays inside a
row, W0 is frozen, the padding at a row's end is never attended), so dL/d(A_s, B_s) = dL_s/d(A_s,
B_s): each adapter gets exactly the gradient it gets trained alone. It keeps its own AdamW, its
learning-rate schedule, clipping, dropout generator, validation loss and checkpoints, and is
saved as its own PEFT directory. mLoRA (arXiv 2312.02515) also trains adapters in one batch.
To equal a run of train.py alone, adapter s draws what that run draws: its A from the global
generator seeded with its seed (lora.LoRALinear, in add_lora's module order), its dropout masks
from a generator of that seed, each of the shape its rows have alone (rows padded to its own
longest, not the joint batch's).
On a GPU the layers are GatheredLoRA: one call of S-LoRA's shrink and expand per projection,
with their backward (kernels_train.py); on the CPU SegmentedLoRA, a loop of plain torch products
through autograd (what kernels.py runs on a CPU).
Every adapter shares --steps, --warmup, --batch-size, --grad-accum and --dtype; each may set its
own rank, alpha, targets, lr, dropout and seed.
Demo: `python train.py --data my.jsonl --data my.jsonl:name=r8,rank=8,targets=q,v --out runs/multi`;
`python train.py --bench-multi` (together against one after another, medians of 3).
Letters: B rows, T tokens per row, I in features, O out features, r rank, V vocabulary.
"""
import copy
import math
import os
import random
import resource
import time
from dataclasses import asdict, dataclass, replace
from statistics import median
from types import SimpleNamespace
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import kernels_train

from lora import (TARGET_NAMES, AdapterError, LoRAConfig, LoRALinear, peft_key, read_adapter,
                  save_adapter)
from model import Llama
from sft_data import batches, collate, encode_records, read_records, split_validation
from trainer import (LoopConfig, autocast, load_optimizer, lr_at, make_optimizer,
                     optimizer_tensors, prepare, read_history, target_names, train_step,
                     write_json)

SPEC_KEYS = {"name": str, "rank": int, "alpha": float, "targets": str, "lr": float,
             "dropout": float, "seed": int}


class SpecError(ValueError):
    """A --data spec that does not parse, or adapters that cannot train together."""


def parse_spec(spec: str) -> tuple:
    """'b.jsonl:rank=8,targets=q,v' -> ('b.jsonl', {'rank': 8, 'targets': 'q,v'}); a word without
    '=' continues a targets list (targets=q,v). Options are known keys only."""
    path, sep, options = spec.rpartition(":")
    if not sep or "=" not in options:
        return spec, {}
    values, key = {}, None
    for word in options.split(","):
        if "=" not in word:
            if key != "targets":
                raise SpecError(f"--data {spec}: {word!r} is not key=value")
            values[key] += "," + word
            continue
        key, value = word.split("=", 1)
        if key not in SPEC_KEYS:
            raise SpecError(f"--data {spec}: unknown key {key!r} (known: {', '.join(SPEC_KEYS)})")
        values[key] = value
    for key, kind in SPEC_KEYS.items():
        try:
            values[key] = kind(values[key]) if key in values else None
        except ValueError:
            raise SpecError(f"--data {spec}: {key}={values[key]!r} is not "
                            f"{kind.__name__}") from None
    return path, {k: v for k, v in values.items() if v is not None}


@dataclass
class Job:
    """One adapter of a joint run: its name, its loop (rank, alpha, targets, lr, dropout, seed on
    top of the shared flags) and its data."""
    name: str
    cfg: LoopConfig
    examples: list
    val: list = ()


def job_config(cfg: LoopConfig, options: dict, where: str) -> LoopConfig:
    """cfg with an adapter's own options; SpecError naming `where` if a value cannot work."""
    cfg = replace(cfg, **{k: v for k, v in options.items() if k != "name"})
    if cfg.rank < 1:
        raise SpecError(f"{where}: rank={cfg.rank} must be at least 1")
    if not target_names(cfg.targets):
        raise SpecError(f"{where}: targets={cfg.targets!r} must name projections of "
                        f"{','.join(TARGET_NAMES)} without repeats, or be all-linear")
    if not (0 < cfg.lr < math.inf and 0 <= cfg.dropout < 1 and math.isfinite(cfg.alpha)):
        raise SpecError(f"{where}: lr must be > 0, dropout in [0, 1), alpha finite")
    return cfg


def make_job(name: str, cfg: LoopConfig, options: dict, examples, val=(), where="") -> Job:
    if not examples:
        raise SpecError(f"{where}: no training examples")
    return Job(name, job_config(cfg, options, where), examples, val)


def check_names(names: List[str]):
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SpecError(f"adapter names given twice: {', '.join(twice)} (name them: "
                        f"--data FILE:name=NAME)")


def spec_name(path: str, options: dict) -> str:
    return options.get("name") or os.path.splitext(os.path.basename(path))[0]


def check_flags(cfg):
    """train.py's flags for a joint run (cfg: train.TrainConfig), before any data or model work:
    SpecError naming the flag, file or adapter."""
    if cfg.data and cfg.adapters > 1:
        raise SpecError("--adapters N belongs to the E2E experiment; with --data give one --data "
                        "per adapter")
    if cfg.sweep or cfg.adapter or cfg.method != "lora" or cfg.epochs:
        raise SpecError("several adapters train with --method lora and --steps, without --sweep, "
                        "--adapter or --epochs")
    specs = [parse_spec(d) for d in cfg.data]
    for path, options in specs:
        job_config(cfg, options, f"--data {path}")
    names = [spec_name(*s) for s in specs] or [f"e2e-{k}" for k in range(cfg.adapters)]
    check_names(names)
    for name in names if cfg.resume else []:
        try:
            read_adapter(os.path.join(cfg.resume, name))
        except AdapterError as e:
            raise SpecError(f"--resume: adapter {name!r}: {e}") from None


def read_specs(specs: List[str]) -> list:
    """[(name, path, options, records)] for --data FILE[:options] flags: every spec parsed and
    every file read and checked (sft_data.read_records: RecordError naming file and line) before
    any model work."""
    out = []
    for spec in specs:
        path, options = parse_spec(spec)
        out.append((spec_name(path, options), path, options, read_records(path)))
    return out


def data_jobs(read: list, tok, cfg: LoopConfig, seq_len: int, val_fraction: float) -> List[Job]:
    """One job per --data file: its records encoded, its validation split drawn with its seed."""
    jobs = []
    for name, path, options, records in read:
        examples, val = split_validation(encode_records(tok, records, path, seq_len), val_fraction,
                                         options.get("seed", cfg.seed))
        jobs.append(make_job(name, cfg, options, examples, val, where=f"--data {path}"))
    return jobs


def seed_jobs(n: int, examples: list, val: list, cfg: LoopConfig, prefix: str) -> List[Job]:
    """n adapters on the same examples with seeds seed, seed + 1, ...: prefix-0, prefix-1, ..."""
    return [make_job(f"{prefix}-{k}", cfg, {"seed": cfg.seed + k}, examples, val,
                     where=f"adapter {prefix}-{k}") for k in range(n)]


# ------------------------------------------------------------------ the segmented projection

@dataclass
class Segment:
    """Rows [start, end) of the joint batch belong to adapter `name` (None: no adapter); `length`
    is the token count those rows have alone (their dropout masks take that shape)."""
    name: Optional[str]
    start: int = 0
    end: Optional[int] = None
    length: Optional[int] = None
    generator: Optional[torch.Generator] = None


class SegmentedLoRA(nn.Module):
    """A frozen nn.Linear W0 and the (A_s, B_s) of every adapter that adapts it: each segment's
    rows get their own adapter's (alpha_s / r_s) (x A_s^T) B_s^T."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base, self.lora_A, self.lora_B = base, nn.ModuleDict(), nn.ModuleDict()
        self.scale, self.p, self.segments = {}, {}, []

    def add(self, name: str, cfg: LoRAConfig):
        one = LoRALinear(self.base, cfg)   # the random draws of lora.py's own layer
        self.lora_A[name], self.lora_B[name] = one.lora_A, one.lora_B
        self.scale[name], self.p[name] = cfg.scale, cfg.dropout

    def dropped(self, x, s: Segment):
        """dropout_s of segment s's rows x[s.start:s.end, :s.length] [b_s, T_s, I], with the
        mask its rows draw alone (nn.Dropout's)."""
        xs, p = x[s.start:s.end, :s.length], self.p[s.name]
        if self.training and p > 0:
            keep = torch.empty_like(xs).bernoulli_(1 - p, generator=s.generator)
            xs = xs * keep.div_(1 - p)
        return xs

    def forward(self, x):  # x [B, T, I] -> [B, T, O]
        y = self.base(x)                                               # x W0^T, every row at once
        for s in self.segments:
            if s.name not in self.lora_A:
                continue
            delta = self.lora_B[s.name](self.lora_A[s.name](self.dropped(x, s)))   # [b_s, T_s, O]
            y[s.start:s.end, :s.length] += self.scale[s.name] * delta
        return y


class GatheredLoRA(SegmentedLoRA):
    """SegmentedLoRA with every segment's LoRA in one call of S-LoRA's shrink and expand and their
    backward (kernels_train.segment_lora: Triton on a GPU). A segment's rows are T tokens each
    here, its padding included: nothing reads a padded position (causal attention, no loss), so
    its gradient there is zero and no adapter's gradient changes."""

    def __init__(self, base: nn.Linear, use_triton: Optional[bool] = None):
        super().__init__(base)
        self.use_triton = use_triton

    def forward(self, x):  # x [B, T, I] -> [B, T, O]
        y = self.base(x)                                               # x W0^T, every row at once
        names = [s.name for s in self.segments if s.name in self.lora_A]
        if not names:
            return y
        B, T, I = x.shape
        x_in = x.clone() if self.training and any(self.p[n] > 0 for n in names) else x
        for s in self.segments:
            if x_in is not x and s.name in names:
                x_in[s.start:s.end, :s.length] = self.dropped(x, s)
        delta = kernels_train.segment_lora(
            x_in.reshape(B * T, I), [len(range(B)[s.start:s.end]) * T for s in self.segments],
            [1 + names.index(s.name) if s.name in names else 0 for s in self.segments],
            [self.scale[n] for n in names], [self.lora_A[n].weight for n in names],
            [self.lora_B[n].weight for n in names], self.use_triton)             # [B T, O]
        return y + delta.view(B, T, -1).to(y.dtype)


class MultiLoRA:
    """The base model with every job's adapter on its targets, and each adapter's parameters,
    its layers for the PEFT file, and its dropout generator."""

    def __init__(self, net: Llama, jobs: List[Job], gathered: Optional[bool] = None):
        """gathered: the layers are GatheredLoRA (S-LoRA's kernels and their backward; default
        on a GPU), else SegmentedLoRA (a loop of torch products)."""
        self.net, self.jobs = net, {j.name: j for j in jobs}
        on_gpu = net.lm_head.weight.is_cuda
        make = GatheredLoRA if (on_gpu if gathered is None else gathered) else SegmentedLoRA
        sites = [(f"{pname}.{attr}" if pname else attr, parent, attr)
                 for pname, parent in net.named_modules() for attr, child in parent.named_children()
                 if attr in TARGET_NAMES.values() and isinstance(child, nn.Linear)]
        self.layers = {j.name: {} for j in jobs}                       # name -> {site: lora pair}
        self.modules: List[SegmentedLoRA] = []
        for p in net.parameters():
            p.requires_grad_(False)
        for job in jobs:   # add_lora's order: the same A as train.py draws for this seed
            torch.manual_seed(job.cfg.seed)
            lcfg = self.lora_config(job.name)
            for site, parent, attr in sites:
                if attr not in lcfg.targets:
                    continue
                seg = getattr(parent, attr)
                if not isinstance(seg, SegmentedLoRA):
                    seg = make(seg)
                    setattr(parent, attr, seg)
                    self.modules.append(seg)
                seg.add(job.name, lcfg)
                self.layers[job.name][site] = SimpleNamespace(lora_A=seg.lora_A[job.name],
                                                              lora_B=seg.lora_B[job.name])
        self.generators = {j.name: torch.Generator().manual_seed(j.cfg.seed) for j in jobs}

    def lora_config(self, name: str) -> LoRAConfig:
        c = self.jobs[name].cfg
        return LoRAConfig(r=c.rank, alpha=c.alpha, dropout=c.dropout, use_rslora=c.rslora,
                          targets=tuple(target_names(c.targets)))

    def parameters(self, name: str) -> list:
        return [p for pair in self.layers[name].values()
                for p in (pair.lora_A.weight, pair.lora_B.weight)]

    def set_segments(self, segments: List[Segment]):
        for m in self.modules:
            m.segments = segments

    def save(self, name: str, path: str):
        save_adapter(self.net, path, self.lora_config(name), self.net.config.name,
                     self.layers[name])


# ------------------------------------------------------------------ one optimizer step

def stack(parts: Dict[str, tuple]) -> tuple:
    """Every adapter's collated micro-batch (tokens [b_s, T_s], mask [b_s, T_s - 1]) stacked into
    one batch (tokens [B, T], mask [B, T - 1]), each row padded at its end to the longest."""
    T = max(tokens.shape[1] for tokens, _ in parts.values())
    tokens = torch.cat([F.pad(t, (0, T - t.shape[1])) for t, _ in parts.values()])
    mask = torch.cat([F.pad(m, (0, T - 1 - m.shape[1])) for _, m in parts.values()])
    return tokens, mask


def joint_batch(multi: MultiLoRA, parts: Dict[str, tuple]) -> tuple:
    """The stacked batch, and its segments set on every adapted layer. (tokens, mask, the target
    count of each adapter in order)."""
    tokens, mask = stack(parts)
    segments, row = [], 0
    for name, (t, _) in parts.items():
        segments.append(Segment(name, row, row + t.shape[0], t.shape[1] - 1,
                                multi.generators[name]))
        row += t.shape[0]
    multi.set_segments(segments)
    return tokens, mask, [int(m.sum()) for _, m in parts.values()]


def accumulate_together(multi: MultiLoRA, micro: Dict[str, list]) -> Dict[str, float]:
    """One step's gradients for every adapter: L = sum_s L_s, L_s the mean loss over every target
    token of adapter s's micro-batches (trainer.accumulate's, per adapter); one backward per
    micro-batch for all. {name: L_s}."""
    names = list(micro)
    n_targets = {n: sum(int(mask.sum()) for _, mask, _ in micro[n]) for n in names}
    losses = dict.fromkeys(names, 0.0)
    device = multi.net.lm_head.weight.device
    for k in range(len(micro[names[0]])):
        tokens, mask, counts = joint_batch(multi, {n: micro[n][k][:2] for n in names})
        tokens, mask = tokens.to(device), mask.to(device)
        with autocast(multi.net, multi.jobs[names[0]].cfg.dtype):
            logits = multi.net(tokens[:, :-1], select=mask).float()      # [M, V], rows in order
        targets, total = tokens[:, 1:][mask], 0.0
        for n, lg, tg in zip(names, logits.split(counts), targets.split(counts)):
            part = F.cross_entropy(lg, tg, label_smoothing=multi.jobs[n].cfg.label_smoothing,
                                   reduction="sum") / n_targets[n]
            losses[n] += part.item()
            total = total + part
        total.backward()
    return losses


def train_step_together(multi, opts, micro, step) -> Dict[str, tuple]:
    """Every adapter's optimizer step (step counts from 0): its schedule's rate, its clipped
    gradient, its AdamW. {name: (loss, gradient norm before clipping)}."""
    for name, opt in opts.items():
        for group in opt.param_groups:
            group["lr"] = lr_at(step, multi.jobs[name].cfg)
    losses, out = accumulate_together(multi, micro), {}
    for name, opt in opts.items():
        cfg = multi.jobs[name].cfg
        norm = torch.nn.utils.clip_grad_norm_(multi.parameters(name), cfg.max_grad_norm or math.inf)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out[name] = losses[name], norm.item()
    return out


@torch.no_grad()
def validation_loss(multi: MultiLoRA, name: str, batch_size: int) -> float:
    """Adapter `name`'s mean cross-entropy (no smoothing) over its held-out target tokens."""
    val, total, count = multi.jobs[name].val, 0.0, 0
    multi.net.eval()
    multi.set_segments([Segment(name)])                               # every row: this adapter
    for s in range(0, len(val), batch_size):
        tokens, mask, _ = collate(val[s:s + batch_size])
        with autocast(multi.net, multi.jobs[name].cfg.dtype):
            logits = multi.net(tokens[:, :-1], select=mask)
        total += F.cross_entropy(logits.float(), tokens[:, 1:][mask], reduction="sum").item()
        count += int(mask.sum())
    multi.net.train()
    return total / count


# ------------------------------------------------------------------ the loop, checkpoints

def train_together(net: Llama, jobs: List[Job], out_dir: Optional[str] = None,
                   resume: Optional[str] = None, log=print,
                   gathered: Optional[bool] = None) -> tuple:
    """Train every job's adapter in joint batches; validation, checkpoints (out_dir/checkpoint-N/
    <name>) and progress as trainer.train, per adapter (gathered: MultiLoRA's). (MultiLoRA,
    {name: history})."""
    check_names([j.name for j in jobs])
    cfg, multi = jobs[0].cfg, MultiLoRA(net, jobs, gathered)
    opts = {j.name: torch.optim.AdamW(multi.parameters(j.name), lr=j.cfg.lr,
                                      weight_decay=j.cfg.weight_decay) for j in jobs}
    hist = {j.name: {"losses": [], "val_losses": []} for j in jobs}
    if resume:
        hist = {j.name: restore(multi, j.name, opts[j.name], os.path.join(resume, j.name))
                for j in jobs}
    first = len(hist[jobs[0].name]["losses"])
    data = {j.name: batches(j.examples, cfg.batch_size, random.Random(j.cfg.seed),
                            skip=first * cfg.grad_accum) for j in jobs}
    net.train()
    start, n_tokens = time.time(), 0
    for step in range(first + 1, cfg.steps + 1):
        micro = {n: [next(d) for _ in range(cfg.grad_accum)] for n, d in data.items()}
        for name, (loss, norm) in train_step_together(multi, opts, micro, step - 1).items():
            hist[name]["losses"].append(loss)
        n_tokens += sum(n for parts in micro.values() for _, _, n in parts)
        for j in jobs:
            if j.val and (step % cfg.eval_every == 0 or step == cfg.steps):
                loss = validation_loss(multi, j.name, cfg.batch_size)
                hist[j.name]["val_losses"].append([step, loss])
        if out_dir and cfg.save_every and step % cfg.save_every == 0:
            log(f"saved {save_checkpoint(multi, opts, hist, out_dir)}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            log(progress(step, hist, n_tokens, time.time() - start, first, cfg))
    net.eval()
    elapsed = time.time() - start
    for h in hist.values():
        h.update(train_time_s=elapsed, step_s=elapsed / max(cfg.steps - first, 1),
                 tokens_per_s=n_tokens / max(elapsed, 1e-9))
    return multi, hist


def progress(step, hist, n_tokens, elapsed, first, cfg: LoopConfig) -> str:
    recent = {n: h["losses"][-cfg.log_every:] for n, h in hist.items()}
    losses = "  ".join(f"{n} {sum(r) / len(r):.3f}" for n, r in recent.items())
    done = step - first
    return (f"step {step}/{cfg.steps}  loss {losses}  tok/s {n_tokens / elapsed:.0f}  elapsed "
            f"{elapsed / 60:.1f} min  remaining {elapsed / done * (cfg.steps - step) / 60:.1f} min")


def save_checkpoint(multi: MultiLoRA, opts, hist, out_dir: str) -> str:
    """checkpoint-{step}/<name>: each adapter's PEFT files, AdamW state, dropout generator and
    losses, as trainer.save_checkpoint writes them for one."""
    step = len(next(iter(hist.values()))["losses"])
    root = os.path.join(out_dir, f"checkpoint-{step}")
    for name, opt in opts.items():
        path = os.path.join(root, name)
        multi.save(name, path)
        save_file({**optimizer_tensors(opt), "generator": multi.generators[name].get_state()},
                  os.path.join(path, "optimizer.safetensors"))
        write_json({"config": asdict(multi.jobs[name].cfg), **hist[name]},
                   os.path.join(path, "trainer_state.json"))
    return root


def restore(multi: MultiLoRA, name: str, opt, path: str) -> dict:
    """Adapter `name` as save_checkpoint left it in `path`: weights, AdamW, generator, losses."""
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    with torch.no_grad():
        for site, pair in multi.layers[name].items():
            for which in ("lora_A", "lora_B"):
                key = peft_key(int(site.split(".")[2]), site.rsplit(".", 1)[-1], which)
                getattr(pair, which).weight.copy_(tensors[key])
    state = load_file(os.path.join(path, "optimizer.safetensors"))
    multi.generators[name].set_state(state.pop("generator"))
    load_optimizer(opt, state)
    return read_history(path)


# ------------------------------------------------------------------ benchmark

def shared_copy(net: Llama) -> Llama:
    """A copy of net's modules that shares its weights: one copy of the base model in memory."""
    return copy.deepcopy(net, memo={id(p): p for p in net.parameters()})


def bench(base: Llama, n_adapters: int, cfg: LoopConfig, repeat: int = 3, steps: int = 3,
          log=print) -> dict:
    """N adapters of --batch-size rows each on E2E-shaped rows (a 20-30 token prompt, a 20-30
    token target): one joint step against N steps of one adapter each (what N runs of train.py
    do, trainer.train_step), side by side in this process, medians of `repeat`; and the frozen
    base's forward + backward on the same joint batch with no adapter (where the time goes)."""
    gen = torch.Generator().manual_seed(0)

    def example():
        p, t = (int(torch.randint(20, 31, (1,), generator=gen)) for _ in range(2))
        return (torch.randint(0, base.config.vocab_size, (p + t,), generator=gen).tolist(),
                [False] * p + [True] * t)
    cfg = replace(cfg, steps=10 ** 6, warmup=1)
    jobs = [Job(f"a{i}", replace(cfg, seed=i), [example() for _ in range(64)])
            for i in range(n_adapters)]
    data = {j.name: batches(j.examples, cfg.batch_size, random.Random(j.cfg.seed)) for j in jobs}
    multi = MultiLoRA(shared_copy(base), jobs)
    opts = {j.name: torch.optim.AdamW(multi.parameters(j.name), lr=cfg.lr) for j in jobs}
    alone = []
    for j in jobs:
        torch.manual_seed(j.cfg.seed)
        net = prepare(shared_copy(base), j.cfg)[0].train()
        alone.append((net, make_optimizer(net, j.cfg), j))
    plain = shared_copy(base)
    plain.model.embed_tokens.register_forward_hook(lambda m, i, out: out.requires_grad_())
    variants = {
        "together": lambda micro: train_step_together(multi, opts, micro, 0),
        "one after another": lambda micro: [train_step(net, opt, micro[j.name], 0, j.cfg)
                                            for net, opt, j in alone],
        "frozen base only": lambda micro: _base_step(plain, micro, cfg.dtype)}
    multi.net.train()
    times = {k: [] for k in variants}
    sync = torch.cuda.synchronize if base.lm_head.weight.is_cuda else (lambda: None)
    for r in range(repeat + 1):                                  # the first round warms up
        for k, fn in variants.items():
            micro = {n: [next(d)] for n, d in data.items()}
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                fn(micro)
            sync()
            if r:
                times[k].append((time.perf_counter() - start) / steps)
    return _report_bench(times, n_adapters, cfg, log)


def _base_step(plain: Llama, micro: Dict[str, list], dtype: str):
    """The frozen model's share of a joint step: forward and backward through every layer (the
    gradient LoRA needs flows through them), no adapter, no optimizer."""
    tokens, mask = (t.to(plain.lm_head.weight.device)
                    for t in stack({n: parts[0][:2] for n, parts in micro.items()}))
    with autocast(plain, dtype):
        logits = plain(tokens[:, :-1], select=mask)
    F.cross_entropy(logits.float(), tokens[:, 1:][mask], reduction="sum").backward()


def _report_bench(times: Dict[str, list], n: int, cfg: LoopConfig, log) -> dict:
    med = {k: median(v) for k, v in times.items()}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log(f"{n} adapters x batch {cfg.batch_size} (r={cfg.rank}, {cfg.targets}), "
        f"{torch.get_num_threads()} thread(s): seconds per optimizer step, medians of "
        f"{len(times['together'])}")
    for k, v in med.items():
        log(f"  {k:>18}: {v:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in times[k])})")
    share = 100 * med["frozen base only"] / med["together"]
    log(f"together / one after another: {med['one after another'] / med['together']:.2f}x; the "
        f"frozen base's forward + backward is {share:.0f}% of the joint step (the rest: LoRA's "
        f"products, the loss, AdamW); peak RSS {rss:.0f} MB")
    return {**med, "speedup": med["one after another"] / med["together"], "peak_rss_mb": rss}
