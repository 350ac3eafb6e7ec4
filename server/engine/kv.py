"""Per-request key/value caches as plain tensors: pad, stack, select and trim rows.

A `KV` is one `(keys, values)` pair per layer, each `[B, H_kv, L, d]`. Rows are LEFT-padded
with zeros; an attention mask `[B, L]` (1 = real) travels beside it. Zero padding is finite,
so masked columns can never poison a row with NaN. DynamicCache is only built around a KV
for a forward pass (`to_cache`) and read back after it (`from_cache`).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

KV = list[tuple[torch.Tensor, torch.Tensor]]


def to_cache(kv: KV | None) -> DynamicCache:
    """A DynamicCache holding `kv` (copied: the forward pass grows it by concatenation)."""
    if not kv:
        return DynamicCache()
    return DynamicCache(ddp_cache_data=kv)


def from_cache(cache: DynamicCache) -> KV:
    """The tensors of a DynamicCache made of plain (non-sliding, non-quantized) layers."""
    kv = []
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise NotImplementedError(f"cache layer {type(layer).__name__} is not supported by the batching engine")
        kv.append((layer.keys, layer.values))
    return kv


def length(kv: KV | None) -> int:
    return kv[0][0].shape[2] if kv else 0


def pad_left(kv: KV, n: int) -> KV:
    """Prepend `n` zero columns to every layer: [B, H, L, d] -> [B, H, n+L, d]."""
    if n == 0:
        return kv
    out = []
    for k, v in kv:
        zk = k.new_zeros(k.shape[0], k.shape[1], n, k.shape[3])
        zv = v.new_zeros(v.shape[0], v.shape[1], n, v.shape[3])
        out.append((torch.cat([zk, k], dim=2), torch.cat([zv, v], dim=2)))
    return out


def stack_rows(
    parts: list[tuple[KV | None, torch.Tensor]], template: KV | None = None
) -> tuple[KV | None, torch.Tensor]:
    """Concatenate (kv, mask) parts on the batch axis, left-padding each to the longest.

    A part's kv may be None (no cached columns: its mask is `[b, 0]`); `template` (or any
    non-empty part) gives the layer shapes for the zeros it needs.
    """
    width = max(mask.shape[1] for _, mask in parts)
    if width == 0:
        return None, torch.cat([mask for _, mask in parts], dim=0)
    shape_of = template or next(kv for kv, _ in parts if kv)
    padded, masks = [], []
    for kv, mask in parts:
        rows = mask.shape[0]
        if kv is None:
            kv = [
                (k.new_zeros(rows, k.shape[1], 0, k.shape[3]), v.new_zeros(rows, v.shape[1], 0, v.shape[3]))
                for k, v in shape_of
            ]
        missing = width - mask.shape[1]
        padded.append(pad_left(kv, missing))
        masks.append(torch.cat([mask.new_zeros(rows, missing), mask], dim=1))  # [b, width]
    layers = [
        (torch.cat([p[i][0] for p in padded], dim=0), torch.cat([p[i][1] for p in padded], dim=0))
        for i in range(len(padded[0]))
    ]
    return layers, torch.cat(masks, dim=0)


def select_rows(kv: KV | None, index: torch.Tensor) -> KV | None:
    """Keep the rows in `index` (a 1-D LongTensor): [B, ...] -> [len(index), ...]."""
    if kv is None:
        return None
    return [(k.index_select(0, index), v.index_select(0, index)) for k, v in kv]


def trim_left(kv: KV | None, mask: torch.Tensor) -> tuple[KV | None, torch.Tensor]:
    """Drop leading columns that are padding in every row."""
    if mask.shape[1] == 0:
        return kv, mask
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if used.numel() else mask.shape[1]
    if start == 0:
        return kv, mask
    if kv is not None:
        kv = [(k[:, :, start:].contiguous(), v[:, :, start:].contiguous()) for k, v in kv]
    return kv, mask[:, start:]


def nbytes(kv: KV | None) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv) if kv else 0


class StackedRows:
    """The running rows as one left-padded KV, re-stacked on every change and grown by
    DynamicCache's concatenation: the plain way, kept as the reference for RowSlots (slots.py),
    with the same interface."""

    def __init__(self):
        self.kv: KV | None = None
        self.mask: torch.Tensor | None = None  # [B, L]
        self._cache: DynamicCache | None = None

    def join(self, kv: KV, mask: torch.Tensor) -> None:
        running = [] if self.mask is None else [(self.kv, self.mask)]
        self.kv, self.mask = stack_rows(running + [(kv, mask)])

    def keep(self, rows: list[int]) -> None:
        if not rows:
            self.clear()
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.kv, self.mask = trim_left(select_rows(self.kv, index), self.mask.index_select(0, index))

    def clear(self) -> None:
        self.kv, self.mask = None, None

    def open_columns(self, count: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        positions = self.mask.sum(dim=1, keepdim=True)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], count)], dim=1)
        return self.mask, positions

    def cache(self) -> DynamicCache:
        self._cache = to_cache(self.kv)
        return self._cache

    def advance(self, count: int = 1) -> None:
        self.kv, self._cache = from_cache(self._cache), None
