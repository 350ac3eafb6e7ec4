"""Linear layers whose weights are pre-packed for MKL's small-batch GEMM (CPU decode steps).

A decode step multiplies one row per running request by every weight matrix of the model.
For those few-row products MKL's packed GEMM (`cblas_sgemm_pack`, the path PyTorch's own
inductor uses for frozen fp32 linears on CPU) is faster than the plain call; its results are
the plain call's up to float rounding (a different kernel may sum in another order), as
batch size already changes them. `bench/engine_bench.py` measures both, side by side.

A packed weight serves one row count. Decode batches with more than half that many rows are
zero-padded up to it (each output row depends only on its own input row, so padding changes
nothing but cost); other shapes (prefill, small batches) and anything that needs gradients
take the ordinary `F.linear` on the same, shared weight. Packing costs one extra copy of the
linear weights in memory.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def packing_available(model: nn.Module) -> bool:
    """MKL packed GEMM exists in this torch build and the model is fp32 on the CPU."""
    ops = getattr(torch.ops, "mkl", None)
    has_ops = torch.backends.mkl.is_available() and ops is not None and hasattr(ops, "_mkl_linear")
    param = next(model.parameters(), None)
    return bool(has_ops and param is not None and param.device.type == "cpu" and param.dtype == torch.float32)


class PackedLinear(nn.Linear):
    """An `nn.Linear` (same weight and bias objects) with an MKL-packed copy for `rows` rows."""

    def __init__(self, linear: nn.Linear, rows: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.rows = linear.in_features, linear.out_features, rows
        self.weight, self.bias = linear.weight, linear.bias  # shared (tied embeddings stay tied)
        packed = torch.ops.mkl._mkl_reorder_linear_weight(linear.weight.detach(), rows)
        self.register_buffer("packed_weight", packed, persistent=False)
        self.packed_calls = 0  # forwards that took the packed path (diagnostics, tests)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel() // self.in_features
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if needs_grad or not self.rows // 2 < n <= self.rows or x.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        self.packed_calls += 1
        flat = x.reshape(n, self.in_features)
        if n < self.rows:
            flat = torch.cat([flat, flat.new_zeros(self.rows - n, self.in_features)])
        out = torch.ops.mkl._mkl_linear(flat, self.packed_weight, self.weight.detach(),
                                        None if self.bias is None else self.bias.detach(), self.rows)
        return out[:n].reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, packed_rows={self.rows}"


def pack_linear_layers(model: nn.Module, rows: int) -> int:
    """Swap every `nn.Linear` of `model` for a `PackedLinear` serving `rows` rows, in place.

    Returns the bytes of the weights that were packed (0 when packing is not available here):
    the packed copies take about as much again. Layers that are already packed are left as
    they are, so calling it twice is harmless.
    """
    if rows < 2 or not packing_available(model):
        return 0
    added = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                packed = PackedLinear(child, rows)
                setattr(parent, name, packed)
                added += child.weight.numel() * child.weight.element_size()
    if added:
        logger.info("packed %.0f MB of linear weights for %d-row decode steps", added / 2**20, rows)
    return added
