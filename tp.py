"""Tensor parallelism for S-LoRA: model, adapters split over W devices (arXiv 2311.03285, sec. 6).

The base model is split Megatron-style: each column-parallel layer keeps some of its output rows,
each row-parallel layer the matching input columns, and one all-reduce after each row-parallel
layer sums the partial results. S-LoRA's Figure 4 splits every adapter to match, so that LoRA adds
only small collectives of z = x A^T [N, r] next to the base model's [N, H] ones. Device k of W:

    weight            split along       device k keeps                           collective after it
    q_proj W          output rows       the g q heads of each of its KV heads
    k_proj, v_proj W  output rows       its KV heads (contiguous; the first
                                        n_kv_heads % W devices get one more)
    o_proj W          input columns     the columns of its q heads               all-reduce y [N, H]
    gate, up W        output rows       its slice of ffn_dim
    down W            input columns     the same slice                           all-reduce y [N, H]
    embed, norms, lm_head: whole on every device (all compute the same logits, pick the same token)
    q, k, v, gate, up LoRA (column-parallel, as their W)
                  A [r, H]: rows j = k, k+W, ... (c = ceil(r/W) of them)     all-gather z [W, N, c]
                  B [out, r]: the rows of its own outputs, like W (gate, up: its ffn_dim slice)
    o, down LoRA (row-parallel, as their W)
                  A [r, in]: the columns of its own inputs (o: its q heads, down: its ffn_dim
                  slice) -> partial z                                          all-reduce z [N, r]
                  B [H, r]: rows of its share of H; the delta goes into the base partial sum, so
                  the base all-reduce after o_proj / down_proj carries it (no collective of its own)

Every device runs the same engine (engine.py) on its shard with the same submissions; the
scheduler is deterministic, and every reading of the clock is rank 0's (a broadcast), so all
devices make the same decisions and every collective has its partners. The LoRA arithmetic is
kernels.py's one interface (plan_lora once per step, then lora_shrink / lora_expand per layer),
with the collective between shrink and expand. Each device's pool holds only its share: a KV page
keeps the g tokens of a full-model page, g x (its kv width) of the H numbers; an adapter takes as
many pages as on one device (r ceil(I / H) + r ceil(O / H) per target, paging.py), each page
holding only its rows and columns, from the start of each row. Bytes communicated are
counted per collective as the size of the tensor it leaves on each device.
Simplified: greedy sampling only; only the slora mode (and base) is sharded; pages are not made
narrower per device (an A row of q, k or v still needs all H input features), nor fewer: a
device's share of a row of gate's or up's B^T or of down's A (ffn_dim / W numbers) fills the
first of the row's ceil(ffn_dim / H) pages, the last ones stay empty; an error in a step ends the
group (engine.py survives it on one device; here the peers would wait in collectives).
Launch: `python serve.py --tp 2` spawns the processes here; under `torchrun --nproc-per-node 2
serve.py --tp 2` (one node or several) each joins torchrun's group (`join`, env://). The HTTP
server over these ranks, whose requests reach rank 0 only, is tp_serve.py.
Demo: `python serve.py --tp 2 --adapters 100`; `python tp.py --world 2` (what each device holds).
Letters: W devices, k this device, N tokens of a step, L layers, H model dim, r adapter rank,
c = ceil(r / W).
"""
import os
import socket
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import cli
import kernels
from engine import Engine
from memory import PoolMemory
from runner import AdapterSlots, ModelRunner
from model import Llama, ModelConfig
from adapters import HostAdapter, pack
from scheduler import RequestRejected


ROW_PARALLEL = ("o_proj", "down_proj")   # split along their inputs; the others along outputs


class TensorParallelError(RuntimeError):
    """A device of the group failed; the message says which one and why."""


# ---------------------------------------------------------------------- which device holds what

def _part(n: int, world: int, k: int) -> slice:
    """Device k's contiguous share of n items; the first n % world devices get one more."""
    size, extra = divmod(n, world)
    start = k * size + min(k, extra)
    return slice(start, start + size + (k < extra))


def _width(s: slice) -> int:
    return s.stop - s.start


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
            raise ValueError(f"tensor parallelism over {world} devices needs 1 <= devices <= "
                             f"n_kv_heads = {cfg.n_kv_heads}: heads are split by KV-head groups")
        g, hd = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
        heads = _part(cfg.n_kv_heads, world, rank)
        nkv = _width(heads)
        # dim = the width of its q heads, so that head_dim = dim // n_heads stays the model's
        local = replace(cfg, dim=nkv * g * hd, n_heads=nkv * g, n_kv_heads=nkv)
        return Shard(rank, world, slice(heads.start * g * hd, heads.stop * g * hd),
                     slice(heads.start * hd, heads.stop * hd), _part(cfg.ffn_dim, world, rank),
                     _part(cfg.dim, world, rank), local)

    def lora_split(self, target: str) -> tuple:
        """(rows of A, columns of A, columns of B^T) that this device keeps of one target."""
        if target in ROW_PARALLEL:   # its input features (o: its heads, down: its ffn slice), its H
            return slice(None), {"o_proj": self.q, "down_proj": self.ffn}[target], self.out
        # column-parallel: every W-th row of A (so the all-gather puts z in row order), its outputs
        outputs = {"q_proj": self.q, "k_proj": self.kv, "v_proj": self.kv, "gate_proj": self.ffn,
                   "up_proj": self.ffn}[target]
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
        split = ((attn.q_proj, s.q, every), (attn.k_proj, s.kv, every),   # (weight, rows, cols)
                 (attn.v_proj, s.kv, every), (attn.o_proj, every, s.q),
                 (mlp.gate_proj, s.ffn, every), (mlp.up_proj, s.ffn, every),
                 (mlp.down_proj, every, s.ffn))
        if any(type(linear) is not nn.Linear for linear, _, _ in split):
            raise ValueError("shard_model needs a plain base model: LoRA layers would not be split")
        for linear, rows, cols in split:
            _keep(linear, rows, cols)
        attn.cfg = s.local
        attn.all_reduce = mlp.all_reduce = base_all_reduce   # after o_proj, down_proj (model.py)
    return s


class _ShardPages(Mapping):
    """target -> this device's part of an adapter in the full adapter's page format [L, r (C_A +
    C_B), H]: A rows first, then B^T rows, a row over C pages (paging.py); unused parts of the
    pages are zero. Cut when the pool loads the adapter, so host memory keeps each adapter once,
    whole (as S-LoRA's host memory does)."""

    def __init__(self, full: HostAdapter, shard: Shard):
        self.full, self.shard = full, shard

    def __getitem__(self, target):
        a_rows, a_cols, b_cols = self.shard.lora_split(target)
        a = self.full.a(target)[:, a_rows, a_cols]               # [L, c or r, H or its in width]
        bt = self.full.bt(target)[:, :, b_cols]                  # [L, r, its out width]
        return pack(a, bt, self.full.rank, self.full.chunks(target), self.full.dim)

    def __iter__(self):
        return iter(self.full.weights)

    def __len__(self):
        return len(self.full.weights)


# ---------------------------------------------------------------------- the collectives

class Comm:
    """One device's end of the process group. Counts bytes by kind (base, lora, clock): elements
    of the tensor each collective leaves on a device x element size (a ring all-reduce sends
    about 2 (W-1)/W of it)."""

    def __init__(self, rank: int, world: int, device: torch.device):
        self.rank, self.world, self.device = rank, world, device
        self.bytes = {"base": 0, "lora": 0, "clock": 0, "control": 0}

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
        except RuntimeError as e:   # mostly: a peer died, and gloo or NCCL saw its socket close
            raise RuntimeError(f"{op.__name__} failed (if another device stopped, its error is "
                               f"the cause): {e}") from None
        return result


# ---------------------------------------------------------------------- the engine on one device

class ShardedMemory(PoolMemory):
    """The unified pool of one device: each adapter's pages hold this device's share of it."""

    def __init__(self, model: Llama, cfg, shard: Shard):
        if cfg.adapter_dtype != "float":   # each device would scale its share of a row alone
            raise ValueError(f"adapter_dtype {cfg.adapter_dtype!r} is not implemented under "
                             "tensor parallelism; serve int8 adapter rows on one device")
        self.shard = shard
        super().__init__(model, cfg)

    def store(self, adapter: HostAdapter):
        super().store(adapter)   # checks the whole adapter against the model
        # The whole adapter's widths: they fix its pages, which hold this device's share.
        self.pool.host[adapter.name] = HostAdapter(adapter.name, adapter.rank, adapter.scale,
                                                   _ShardPages(adapter, self.shard), adapter.out,
                                                   adapter.inp)


class ShardedRunner(ModelRunner):
    """The model runner on one device's shard: LoRA as S-LoRA's Figure 4."""

    def __init__(self, model: Llama, pool, comm: Comm, shard: Shard):
        super().__init__(model, pool)
        self.comm, self.shard = comm, shard
        self.b_widths = {t: _width(shard.lora_split(t)[2]) for t in self.out_dim}   # its B^T cols
        # o, down: a delta [N, H], zeros but in its columns
        self.out_dim = {**self.b_widths, **{t: model.config.dim for t in ROW_PARALLEL}}

    def lora(self, slots: AdapterSlots):
        """S-LoRA's Figure 4 on this device's pages: shrink, the collective, expand."""
        if not slots.names:
            return None
        s, W, plans = self.shard, self.comm.world, {}   # target -> (shrink's plan, expand's plan)
        seg_starts, seg_adapter = slots.segments()

        def plan(t, ranks):
            return kernels.plan_lora(self.pool.tensor[0], t.page_ids, t.a_start, t.b_start, ranks,
                                     t.scales, seg_starts, seg_adapter, int(ranks.max()),
                                     per_token=not slots.prefill, a_chunks=t.a_chunks,
                                     b_chunks=t.b_chunks)
        for target, t in self.pool.kernel_tables(slots.names).items():   # the same on every device
            full = plan(t, t.ranks)     # expand: r rows of B^T; shrink of o, down: r rows of A
            shrink = full if target in ROW_PARALLEL else plan(t, (t.ranks + W - 1) // W)   # c rows
            plans[target] = shrink, full

        def lora(x, layer, target):
            if target not in plans:
                return None
            (shrink_plan, full), pool_l = plans[target], self.pool.tensor[layer]
            if target in ROW_PARALLEL:   # x [N, its in width]: partial x A^T [N, r], summed
                z = self.comm.all_reduce(kernels.lora_shrink(x, pool_l, shrink_plan), "lora")
                delta = x.new_zeros(x.shape[0], self.out_dim[target])   # the others' columns: 0
                delta[:, s.out] = kernels.lora_expand(z, pool_l, full, _width(s.out))
                return delta
            z = self.comm.all_gather(kernels.lora_shrink(x, pool_l, shrink_plan), "lora")
            z = z.permute(1, 2, 0).reshape(x.shape[0], -1)  # [W, N, c] -> [N, c W]: column i W + k
            # is row i W + k of A, the order of B^T's rows
            return kernels.lora_expand(z, pool_l, full, self.out_dim[target])
        return lora


class ShardedEngine(Engine):
    """engine.Engine (slora) on one device's shard (the model passed through shard_model)."""

    def __init__(self, model: Llama, comm: Comm, shard: Shard, eos_id=None, **options):
        self.comm, self.shard = comm, shard
        self.step_bytes = []                        # (base, lora) bytes of each step
        super().__init__(model, eos_id, **options)

    def _make_memory(self) -> PoolMemory:
        return ShardedMemory(self.model, self.cfg, self.shard)

    def _make_runner(self) -> ModelRunner:
        return ShardedRunner(self.model, self.pool, self.comm, self.shard)

    def now(self) -> float:
        """Rank 0's clock on every device: all see the same arrivals and deadlines, so all agree."""
        t = torch.tensor([super().now()], dtype=torch.float64, device=self.comm.device)
        return float(self.comm.broadcast(t, "clock"))

    def _validate(self, prompt, adapter, max_new_tokens, params, stop_ids):
        super()._validate(prompt, adapter, max_new_tokens, params, stop_ids)
        if params.temperature != 0:
            raise RequestRejected("tensor parallelism samples greedily (temperature 0): the "
                                  "devices pick their tokens without talking")

    def _fail(self, rec, what: str, error: Exception):
        """Not survived here: the other devices may not have failed, and their collectives would
        wait for this one. The error ends the group (launch)."""
        raise error

    def step(self) -> bool:
        before = self.comm.bytes["base"], self.comm.bytes["lora"]
        ran = super().step()
        if ran:
            self.step_bytes.append((self.comm.bytes["base"] - before[0],
                                    self.comm.bytes["lora"] - before[1]))
        return ran


# ---------------------------------------------------------------------- processes

def launch(world: int, fn, *args, timeout_s: float = 300.0, device_type: Optional[str] = None):
    """Run fn(comm, *args) in `world` processes joined in one group: NCCL on GPUs, gloo on a CPU
    (device_type None: GPUs when present). Started by torchrun (WORLD_SIZE in the environment),
    this process is one of them: it joins the group torchrun set up (`join`). Otherwise it spawns
    them on this machine. An error in one ends them all and raises here, naming the device that
    failed first: the others fail after it, their collectives missing a partner, and spawn
    reports whichever process it notices first, so each device records its own error with the
    time, and the earliest is the cause."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if "WORLD_SIZE" in os.environ:
        return join(world, fn, *args, timeout_s=timeout_s, device_type=device_type)
    if device_type == "cuda" and torch.cuda.device_count() < world:
        raise ValueError(f"{world} devices asked for, {torch.cuda.device_count()} GPUs present")
    with socket.socket() as sock:   # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="tp-errors-") as errors:
        try:
            mp.spawn(_worker, args=(world, port, timeout_s, device_type, errors, fn, args),
                     nprocs=world, join=True)
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            raise TensorParallelError(_first_error(Path(errors), e)) from None


def join(world: int, fn, *args, timeout_s: float, device_type: str):
    """One rank started by torchrun: rendezvous and ranks from its environment (env://), device
    cuda:LOCAL_RANK, threads torchrun's. An error raises here; torchrun ends the others."""
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if size != world:
        raise TensorParallelError(f"--tp {world}, but torchrun started {size} processes "
                                  f"(WORLD_SIZE = --nnodes x --nproc-per-node must equal --tp)")
    if device_type == "cuda" and torch.cuda.device_count() <= local:
        raise TensorParallelError(f"rank {rank}: LOCAL_RANK {local}, but this node has "
                                  f"{torch.cuda.device_count()} GPUs")
    device = _device(device_type, local)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                            timeout=timedelta(seconds=timeout_s))
    try:
        fn(Comm(rank, world, device), *args)
    except TensorParallelError:
        raise
    except Exception as e:
        raise TensorParallelError(f"rank {rank}: {type(e).__name__}: {e}") from e
    finally:
        dist.destroy_process_group()


def _device(device_type: str, local_rank: int) -> torch.device:
    if device_type != "cuda":
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _first_error(errors: Path, e: Exception) -> str:
    """The earliest error a device recorded; else spawn's word on the process that ended first
    (one that never reached fn: killed, or its imports failed, as its output above shows)."""
    recorded = [p.read_text().split("\n", 1) for p in errors.glob("rank*.txt")]   # [time, error]
    if recorded:
        return min(recorded, key=lambda rec: float(rec[0]))[1]
    return f"rank {e.error_index}: {str(e).strip()} before running fn (see its output above)"


def _worker(rank, world, port, timeout_s, device_type, errors, fn, args):
    device = _device(device_type, rank)
    if device.type == "cpu":   # the processes share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout_s))
        fn(Comm(rank, world, device), *args)
    except Exception as e:
        # Written before this process exits, hence before its peers lose their connections to it.
        record, draft = Path(errors) / f"rank{rank}.txt", Path(errors) / f"rank{rank}.tmp"
        draft.write_text(f"{time.time():.6f}\nrank {rank}: {type(e).__name__}: {e}")
        draft.replace(record)   # whole or absent when launch reads it
        raise
    dist.destroy_process_group()


# ---------------------------------------------------------------------- demo: who holds what

@dataclass
class DescribeConfig:
    world: int = cli.flag(2, "number of devices W")
    adapter_rank: int = cli.flag(16, "rank r of the example adapter")


def describe(cfg: ModelConfig, world: int, r: int):
    """What each device holds of the model and of a rank-r adapter, and what it sends per token."""
    g, W, c, H = cfg.n_heads // cfg.n_kv_heads, world, -(-r // world), cfg.dim
    for k in range(W):
        s = Shard.of(cfg, k, W)
        q, kv, f, h = (_width(x) for x in (s.q, s.kv, s.ffn, s.out))
        print(f"device {k}: q_proj [{q}, {H}] k_proj, v_proj [{kv}, {H}] o_proj [{H}, {q}] "
              f"gate, up [{f}, {H}] down [{H}, {f}]; KV page: {g} tokens x {kv} = {g * kv} of {H}\n"
              f"          rank-{r} adapter: q/k/v A [{c}, {H}], B^T [{r}, {q}/{kv}/{kv}]; "
              f"o A [{r}, {q}], B^T [{r}, {h}]; gate/up A [{c}, {H}], B^T [{r}, {f}]; "
              f"down A [{r}, {f}], B^T [{r}, {h}]")
    print(f"per token and layer: base all-reduces 2 x {H} numbers; LoRA on q, k, v, o: "
          f"3 all-gathers of {W} x {c} + one all-reduce of {r} = {3 * W * c + r} numbers; "
          f"on all seven: 5 all-gathers + 2 all-reduces = {5 * W * c + 2 * r} numbers")


if __name__ == "__main__":
    demo, = cli.parse([DescribeConfig], "How tensor parallelism splits SmolLM2-135M and an adapter.")
    describe(ModelConfig(), demo.world, demo.adapter_rank)
