"""Linear layers whose weights are pre-packed for oneDNN (CPU, fp32).

A decode step multiplies one row per running request by every weight matrix of the model.
For such few-row products MKL's plain `sgemm` (what `F.linear` calls on CPU) reads the weights
far below the memory bandwidth; oneDNN's kernels on a weight reordered once into their
blocked layout come close to it. This is what PyTorch's own inductor does for frozen fp32
linears on CPU (`torch.ops.mkldnn._reorder_linear_weight` and `_linear_pointwise`, which
this module calls directly). `bench/decode_ab.py --variant packed` measures a decode step
both ways, side by side, on the same rows.

The results equal the plain call's up to float rounding (another kernel may sum in another
order, as batch size already does). The packed copy is taken once; the layer checks that its
weight is still the tensor it packed, unchanged (same storage, same in-place version), and
otherwise, or when the input needs gradients or is not fp32, takes the ordinary `F.linear` on
the same, shared weight. Packing costs one extra copy of the linear weights in memory.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from .fused_linear import FusedLinear

logger = logging.getLogger(__name__)


def packing_available(model: nn.Module) -> bool:
    """oneDNN's packed linear exists in this torch build and the model is fp32 on the CPU."""
    ops = getattr(torch.ops, "mkldnn", None)
    has_ops = (torch.backends.mkldnn.is_available() and ops is not None
               and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))
    param = next(model.parameters(), None)
    return bool(has_ops and param is not None and param.device.type == "cpu" and param.dtype == torch.float32)


class PackedLinear(nn.Linear):
    """An `nn.Linear` (same weight and bias objects) with a copy of its weight packed for oneDNN.

    `rows` is the row count the layout is chosen for (the engine's batch size); any row count
    works. The packed copy is a plain attribute, not a buffer: it is not saved, and moving the
    module leaves it behind, which the checks in `forward` notice.
    """

    def __init__(self, linear: nn.Linear, rows: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.rows = linear.in_features, linear.out_features, rows
        self.weight, self.bias = linear.weight, linear.bias  # shared (tied embeddings stay tied)
        self._packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)
        self._packed_from = self._weight_state()
        self.packed_calls = 0  # forwards that took the packed path (diagnostics, tests)

    def _weight_state(self) -> tuple:
        """Storage and in-place version of the weight and bias (tensors made under
        `torch.inference_mode` keep no version: their storage is all there is to compare)."""
        tensors = (self.weight,) if self.bias is None else (self.weight, self.bias)
        return tuple((t.data_ptr(), None if t.is_inference() else t._version) for t in tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if needs_grad or x.dtype != torch.float32 or self._weight_state() != self._packed_from:
            return F.linear(x, self.weight, self.bias)
        self.packed_calls += 1
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, packed_rows={self.rows}"


def pack_linear_layers(model: nn.Module, rows: int) -> int:
    """Pack every `nn.Linear` of `model`, and the shared product of every fused group, in place.

    Returns the bytes of the weights that were packed (0 when packing is not available here):
    the packed copies take about as much again. Layers that are already packed are left as
    they are, so calling it twice is harmless. Fuse first: fusing skips packed layers.
    """
    if not packing_available(model):
        return 0
    added = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child, rows))
                added += child.weight.numel() * child.weight.element_size()
            elif isinstance(child, FusedLinear) and type(child.group.product) is nn.Linear:
                product = child.group.product
                child.group.product = PackedLinear(product, rows)
                added += product.weight.numel() * product.weight.element_size()
    if added:
        logger.info("packed %.0f MB of linear weights for oneDNN (row count hint %d)", added / 2**20, rows)
    return added
