"""Linear layers whose weights are pre-packed for oneDNN (CPU, fp32).

A decode step multiplies one row per running request by every weight matrix of the model.
For such few-row products MKL's plain `sgemm` (what `F.linear` calls on CPU) reads the weights
far below the memory bandwidth; oneDNN's kernels on a weight reordered once into their
blocked layout come close to it. These are the ops PyTorch's own inductor uses for frozen fp32
linears on CPU whose batch size varies (`torch.ops.mkldnn._reorder_linear_weight` and
`_linear_pointwise`, which this module calls directly; for a fixed batch size inductor takes
MKL's packed sgemm, which a paired A/B measured slower on this kind of host).
`bench/decode_ab.py --variant packed` measures a decode step both ways, side by side, on the
same rows.

The results equal the plain call's up to float rounding (another kernel may sum in another
order, as batch size already does). The packed copy is taken once. The layer keeps a reference
to the weight it packed, so that memory cannot be handed to another tensor, and serves from the
copy only while its weight is still that tensor with the same in-place version. Once the weight
has been replaced or changed in place (`model.to(...)`, `load_state_dict`, `weight.add_(...)`),
the layer drops the copy and takes `F.linear` from then on; writes through `weight.data`
bypass the version counter and are not detected. Inputs that need gradients or are not fp32
take `F.linear` too, and weights made under `torch.inference_mode` (no version counter) are
not packed. Packing costs one extra copy of the linear weights in memory.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from server.engine.fused_linear import FusedLinear

logger = logging.getLogger(__name__)


def packing_available(model: nn.Module) -> bool:
    """oneDNN's packed linear exists in this torch build and the model is fp32 on the CPU."""
    ops = getattr(torch.ops, "mkldnn", None)
    has_ops = (
        torch.backends.mkldnn.is_available()
        and ops is not None
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )
    param = next(model.parameters(), None)
    return bool(has_ops and param is not None and _packable(param))


def _packable(weight: torch.Tensor) -> bool:
    """fp32 on the CPU, and made outside `torch.inference_mode` (such tensors keep no in-place
    version, so a packed copy could not tell when they change)."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and not weight.is_inference()


class PackedLinear(nn.Linear):
    """An `nn.Linear` (same weight and bias objects) with a copy of its weight packed for oneDNN.

    `rows` is the row count the layout is chosen for (the engine's batch size); any row count
    works. The packed copy is a plain attribute, not a buffer: it is not saved, and moving the
    module leaves it behind, which the check in `forward` notices.
    """

    def __init__(self, linear: nn.Linear, rows: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.rows = linear.in_features, linear.out_features, rows
        self.weight, self.bias = linear.weight, linear.bias  # shared (tied embeddings stay tied)
        # what was packed, kept alive so its memory cannot be reused by a later weight
        self._sources = tuple(t.detach() for t in (linear.weight, linear.bias) if t is not None)
        self._packed: torch.Tensor | None = torch.ops.mkldnn._reorder_linear_weight(self._sources[0], rows)
        self._packed_from = self._weight_state()
        self.packed_calls = 0  # forwards that took the packed path (diagnostics, tests)

    def _weight_state(self) -> tuple:
        """Storage and in-place version of the weight and bias. A packed weight always has a version;
        one replaced by an inference tensor (which keeps none) reads None, so it never matches."""
        return tuple(
            (t.data_ptr(), None if t.is_inference() else t._version) for t in (self.weight, self.bias) if t is not None
        )

    @property
    def is_packed(self) -> bool:
        """Whether the layer still serves from its packed copy."""
        return self._packed is not None

    def _still_packed(self) -> bool:
        if self._packed is not None and self._weight_state() != self._packed_from:
            logger.info(
                "PackedLinear(%d -> %d): weight replaced or changed in place since packing; F.linear from now on",
                self.in_features,
                self.out_features,
            )
            self._packed, self._sources = None, ()
        return self._packed is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)
        )
        if needs_grad or x.dtype != torch.float32 or not self._still_packed():
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
            if type(child) is nn.Linear and _packable(child.weight):
                setattr(parent, name, PackedLinear(child, rows))
                added += child.weight.numel() * child.weight.element_size()
            elif (
                isinstance(child, FusedLinear)
                and type(child.group.product) is nn.Linear
                and _packable(child.group.product.weight)
            ):
                product = child.group.product
                child.group.product = PackedLinear(product, rows)
                added += product.weight.numel() * product.weight.element_size()
    if added:
        logger.info("packed %.0f MB of linear weights for oneDNN (row count hint %d)", added / 2**20, rows)
    return added
