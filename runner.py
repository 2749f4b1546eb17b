"""The model runner of S-LoRA's engine (Sheng et al. 2023, arXiv 2311.03285, sections 4-5).

The engine (engine.py) decides who runs; the runner runs them, one step at a time:
    build   the step's requests -> one model.Batch (token ids, positions, sequence ids, page
            tables, cache lengths) and their AdapterSlots: the requests of one adapter side by
            side, so that each adapter is one segment of the LoRA kernels
    lora    the step's LoRA function: y += (alpha/r) (x A^T) B^T for every token (the row form of
            lora.py's h = W0 x + (alpha/r) B A x), kernels.py reading A and B^T straight from the
            pool's pages: MBGMM (a segment per request) when the step has prompts, MBGMV (a
            segment per token) when every request decodes
    run     model.forward_paged -> the logits of each request's last token
    sample  greedy by one argmax, other requests each with its own parameters and generator
The baselines (baselines.py) and tensor parallelism (tp.py) subclass it to change `lora` only.
Simplified: the Batch is built from Python lists each step (a GPU engine keeps it on the device).
Demo: `python serve.py --adapters 20 --duration 3 --layers 4` (every engine runs through it).
Letters: N tokens of a step, R requests, G segments, V vocabulary, H model dim, P pool pages,
I and O input and output width of a target, S adapter slots of a step (slot 0 = base model).
"""
from dataclasses import dataclass
from functools import partial
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch

import kernels
from adapters import target_shapes
from model import Batch, Llama, sample_one


class StepStats(NamedTuple):
    """What one engine step took and read (for the benchmark's bandwidth floor)."""
    seconds: float
    tokens: int            # N
    decode: bool           # every request decoding (no prompt in the step)
    lora_numbers: int      # numbers of A and B^T read per layer: each distinct adapter once
    cached_tokens: int     # tokens whose K and V the step's attention reads


@dataclass
class AdapterSlots:
    """Which adapter each request of a Batch uses. Slot s >= 1 is adapter names[s - 1], slot 0
    the base model; the requests of one adapter are neighbours."""
    names: List[str]
    row_slots: torch.Tensor   # int32 [R]
    lengths: torch.Tensor     # [R] tokens of each request in the step
    prefill: bool             # some request feeds its prompt
    lora_numbers: int         # numbers of A and B^T a layer reads: each adapter once

    def token_slots(self) -> torch.Tensor:   # int32 [N]
        return self.row_slots.repeat_interleave(self.lengths)

    def segments(self):
        """(seg_starts [G + 1], seg_adapter [G]): a segment per request when prefilling (MBGMM),
        a segment per token when decoding (MBGMV, where R = N)."""
        return kernels.segment_starts(self.lengths), self.row_slots


class ModelRunner:
    """One step of the model over the unified pool (paging.UnifiedPool): S-LoRA's LoRA kernels."""

    def __init__(self, model: Llama, pool):
        self.model, self.pool = model, pool
        shapes = target_shapes(model.config)                                    # target -> (I, O)
        self.in_dim = {t: i for t, (i, _) in shapes.items()}
        self.out_dim = {t: o for t, (_, o) in shapes.items()}

    def build(self, rows) -> Tuple[Batch, AdapterSlots]:
        """Records of the step's requests (engine.RequestRecord, one adapter's side by side) ->
        one Batch and their AdapterSlots."""
        tokens, positions, seq_ids, last, row_slots, names = [], [], [], [], [], []
        for row, rec in enumerate(rows):
            req = rec.request
            n, end = req.step_tokens(), req.cache_len()
            tokens += rec.tokens[end - n:end]
            positions += range(end - n, end)
            seq_ids += [row] * n
            last.append(len(tokens) - 1)
            if req.adapter is not None and req.adapter not in names:
                names.append(req.adapter)
            row_slots.append(0 if req.adapter is None else 1 + names.index(req.adapter))
        dev = self.pool.tensor.device
        as_tensor = partial(torch.tensor, dtype=torch.int32, device=dev)
        reqs = [rec.request for rec in rows]
        batch = Batch(as_tensor(tokens).long(), as_tensor(positions), as_tensor(seq_ids),
                      self.pool.block_table([r.id for r in reqs]),
                      as_tensor([r.cache_len() for r in reqs]), as_tensor(last).long())
        lengths = torch.tensor([r.step_tokens() for r in reqs], device=dev)
        host = self.pool.host
        numbers = sum(host[n].rank * (host[n].in_width(t) + host[n].out[t])
                      for n in names for t in host[n].targets)
        prefill = any(r.n_generated == 0 for r in reqs)
        return batch, AdapterSlots(names, as_tensor(row_slots), lengths, prefill, numbers)

    def run(self, batch: Batch, slots: AdapterSlots) -> torch.Tensor:
        with torch.inference_mode():   # no autograd records, no version counters on activations
            return self.model.forward_paged(batch, self.pool.tensor, self.lora(slots))   # [R, V]

    def lora(self, slots: AdapterSlots) -> Optional[Callable]:
        """The step's LoRA function (x [N, I], layer, target) -> delta [N, O] or None: each
        target's tables planned once, then every layer reads its pool pages (kernels.py)."""
        seg_starts, seg_adapter = slots.segments()
        rows0, _ = self.pool.rows.layer(0)              # [P, H] float rows or [k P, H] int8 ones
        plans = {target: kernels.plan_lora(rows0, t.page_ids, t.a_start, t.b_start,
                                           t.ranks, t.scales, seg_starts, seg_adapter,
                                           int(t.ranks.max()), per_token=not slots.prefill,
                                           a_chunks=t.a_chunks, b_chunks=t.b_chunks)
                 for target, t in self.pool.kernel_tables(slots.names).items()}

        def lora(x, layer, target):
            if target not in plans:
                return None
            rows_l, row_scale = self.pool.rows.layer(layer)
            return kernels.lora_apply(x, rows_l, plans[target], self.out_dim[target],
                                      row_scale=row_scale)
        return lora if plans else None

    @staticmethod
    def sample(logits: torch.Tensor, rows) -> List[int]:
        """Greedy rows by one argmax; each other row with its own parameters and generator, so
        that a seeded request draws the same tokens whatever shares its batch."""
        out = logits.argmax(-1).tolist()                                             # [R]
        for i, rec in enumerate(rows):
            if rec.sampling.temperature > 0:
                out[i] = sample_one(logits[i], rec.sampling, rec.generator)
        return out

    @staticmethod
    def stats(seconds: float, batch: Batch, slots: AdapterSlots) -> StepStats:
        return StepStats(seconds, int(batch.tokens.numel()), not slots.prefill,
                         slots.lora_numbers, int(batch.seq_lens.sum()))
