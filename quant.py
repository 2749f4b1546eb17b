"""int8 adapter rows in the unified pool: S-LoRA (Sheng et al. 2023, arXiv 2311.03285) closes
with quantizing the adapters as future work; this file does it for the pool's pages (section 4).

A decode step that serves many distinct adapters reads every adapter row of its batch in every
layer, so its floor is bytes (docs/results.md): an int8 row is a quarter of the bytes of a float32
one. How the pool holds adapter rows is one of two classes: FloatRows (as they come, in the pool's
dtype, a page each) and Int8Rows (quantized when they enter the pool, k to a page). paging.py
picks one by PoolConfig.adapter_dtype; kernels.py reads either (its INT8 variants); serve.py's
slora-int8 mode and int8_bench.py measure them.
Letters: L layers, P pages, H page width (model dim), k int8 rows per page.
Simplified: symmetric int8 (no zero point: LoRA's A and B are centred), round to nearest.
Demo: `python int8_bench.py --adapter runs/e2e/adapter` (int8 against float on a real adapter).
"""
from typing import Optional, Tuple

import torch


class FloatRows:
    """Adapter rows stored as they come, in the pool's dtype: row id = page, H numbers each."""
    per_page = 1

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor                                                  # [L, P, H]
        self.number_bytes = tensor.element_size()            # bytes a kernel reads per number

    def write(self, rows, w: torch.Tensor):
        """Rows `rows` of every layer := w [L, n, H]."""
        self.tensor[:, rows] = w.to(self.tensor.dtype)

    def stacked(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """What the kernels read, all layers: (rows [L, P, H], row_scale None)."""
        return self.tensor, None

    def layer(self, l: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """What kernels.lora_apply reads for layer l: (pool_l [P, H], row_scale None)."""
        return self.tensor[l], None


class Int8Rows:
    """Adapter rows in int8 (S-LoRA's conclusion names quantizing adapters as future work): a
    pool row of H numbers w is kept as q = round(w / s) in [-127, 127] with one float32 s =
    max|w| / 127, and the kernels dequantize it as they read it (w ~ q s). One scale per row of
    A and of B^T (a row wider than a page, down's A or gate's and up's B^T, gets one per page of
    it), because a row is what the kernels read: with one scale per tensor the largest row would
    set the step of every other (the E2E adapter's rows peak between 0.016 and 0.089,
    docs/results.md); one per group of 32-128 numbers (as int4 weight formats keep) would add a
    scale load to every tile of the inner loop, for an error int8 does not need to shrink. k
    int8 rows fill the bytes of one page (4 of a float32 one, 2 of a bfloat16 one): row k p + i
    is bytes i H .. i H + H - 1 of page p, so a rank-r adapter takes a quarter (a half) of the
    pages, and any free page still serves KV or adapters. The scales [L, k P] live here beside
    the pool (0.7% of its bytes at H = 576)."""

    def __init__(self, tensor: torch.Tensor):
        L, P, H = tensor.shape
        self.per_page = tensor.element_size()                 # k: 4 for float32, 2 for bfloat16
        self.q = tensor.view(torch.int8).view(L, P * self.per_page, H)          # [L, k P, H]
        self.scale = torch.zeros(L, P * self.per_page, dtype=torch.float32, device=tensor.device)
        self.number_bytes = 1 + 4 / H                        # an int8, and its row's scale shared

    def write(self, rows, w: torch.Tensor):
        self.q[:, rows], self.scale[:, rows] = quantize_rows(w)

    def stacked(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(int8 rows [L, k P, H], row_scale [L, k P])."""
        return self.q, self.scale

    def layer(self, l: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(int8 rows [k P, H], row_scale [k P]) of layer l."""
        return self.q[l], self.scale[l]


def quantize_rows(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: w [..., H] -> q int8 [..., H], s float32 [...], w ~ q s."""
    w = w.float()
    s = w.abs().amax(-1) / 127                                                 # [...]
    q = torch.round(w / s.clamp_min(torch.finfo(torch.float32).tiny)[..., None])
    return q.clamp(-127, 127).to(torch.int8), s


ROWS = {"float": FloatRows, "int8": Int8Rows}
