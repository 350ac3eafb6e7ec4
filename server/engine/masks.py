"""Attention masks for models whose layers look back through a sliding window (Mistral v0.1,
Gemma 2 and 3, Qwen2 with `use_sliding_window`, Phi-3 with a window).

The engine keeps every layer's whole key/value history and lays rows out with padding inside
them (`[pad][prefix][pad][tail][generated...]`, runner.py), so a window counted in cache
columns, as transformers counts it, would reach too few tokens back in a row with inner
padding. Here the window is counted in each row's real token positions instead: a query at
position p sees the keys at positions p - window + 1 .. p, exactly what the row would see
alone in plain transformers. The masks are built by transformers' own mask functions (so they
come in the format the model's attention implementation expects) with the window as an extra
condition over positions. Models without sliding layers get the plain 2-D mask, unchanged.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import create_causal_mask

from core.prepend import position_ids

SLIDING, FULL = "sliding_attention", "full_attention"


def sliding_window(config) -> int | None:
    """The window of the model's sliding layers, or None when no layer has one."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or (layer_types is not None and SLIDING not in layer_types):
        return None
    return int(window)


def within_window(positions: torch.Tensor, window: int):
    """A mask function (transformers' signature) that keeps keys fewer than `window` real tokens
    behind the query; `positions` [B, L] is every cache column's position in its row."""

    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return positions[batch_idx, kv_idx] > positions[batch_idx, q_idx] - window

    return inner


def attention_mask(model, inputs_embeds: torch.Tensor, mask: torch.Tensor, cache):
    """What to pass as `attention_mask` for a forward over `inputs_embeds` [B, q, D] on top of
    `cache` (its columns first in `mask` [B, L+q]): the 2-D mask itself for models without a
    sliding window; else the masks by layer type (models with `layer_types`) or the one sliding
    mask (every layer slides)."""
    config = model.config
    window = sliding_window(config)
    if window is None:
        return mask
    common = {"config": config, "inputs_embeds": inputs_embeds, "attention_mask": mask, "cache": cache}
    sliding = create_causal_mask(
        **common, and_mask_function=within_window(position_ids(mask), window), allow_is_causal_skip=False
    )
    if getattr(config, "layer_types", None) is None:
        return sliding
    return {SLIDING: sliding, FULL: create_causal_mask(**common)}
