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
        if type(layer) not in (DynamicLayer, GrowingLayer):
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


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys/values live in a buffer with spare room at the end.

    Appending a decode step writes one column instead of re-concatenating the whole cache
    (which `DynamicLayer.update` does every step); the buffer doubles when full.
    `keys`/`values` are views `[B, H, L, d]` of the filled part.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, spare: int):
        super().__init__()
        batch, heads, filled, dim = keys.shape
        self._k = keys.new_empty(batch, heads, filled + spare, dim)
        self._v = values.new_empty(batch, values.shape[1], filled + spare, values.shape[3])
        self._k[:, :, :filled] = keys
        self._v[:, :, :filled] = values
        self._filled = filled
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._publish()

    def _publish(self) -> None:
        self.keys, self.values = self._k[:, :, : self._filled], self._v[:, :, : self._filled]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[2]
        if self._filled + new > self._k.shape[2]:
            grow = max(self._k.shape[2], new)
            self._k = torch.cat([self._k, self._k.new_empty(*self._k.shape[:2], grow, self._k.shape[3])], dim=2)
            self._v = torch.cat([self._v, self._v.new_empty(*self._v.shape[:2], grow, self._v.shape[3])], dim=2)
        self._k[:, :, self._filled : self._filled + new] = key_states
        self._v[:, :, self._filled : self._filled + new] = value_states
        self._filled += new
        self._publish()
        return self.keys, self.values


def to_growing_cache(kv: KV, spare: int) -> DynamicCache:
    """A DynamicCache over `kv` with room for `spare` more columns per layer (for decoding)."""
    cache = DynamicCache()
    cache.layers = [GrowingLayer(k, v, spare) for k, v in kv]
    return cache
