"""One GEMM for the projections that read the same input: q/k/v, and the MLP's gate/up.

A decode step multiplies a few rows by every weight matrix of the model. Each product is a
separate MKL call whose threads have to wake and meet again, so fewer, wider products are
cheaper. vLLM's `QKVParallelLinear` and `MergedColumnParallelLinear` fuse the same groups.
Here the model is left as transformers built it: each projection becomes a `FusedLinear`
whose weight is a view into its group's concatenated matrix, which replaces the separate
weights (freed, or, for a model mapped from its safetensors file, left as file pages the
kernel can drop). The first projection of a group to see an input computes the whole group's
output; the others return their columns of it. `bench/decode_ab.py --variant fused` measures it against the
plain layers, side by side.

The results equal the separate products up to float rounding (a wider GEMM may sum in
another order, as batch size already does). An input that needs gradients (training through
a served model) takes the plain `F.linear` on the same weight view, and so does a layer whose
weight no longer lives in the group's matrix (after `model.to(...)` or
`load_state_dict(assign=True)` replaced it): fuse last, after moving the model.
"""

from __future__ import annotations

import logging
import threading

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # attribute names, Llama family


class FusedGroup:
    """The concatenated weight of several projections and the last output computed with it.

    `product` is the one `nn.Linear` over the concatenated weight (a plain tensor the members'
    weights are views of); `pack_linear_layers` may swap it for a packed one.
    """

    def __init__(self, linears: list[nn.Linear]):
        with torch.inference_mode(False):  # ordinary tensors even when fused under inference mode: the
            # model's weights become views of these, and inference tensors could not be trained through
            self.weight = torch.cat([linear.weight.detach() for linear in linears])  # [sum(out), in]
            self.bias = torch.cat([linear.bias.detach() for linear in linears]) if linears[0].bias is not None else None
        self.product = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None, device="meta")
        self.product.weight = nn.Parameter(self.weight, requires_grad=False)  # the same storage, no copy
        self.product.bias = None if self.bias is None else nn.Parameter(self.bias, requires_grad=False)
        self.bounds = [0]
        for linear in linears:
            self.bounds.append(self.bounds[-1] + linear.out_features)
        self._last = threading.local()  # per thread: a forward in another thread never sees it

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Projection `index` of `x`: the group's product is computed once per input tensor."""
        last = self._last
        if getattr(last, "x", None) is not x:
            last.x, last.out, last.pending = x, self.product(x), len(self.bounds) - 1
        out = last.out[..., self.bounds[index] : self.bounds[index + 1]]
        last.pending -= 1
        if last.pending <= 0:  # every member has taken its part: hold no tensors between steps
            last.x = last.out = None
        return out


class FusedLinear(nn.Linear):
    """An `nn.Linear` whose weight (and bias) are views into its `FusedGroup`'s matrix."""

    def __init__(self, linear: nn.Linear, group: FusedGroup, index: int):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        start, end = group.bounds[index], group.bounds[index + 1]
        self.weight = nn.Parameter(group.weight[start:end], requires_grad=linear.weight.requires_grad)
        self.bias = (
            None if group.bias is None else nn.Parameter(group.bias[start:end], requires_grad=linear.bias.requires_grad)
        )
        self.group, self.index = group, index
        self._view_ptr = self.weight.data_ptr()  # where the view starts in the group's matrix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        if self.weight.data_ptr() != self._view_ptr:  # the parameter was replaced: the group's copy is stale
            return F.linear(x, self.weight, self.bias)
        return self.group.output(x, self.index)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fused={self.index}/{len(self.group.bounds) - 1}"


def fuse_projections(model: nn.Module) -> int:
    """Fuse every q/k/v and gate/up group of plain `nn.Linear`s with one input size, in place.

    Returns how many groups were fused. Groups that are already fused or packed, mix biased
    and unbiased layers or have trainable weights are left as they are, so calling it twice is
    harmless. Call it after moving the model (`.to(device, dtype)`): a moved layer falls back
    to its own weight and the group's product is no longer shared. Pack after fusing:
    `pack_linear_layers` packs each group's product too.
    """
    fused = 0
    for module in list(model.modules()):
        for names in GROUPS:
            linears = [getattr(module, name, None) for name in names]
            if not all(type(linear) is nn.Linear for linear in linears):
                continue
            if (
                len({linear.in_features for linear in linears}) != 1
                or len({linear.bias is None for linear in linears}) != 1
            ):
                continue
            if any(param.requires_grad for linear in linears for param in linear.parameters()):
                continue
            group = FusedGroup(linears)
            for index, (name, linear) in enumerate(zip(names, linears)):
                setattr(module, name, FusedLinear(linear, group, index))
            fused += 1
    if fused:
        logger.info("fused %d projection groups (q/k/v, gate/up) into one GEMM each", fused)
    return fused
