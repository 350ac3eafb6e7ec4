"""New rows' prefill inside a decode step: one forward pass for both (chunked prefill).

A prefill pass of its own costs a forward pass's fixed price (on the default model about as
much as a whole decode step, the weights read once) and stalls every running row while it
runs. Here the running rows' next tokens and the new rows' query tokens go through the model
as ONE packed sequence `[1, N]` (N = running rows + the new rows' tokens), as vLLM's chunked
prefill and SARATHI do:

    packed tokens   [r0 r1 ... rR-1 | a0 a1 ... at-1 | b0 ... bu-1 | ...]
    slot columns     running rows write column W; new row a writes its W-t+1 .. W, after its
                     prefix (joined into the slots first, right-aligned at the width)

Every layer's keys/values go straight into the row slots (`PackedLayer.update`), and the
attention (`attend`, called from attention.py) reads each row's own slot: the running rows as
one batched single-token query over their columns (the decode step's own computation), each
new row as a causal query block over its prefix and tail. Positions come from each row's
real columns, so every row computes what it computes alone, up to rounding.

Packing needs the engine's attention function (attention.packs_prefills), a family checked by the
tests (FAMILIES) and full attention in every layer; other models prefill in a pass of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from server.engine.masks import sliding_window
from server.engine.slots import RowSlots

KWARG = "softprompt_packed"  # the forward pass's keyword that carries the Plan down to attention


@dataclass
class Segment:
    """A new row in the packed sequence: its slot row, its first token's index there, its length."""

    row: int
    start: int
    length: int


@dataclass
class Plan:
    """Where every packed token belongs, and the masks attention needs (built once per pass)."""

    rows: int  # slot rows in the pass (running, then new)
    running: int  # rows 0..running-1 have one token each at packed index = row
    segments: list[Segment]
    width: int  # slot columns after this pass (the new column is width - 1)
    running_mask: torch.Tensor  # [R, 1, 1, W] bool
    segment_masks: list[torch.Tensor]  # [1, 1, t, W] bool each

    def last_tokens(self) -> list[int]:
        """The packed index whose logits each row needs: every running token, each segment's last."""
        return list(range(self.running)) + [s.start + s.length - 1 for s in self.segments]


# Families whose attention is exactly what `attend` computes (scaled dot product, grouped heads, no
# sinks, biases or soft-capping), checked token for token by tests/test_packed_prefill.py's matrix.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def full_attention(config) -> bool:
    """Whether `attend` computes this model's attention: a checked family, every layer attending
    to the whole row."""
    return (
        getattr(config, "model_type", None) in FAMILIES
        and sliding_window(config) is None
        and not getattr(config, "attn_logit_softcapping", None)
    )


def plan(slots: RowSlots, running: int, lengths: list[int]) -> Plan:
    """The plan for a pass over the slots' rows after `open_columns(1)`: rows 0..running-1 decode,
    the next len(lengths) rows prefill their last `lengths[j]` columns (0: a row that only joins)."""
    width = slots.width + 1
    mask = slots.mask_buffer[: slots.rows, :width].bool()  # [n, W]
    running_mask = mask[:running, None, None, :]
    segments, masks, start = [], [], running
    columns = torch.arange(width, device=mask.device)
    for j, length in enumerate(lengths):
        if length == 0:
            continue
        row = running + j
        first = width - length
        causal = columns[None, :] <= (first + torch.arange(length, device=mask.device))[:, None]  # [t, W]
        masks.append((mask[row][None, :] & causal)[None, None])
        segments.append(Segment(row, start, length))
        start += length
    return Plan(slots.rows, running, segments, width, running_mask, masks)


class PackedLayer(DynamicLayer):
    """One layer of the slots for a packed pass: `update` writes the packed keys/values into
    their rows' columns and returns the rows' whole buffers (attention picks per row)."""

    def __init__(self, slots: RowSlots, layer: int, plan: Plan):
        super().__init__()
        self.slots, self.layer, self.plan = slots, layer, plan
        keys, values = slots.buffers[layer]
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.keys, self.values = keys[: plan.rows, :, : plan.width - 1], values[: plan.rows, :, : plan.width - 1]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = self.slots.buffers[self.layer]
        plan, last = self.plan, self.plan.width - 1
        running = plan.running
        if running:
            keys[:running, :, last] = key_states[0, :, :running].transpose(0, 1)
            values[:running, :, last] = value_states[0, :, :running].transpose(0, 1)
        for s in plan.segments:
            keys[s.row, :, last - s.length + 1 : last + 1] = key_states[0, :, s.start : s.start + s.length]
            values[s.row, :, last - s.length + 1 : last + 1] = value_states[0, :, s.start : s.start + s.length]
        self.keys, self.values = keys[: plan.rows, :, : plan.width], values[: plan.rows, :, : plan.width]
        return self.keys, self.values


def cache(slots: RowSlots, plan: Plan) -> DynamicCache:
    packed = DynamicCache()
    packed.layers = [PackedLayer(slots, i, plan) for i in range(len(slots.buffers))]
    return packed


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: Plan, scaling: float | None):
    """query [1, H, N, d] packed; key/value [rows, H_kv, W, d] (the slots) -> [1, N, H, d]."""
    parts = []
    if plan.running:
        # One query token per row: the query heads that share a key/value head are that head's
        # queries (head h reads key/value head h // groups), so no head is copied or broadcast.
        running, heads, kv_heads, dim = plan.running, query.shape[1], key.shape[1], query.shape[3]
        q = query[0, :, :running].transpose(0, 1).reshape(running, kv_heads, heads // kv_heads, dim)
        out = F.scaled_dot_product_attention(
            q, key[:running], value[:running], attn_mask=plan.running_mask, scale=scaling
        )  # [R, H_kv, groups, d]
        parts.append(out.reshape(running, heads, dim))
    for s, mask in zip(plan.segments, plan.segment_masks):
        q = query[:, :, s.start : s.start + s.length]  # [1, H, t, d]
        out = F.scaled_dot_product_attention(
            q, key[s.row : s.row + 1], value[s.row : s.row + 1], attn_mask=mask, scale=scaling, enable_gqa=True
        )  # [1, H, t, d]
        parts.append(out[0].transpose(0, 1))  # [t, H, d]
    return torch.cat(parts, dim=0).unsqueeze(0)  # [1, N, H, d]
