"""The running rows' key/values, kept in place: rows join, decode and leave without copying the batch.

Every layer has one buffer `[rows capacity, H_kv, columns capacity, d]`; the running rows are
buffer rows `0..n-1` and their columns `0..width-1` (a mask `[n, width]` marks the real ones,
1 = real). Each decode step writes one column for every row. Because each row's positions
come from its own mask (the real tokens before a column) and attention reads only the real
columns, a row may have holes: that is what lets every change touch only the rows it concerns.

- join: the new rows' key/values are written into the free buffer rows, right-aligned at the
  current width (a longer newcomer widens the batch; the others get masked columns there);
- keep: a leaving row's buffer row is overwritten by a row moved from the end (the batch
  removes rows that way, batch.py), so only moved rows are copied;
- compaction: when holes make the width exceed the longest row by HOLE_COLUMNS, every row's
  real columns are gathered to the left (one copy of the rows, amortised over the 32 or more
  steps that made the holes; about 19 ms for 16 rows of the default model, so under 1 ms a step),
  which also bounds the memory the buffers hold to about the longest row plus 32 columns, doubled;
- the buffers grow by doubling (rows and columns) and are dropped when the batch empties.

Before, a join re-stacked the whole batch into a fresh cache and a leaving row re-selected it:
16-30 ms per change beside a 48-71 ms decode step (the default model, 4-16 rows), and with
short requests some row joins or leaves almost every step. Masked columns hold zeros or an
earlier row's values, always finite, so they can never poison a row with NaN.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from server.engine.kv import KV

HOLE_COLUMNS = 32  # compaction once the width exceeds the longest row by this many columns


class SlotLayer(DynamicLayer):
    """One layer's keys/values of the running rows: views into its RowSlots buffer. A forward
    pass appends at the batch's width (`update`); the slots advance the width after it."""

    def __init__(self, slots: RowSlots, layer: int):
        super().__init__()
        self.slots, self.layer = slots, layer
        keys, values = slots.buffers[layer]
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        n, width = slots.rows, slots.width
        self.keys, self.values = keys[:n, :, :width], values[:n, :, :width]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = self.slots.buffers[self.layer]
        n, width, new = self.slots.rows, self.slots.width, key_states.shape[2]
        keys[:n, :, width : width + new] = key_states
        values[:n, :, width : width + new] = value_states
        self.keys, self.values = keys[:n, :, : width + new], values[:n, :, : width + new]
        return self.keys, self.values


class RowSlots:
    def __init__(self):
        self.buffers: KV | None = None  # per layer (keys, values) [R, H, C, d]
        self.mask_buffer: torch.Tensor | None = None  # [R, C], 1 = real
        self.rows = 0
        self.width = 0

    @property
    def mask(self) -> torch.Tensor:
        """[n, width] view of the running rows' mask."""
        return self.mask_buffer[: self.rows, : self.width]

    def capacity(self) -> tuple[int, int]:
        if self.buffers is None:
            return 0, 0
        return self.mask_buffer.shape[0], self.mask_buffer.shape[1]

    # ------------------------------------------------------------ changes of rows
    def join(self, kv: KV, mask: torch.Tensor) -> None:
        """Add rows (their key/values [b, H, L, d] per layer, mask [b, L]) after the running ones,
        right-aligned at the width."""
        b, length = mask.shape
        if self.rows == 0:
            self.width = 0
        width = max(self.width, length)
        self._reserve(self.rows + b, width + 1, like=kv, mask_like=mask)
        n = self.rows
        if width > self.width:  # the running rows get masked columns where the batch widened
            self.mask_buffer[:n, self.width : width] = 0
        start = width - length
        for (keys, values), (k, v) in zip(self.buffers, kv):
            keys[n : n + b, :, start:width] = k
            values[n : n + b, :, start:width] = v
        self.mask_buffer[n : n + b, :start] = 0
        self.mask_buffer[n : n + b, start:width] = mask
        self.rows, self.width = n + b, width

    def keep(self, rows: list[int]) -> None:
        """Keep the running rows `rows`, in that order (buffer row j takes row rows[j]); only rows
        whose place changes are copied. Rows that move down (a swap-remove, an order-keeping removal)
        are copied one by one; any other order is gathered first."""
        moved = [(to, source) for to, source in enumerate(rows) if to != source]
        width = self.width
        if moved and all(source > to for to, source in moved):  # ascending: no source is overwritten before it is read
            for keys, values in self.buffers:
                for to, source in moved:
                    keys[to, :, :width].copy_(keys[source, :, :width])
                    values[to, :, :width].copy_(values[source, :, :width])
            for to, source in moved:
                self.mask_buffer[to, :width].copy_(self.mask_buffer[source, :width])
        elif moved:
            to = torch.tensor([m[0] for m in moved], device=self.mask_buffer.device)
            source = torch.tensor([m[1] for m in moved], device=self.mask_buffer.device)
            for keys, values in self.buffers:
                keys[to, :, :width] = keys[source, :, :width]  # the right side is gathered first
                values[to, :, :width] = values[source, :, :width]
            self.mask_buffer[to, :width] = self.mask_buffer[source, :width]
        self.rows = len(rows)
        if self.rows == 0:
            self.clear()
        elif self.width > int(self.mask.sum(dim=1).max()) + HOLE_COLUMNS:
            self.compact()

    def clear(self) -> None:
        self.buffers, self.mask_buffer, self.rows, self.width = None, None, 0, 0

    def compact(self) -> None:
        """Gather every row's real columns to the left, in order, right-aligned: the holes go."""
        n, width = self.rows, self.width
        real = self.mask.bool()  # [n, W]
        counts = real.sum(dim=1)  # [n]
        length = int(counts.max())
        columns = torch.arange(width, device=real.device)
        ordered = torch.where(real, columns, columns + width).sort(dim=1).values[:, :length]  # real first, in order
        shift = (length - counts).unsqueeze(1)  # [n, 1] leading padding of each row
        place = torch.arange(length, device=real.device).unsqueeze(0)  # [1, L]
        index = ordered.gather(1, (place - shift).clamp_min(0))  # [n, L]
        keep = place >= shift  # [n, L]
        index = torch.where(keep, index, torch.zeros_like(index))  # padding reads column 0: finite, masked
        for keys, values in self.buffers:
            gather = index[:, None, :, None].expand(n, keys.shape[1], length, keys.shape[3])
            keys[:n, :, :length] = keys[:n, :, :width].gather(2, gather)
            values[:n, :, :length] = values[:n, :, :width].gather(2, gather)
        self.mask_buffer[:n, :length] = keep.to(self.mask_buffer.dtype)
        self.width = length

    # ------------------------------------------------------------ a forward pass over the rows
    def open_columns(self, count: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Make room for `count` new columns of every row and mark them real. Returns (mask [n, W+count]
        for the forward pass, positions [n, 1] of the first new token: the real tokens before it)."""
        positions = self.mask.sum(dim=1, keepdim=True)
        self._reserve(self.rows, self.width + count)
        self.mask_buffer[: self.rows, self.width : self.width + count] = 1
        return self.mask_buffer[: self.rows, : self.width + count], positions

    def cache(self) -> DynamicCache:
        """A DynamicCache over the running rows: a forward pass appends at the width."""
        cache = DynamicCache()
        cache.layers = [SlotLayer(self, i) for i in range(len(self.buffers))]
        return cache

    def advance(self, count: int = 1) -> None:
        """The forward pass wrote `count` columns: they belong to the rows now."""
        self.width += count

    # ------------------------------------------------------------ room
    def _reserve(self, rows: int, columns: int, like: KV | None = None, mask_like: torch.Tensor | None = None) -> None:
        """Buffers with room for `rows` x `columns`, grown by doubling; what is held is kept."""
        have_rows, have_columns = self.capacity()
        if rows <= have_rows and columns <= have_columns:
            return
        new_rows = max(rows, 2 * have_rows) if rows > have_rows else have_rows
        new_columns = max(columns, 2 * have_columns) if columns > have_columns else have_columns
        template = self.buffers or like
        shapes = [shape for k, v in template for shape in ((k.shape[1], k.shape[3]), (v.shape[1], v.shape[3]))]
        # one allocation for every layer: large enough that the allocator maps it on its own and gives
        # it back to the system when the buffers grow again or the batch empties
        flat = template[0][0].new_zeros(sum(new_rows * heads * new_columns * dim for heads, dim in shapes))
        parts = iter(flat.split([new_rows * heads * new_columns * dim for heads, dim in shapes]))
        buffers = []
        for k, v in template:
            keys = next(parts).view(new_rows, k.shape[1], new_columns, k.shape[3])
            values = next(parts).view(new_rows, v.shape[1], new_columns, v.shape[3])
            if self.buffers is not None:
                keys[: self.rows, :, : self.width] = k[: self.rows, :, : self.width]
                values[: self.rows, :, : self.width] = v[: self.rows, :, : self.width]
            buffers.append((keys, values))
        mask = (self.mask_buffer if self.mask_buffer is not None else mask_like).new_zeros(new_rows, new_columns)
        if self.mask_buffer is not None:
            mask[: self.rows, : self.width] = self.mask
        self.buffers, self.mask_buffer = buffers, mask
