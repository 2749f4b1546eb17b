"""Tensor parallelism for S-LoRA: base model and adapters split over W devices (arXiv 2311.03285, sec. 6).

The base model is split Megatron-style: each column-parallel layer keeps some of its output rows, each
row-parallel layer the matching input columns, and one all-reduce after each row-parallel layer sums
the partial results. S-LoRA's Figure 4 splits every adapter to match, so that LoRA adds only small
collectives of z = x A^T [N, r] next to the base model's [N, H] ones. Device k of W holds:

    weight            split along                 device k keeps                    collective after it
    q_proj W          output rows                 the g q heads of each of its KV heads
    k_proj, v_proj W  output rows                 its KV heads (contiguous; the first
                                                  n_kv_heads % W devices get one more)
    o_proj W          input columns               the columns of its q heads        all-reduce y [N, H]
    gate, up W        output rows                 its slice of ffn_dim
    down W            input columns               the same slice                    all-reduce y [N, H]
    embed, norms, lm_head: whole on every device (all compute the same logits and pick the same token)
    q, k, v LoRA  A [r, H]: rows j = k, k+W, ...  (c = ceil(r/W) rows)              all-gather z [W, N, c]
                  B [out, r]: the rows of its own outputs, like W
    o LoRA        A [r, in]: the columns of its q heads -> partial z                all-reduce z [N, r]
                  B [H, r]: rows of its share of H; the delta goes into the base partial sum, so
                  the base all-reduce after o_proj carries it (no collective of its own)

Every device runs the same serve.Engine on its shard with the same submissions; the scheduler is
deterministic, and every reading of the clock is rank 0's (a broadcast), so all devices make the
same decisions and every collective has its partners. Each device's pool holds only its share: a
KV page keeps the g tokens of a full-model page, g x (its kv width) of the H numbers; an adapter
takes as many pages as on one device, each page holding only its rows and columns. Bytes
communicated are counted per collective as the size of the tensor it leaves on each device.
Simplified: greedy sampling only; only the slora mode (and base) is sharded; pages are not made
narrower per device (an A row of q, k or v still needs all H input features).
Demo: `python serve.py --tp 2 --adapters 100`; `python tp.py --world 2` prints what each device holds.
Letters: W devices, k this device, N tokens of a step, H model dim, r adapter rank, c = ceil(r / W).
"""
import argparse
import os
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import kernels
import serve
from checkpoints import load_model
from model import Llama, ModelConfig
from paging import HostAdapter

PEER_GRACE_S = 2.0   # a device that lost its peers waits so long, so that the peer's own error is reported


class TensorParallelError(RuntimeError):
    """A device of the group failed; the message says which one and why."""


# ---------------------------------------------------------------------- which device holds what

def _part(n: int, world: int, k: int) -> slice:
    """Device k's contiguous share of n items; the first n % world devices get one more."""
    size, extra = divmod(n, world)
    start = k * size + min(k, extra)
    return slice(start, start + size + (k < extra))


@dataclass(frozen=True)
class Shard:
    """Device `rank` of `world`: its slices of the full model's dimensions (the table above)."""
    rank: int
    world: int
    q: slice              # rows of q_proj = columns of o_proj
    kv: slice             # rows of k_proj and v_proj
    ffn: slice            # rows of gate_proj and up_proj = columns of down_proj
    out: slice            # columns of H that its o_proj LoRA delta fills
    local: ModelConfig    # what its Attention sees: its own head counts

    @staticmethod
    def of(cfg: ModelConfig, rank: int, world: int) -> "Shard":
        if not 1 <= world <= cfg.n_kv_heads:
            raise ValueError(f"tensor parallelism over {world} devices needs 1 <= devices <= n_kv_heads "
                             f"= {cfg.n_kv_heads}: the heads are split by KV-head groups")
        heads, g, hd = _part(cfg.n_kv_heads, world, rank), cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
        nkv = heads.stop - heads.start
        # dim = the width of its q heads, so that head_dim = dim // n_heads stays the model's
        local = replace(cfg, dim=nkv * g * hd, n_heads=nkv * g, n_kv_heads=nkv)
        return Shard(rank, world, slice(heads.start * g * hd, heads.stop * g * hd),
                     slice(heads.start * hd, heads.stop * hd), _part(cfg.ffn_dim, world, rank),
                     _part(cfg.dim, world, rank), local)

    def lora_split(self, target: str) -> tuple:
        """(rows of A, columns of A, columns of B^T) that this device keeps of one adapter target."""
        if target == "o_proj":   # row-parallel: the input features of its heads, its share of H out
            return slice(None), self.q, self.out
        # column-parallel: every W-th row of A (so the all-gather puts z in row order), its outputs of B
        outputs = {"q_proj": self.q, "k_proj": self.kv, "v_proj": self.kv}[target]
        return slice(self.rank, None, self.world), slice(None), outputs


def _keep(linear: nn.Linear, rows: slice, cols: slice):
    """Keep a block of W [out, in] in place of the whole weight."""
    w = linear.weight.data[rows, cols].clone()
    linear.weight = nn.Parameter(w, requires_grad=linear.weight.requires_grad)
    linear.out_features, linear.in_features = w.shape


def shard_model(model: Llama, comm: "Comm") -> Shard:
    """Split the base model in place for device comm.rank: the table above, base part."""
    s, every = Shard.of(model.config, comm.rank, comm.world), slice(None)
    base_all_reduce = partial(comm.all_reduce, kind="base")
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        split = ((attn.q_proj, s.q, every), (attn.k_proj, s.kv, every), (attn.v_proj, s.kv, every),
                 (attn.o_proj, every, s.q),                                    # (weight, rows, columns)
                 (mlp.gate_proj, s.ffn, every), (mlp.up_proj, s.ffn, every), (mlp.down_proj, every, s.ffn))
        if any(type(linear) is not nn.Linear for linear, _, _ in split):
            raise ValueError("shard_model needs a plain base model: its LoRA layers would not be split")
        for linear, rows, cols in split:
            _keep(linear, rows, cols)
        attn.cfg = s.local
        attn.all_reduce = mlp.all_reduce = base_all_reduce   # after o_proj and down_proj (model.project)
    return s


class _ShardPages(Mapping):
    """target -> this device's part of an adapter in the pool's page format [L, 2r, H]: A rows first,
    then B^T rows (paging.py); unused parts of the pages are zero. Cut when the pool loads the adapter,
    so host memory keeps each adapter once (S-LoRA keeps all adapters whole in host memory)."""

    def __init__(self, full: HostAdapter, shard: Shard):
        self.full, self.shard = full, shard

    def __getitem__(self, target):
        a_rows, a_cols, b_cols = self.shard.lora_split(target)
        a = self.full.a(target)[:, a_rows, a_cols]                 # [L, c or r, H or its q width]
        bt = self.full.bt(target)[:, :, b_cols]                    # [L, r, its out width]
        pages, r = torch.zeros_like(self.full.weights[target]), self.full.rank   # [L, 2r, H]
        pages[:, :a.shape[1], :a.shape[2]] = a
        pages[:, r:, :bt.shape[2]] = bt
        return pages

    def __iter__(self):
        return iter(self.full.weights)

    def __len__(self):
        return len(self.full.weights)


# ---------------------------------------------------------------------- the collectives

class Comm:
    """One device's end of the process group. Counts bytes by kind (base, lora, clock): elements of the
    tensor each collective leaves on a device x element size (a ring all-reduce sends ~2 (W-1)/W of it)."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device
        self.bytes = {"base": 0, "lora": 0, "clock": 0}

    def all_reduce(self, t, kind):
        """Sum over devices, in place."""
        self.bytes[kind] += t.numel() * t.element_size()
        return self._run(dist.all_reduce, t)

    def all_gather(self, t, kind):
        """[n, c] on each device -> [W, n, c], device k's tensor at k."""
        out = t.new_empty(self.world * t.shape[0], *t.shape[1:])
        self.bytes[kind] += out.numel() * out.element_size()
        return self._run(dist.all_gather_single, out, t.contiguous()).view(self.world, *t.shape)

    def broadcast(self, t, kind):
        """Rank 0's t on every device."""
        self.bytes[kind] += t.numel() * t.element_size()
        return self._run(dist.broadcast, t, 0)

    @staticmethod
    def _run(op, result, *args):
        try:
            op(result, *args)
        except RuntimeError as e:   # mostly: a peer process died, and gloo or NCCL saw its socket close
            time.sleep(PEER_GRACE_S)
            raise RuntimeError(f"{op.__name__} failed (if another device stopped, its error is the cause): "
                               f"{e}") from None
        return result


# ---------------------------------------------------------------------- the engine on one device

class ShardedEngine(serve.Engine):
    """serve.Engine on one device's shard (the model passed through shard_model)."""

    def __init__(self, model: Llama, comm: Comm, shard: Shard, eos_id=None, **options):
        self.comm, self.shard, self.step_bytes = comm, shard, []   # step_bytes: (base, lora) per step
        super().__init__(model, eos_id, **options)
        if self.cfg.mode != "slora":
            raise ValueError(f"tensor parallelism serves the slora mode only, not {self.cfg.mode!r}")

    def now(self) -> float:
        """Rank 0's clock on every device: all see the same arrivals and deadlines, so all agree."""
        t = torch.tensor([super().now()], dtype=torch.float64, device=self.comm.device)
        return float(self.comm.broadcast(t, "clock"))

    def register(self, adapter: HostAdapter):
        super().register(adapter)   # checks the whole adapter against the model, charges its pages
        out = {t: len(range(w)[self.shard.lora_split(t)[2]]) for t, w in adapter.out.items()}   # its B^T columns
        self.pool.host[adapter.name] = HostAdapter(adapter.name, adapter.rank, adapter.scale,
                                                   _ShardPages(adapter, self.shard), out)

    def step(self) -> bool:
        if self.cfg.temperature > 0:
            raise ValueError("tensor parallelism samples greedily: devices pick tokens without talking")
        before = self.comm.bytes["base"], self.comm.bytes["lora"]
        ran = super().step()
        if ran:
            self.step_bytes.append((self.comm.bytes["base"] - before[0], self.comm.bytes["lora"] - before[1]))
        return ran

    def _lora(self, batch, reqs, prefill, slots, names):
        """S-LoRA's Figure 4 on this device's pages; the gathered kernels read them (kernels.py)."""
        if not names:
            return None
        s, W, H, dev = self.shard, self.comm.world, self.model.config.dim, batch.tokens.device
        tables = self.pool.kernel_tables(names)
        lengths = torch.tensor([r.step_tokens() for r in reqs], device=dev)
        seg_adapter = torch.tensor(slots, dtype=torch.int32, device=dev)                   # [R]
        seg_starts = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).int()           # [R + 1]
        token_slots = seg_adapter.repeat_interleave(lengths)                               # [N]
        mbgmm = kernels.lora_shrink_segments, kernels.lora_expand_segments, (seg_starts, seg_adapter)
        mbgmv = kernels.lora_shrink, kernels.lora_expand, (token_slots,)
        shrink_k, expand_k, which = mbgmm if prefill else mbgmv   # segments when prefilling, else per token

        def lora(x, layer, target):
            t = tables.get(target)
            if t is None or not bool((t.ranks > 0).any()):   # the same answer on every device
                return None
            pool_l = self.pool.tensor[layer]   # shrink z = x A^T, expand delta = scale z B^T, from the pages
            shrink = lambda x, pages, ranks: shrink_k(x, pages, t.page_ids, t.a_start, ranks, *which, int(ranks.max()))
            expand = lambda z, width: expand_k(z, pool_l, t.page_ids, t.b_start, t.ranks, t.scales, *which, width)
            if target == "o_proj":   # x [N, its q width]: partial x A^T [N, r], summed over devices
                z = self.comm.all_reduce(shrink(x, pool_l[:, :x.shape[1]], t.ranks), "lora")
                delta = x.new_zeros(x.shape[0], H)   # its columns of H; the base all-reduce adds the others'
                delta[:, s.out] = expand(z, s.out.stop - s.out.start)
                return delta
            z = self.comm.all_gather(shrink(x, pool_l, (t.ranks + W - 1) // W), "lora")    # [W, N, c]
            z = z.permute(1, 2, 0).reshape(x.shape[0], -1)   # [N, c W]: column i W + k = row i W + k of A
            return expand(z, self.out_dim[target])
        return lora


# ---------------------------------------------------------------------- processes

def launch(world: int, fn, *args, timeout_s: float = 300.0, device_type: Optional[str] = None):
    """Run fn(comm, *args) in `world` processes joined in one group: NCCL on GPUs, gloo on a CPU (device_type
    None: GPUs when present). An error in one ends them all (spawn stops the others) and raises here."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(f"{world} devices asked for, {torch.cuda.device_count()} GPUs present")
    with socket.socket() as sock:   # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    try:
        mp.spawn(_worker, args=(world, port, timeout_s, device_type, fn, args), nprocs=world, join=True)
    except mp.ProcessRaisedException as e:
        found = re.search(r"TensorParallelError: (.*)", str(e), re.S)
        raise TensorParallelError(found.group(1).strip() if found else str(e).strip()) from None
    except mp.ProcessExitedException as e:   # killed by a signal, e.g. out of memory
        raise TensorParallelError(f"rank {e.error_index}: {str(e).strip()}") from None


def _worker(rank, world, port, timeout_s, device_type, fn, args):
    cuda = device_type == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:   # the processes share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))
    try:
        fn(Comm(rank, world, device), *args)
    except Exception as e:
        raise TensorParallelError(f"rank {rank}: {type(e).__name__}: {e}") from e
    dist.destroy_process_group()


def benchmark(b: "serve.BenchConfig", t: "serve.TraceConfig"):
    """serve.py's benchmark over b.tp devices; rank 0 prints the report and the bytes communicated."""
    try:
        launch(b.tp, _bench_rank, b, t)
    except TensorParallelError as e:
        raise SystemExit(f"tensor-parallel benchmark failed: {e}")


def _bench_rank(comm: Comm, b, t):
    say = print if comm.rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(0)   # every device builds the same full model, then keeps its part
    model = (load_model(b.base)[0] if b.base else Llama(ModelConfig(n_layers=b.layers)).eval()).to(comm.device)
    cfg, ranks = model.config, [int(r) for r in t.ranks.split(",")]
    shard = shard_model(model, comm)
    trace = serve.make_trace(t, cfg.vocab_size)
    say(f"base: {b.base or f'random weights, {cfg.n_layers} layers, dim {cfg.dim}'}; {len(trace)} requests, "
        f"{t.adapters} adapters of ranks {ranks}, rate {t.rate}/s, cv {t.cv}, alpha {t.alpha}; "
        f"{comm.world} devices ({comm.device.type}); modes other than slora and base run on one device only")
    adapters, real = serve.synthetic_adapters(t.adapters, ranks, cfg, t.seed), dict(a.split("=", 1) for a in b.adapter)
    rows = {}
    for mode in [m for m in b.modes.split(",") if m in ("slora", "base")]:
        engine = ShardedEngine(model, comm, shard, None, policy=b.policy, pool_pages=b.pool_pages,
                               ttft_slo=b.slo if b.abort else None)
        rows[mode] = serve.run_mode(engine, mode, trace, adapters, real, b.slo)
        base, lora = (sum(col) / len(engine.step_bytes) / 1024 for col in zip(*engine.step_bytes))
        say(f"{mode:>10}: " + "  ".join(f"{k} {v:.3g}" for k, v in rows[mode].items()), flush=True)
        say(f"{'':>10}  bytes per step and device: base {base:.1f} KiB, LoRA {lora:.1f} KiB "
            f"(LoRA / base {lora / base:.3f})", flush=True)
    if comm.rank == 0:
        serve.report(rows, model)


def _describe(cfg: ModelConfig, world: int, r: int):
    """What each device holds of the model and of a rank-r adapter, and what it sends per token."""
    g, W, c = cfg.n_heads // cfg.n_kv_heads, world, -(-r // world)
    for k in range(W):
        s = Shard.of(cfg, k, W)
        q, kv, f, h = (x.stop - x.start for x in (s.q, s.kv, s.ffn, s.out))
        print(f"device {k}: q_proj [{q}, {cfg.dim}] k_proj, v_proj [{kv}, {cfg.dim}] o_proj [{cfg.dim}, {q}] gate, "
              f"up [{f}, {cfg.dim}] down [{cfg.dim}, {f}]; KV page: {g} tokens x {kv} = {g * kv} of {cfg.dim}\n"
              f"          rank-{r} adapter: q/k/v A [{c}, {cfg.dim}], B^T [{r}, {q}/{kv}/{kv}]; o A [{r}, {q}], "
              f"B^T [{r}, {h}]")
    print(f"per token and layer: base all-reduces 2 x {cfg.dim} numbers; LoRA on q, k, v, o: "
          f"3 all-gathers of {W} x {c} + one all-reduce of {r} = {3 * W * c + r} numbers")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Print how tensor parallelism splits SmolLM2-135M and an adapter.")
    ap.add_argument("--world", type=int, default=2, help="number of devices W")
    ap.add_argument("--rank", type=int, default=16, help="rank r of the example adapter")
    args = ap.parse_args()
    _describe(ModelConfig(), args.world, args.rank)
