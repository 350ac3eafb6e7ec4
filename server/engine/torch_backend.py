"""The torch backend: the transformers model itself, fp32, the running rows in one cache.

    cache columns  [pad][template head + soft prompt (cached prefix)][pad][tail][generated...]

with a mask marking real columns and explicit position ids (= real tokens before a token), so
every row computes exactly what it would compute alone (runner.py). Prefixes come from the
byte-bounded PrefixCache (prefill.py); the rows live in buffers that rows join and leave in
place (slots.py), or, with `growing_cache=False`, in a DynamicCache re-stacked on every change
(the reference the tests compare against).
"""

from __future__ import annotations

import torch

from core.modeling import FrozenModel
from server.engine import kv as kvops
from server.engine import packed, runner
from server.engine.attention import packs_prefills
from server.engine.kv import StackedRows
from server.engine.prefill import PrefilledRow, Prefiller
from server.engine.prefix_cache import PrefixCache
from server.engine.sequence import GenerationRequest, Sequence
from server.engine.slots import RowSlots


class TorchBackend:
    name = "torch"

    def __init__(
        self,
        frozen: FrozenModel,
        *,
        pad_id: int,
        prefix_cache: PrefixCache | None = None,
        use_prefix_cache: bool = True,
        growing_cache: bool = True,
        input_cache: PrefixCache | None = None,
    ):
        self.model = frozen.model
        self.prefix_cache = prefix_cache or PrefixCache(max_bytes=1 << 30)
        self.input_cache = input_cache
        self.prefiller = Prefiller(
            frozen, self.prefix_cache, use_prefix_cache=use_prefix_cache, pad_id=pad_id, inputs=input_cache
        )
        self.rows = RowSlots() if growing_cache else StackedRows()
        self.frozen = frozen

    def prefill(self, requests: list[GenerationRequest]) -> tuple[object, torch.Tensor]:
        kv, mask, logits = self.prefiller.prefill(requests)
        return (kv, mask), logits

    def join(self, state: object, seqs: list[Sequence]) -> None:
        kv, mask = state
        self.rows.join(kv, mask)

    def discard(self, state: object) -> None:
        pass  # nothing outside the state's own tensors

    def decode(self, tokens: list[int]) -> torch.Tensor:
        mask, positions = self.rows.open_columns(1)
        logits = runner.decode_step(self.model, tokens, positions, mask, self.rows.cache())
        self.rows.advance(1)
        return logits

    # ---------------------------------------------------------------- prefill inside a decode step
    def packs(self, requests: list[GenerationRequest]) -> bool:
        """Whether these new rows are best prefilled inside a decode step of the running ones
        (packed.py): rows run, the model packs, and some new row needs the model (when every whole
        input is in the input cache there is no pass to share)."""
        if not (isinstance(self.rows, RowSlots) and self.rows.rows > 0 and packs_prefills(self.model)):
            return False
        return any(not self.prefiller.holds(request) for request in requests)

    def prepare_beside(self, request: GenerationRequest) -> PrefilledRow | tuple:
        """What a new row brings to a packed pass: its whole prefill from the input cache, or
        (prefix key/values or None, embeddings to compute [t, D]). Touches no running row, so a
        failure here (a prefix that cannot be computed) concerns this row only."""
        return self.prefiller.cached(request) or self.prefiller.row_inputs(request)

    def step_beside(
        self, requests: list[GenerationRequest], prepared: list, tokens: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass: the running rows' next `tokens` and the new rows' prefill. The new rows
        join after the running ones. Returns (new rows' last logits [b, V], running rows' [R, V])."""
        slots, running = self.rows, self.rows.rows
        parts, lengths, inputs = [], [], []
        for row in prepared:
            if isinstance(row, PrefilledRow):  # nothing to compute: it joins, and skips this column
                parts.append((row.kv, row.mask))
                lengths.append(0)
                continue
            prefix, embeds = row
            width = embeds.shape[0]
            parts.append(_reserve(prefix, width - 1, slots.buffers))
            lengths.append(width)
            inputs.append(embeds)
        if parts:
            slots.join(*kvops.stack_rows(parts, template=slots.buffers))
        _, positions = slots.open_columns(1)  # [n, 1]: each row's last new token's position
        for j, length in enumerate(lengths):
            if length == 0:
                slots.mask_buffer[running + j, slots.width] = 0
        plan = packed.plan(slots, running, lengths)
        token_ids = torch.tensor(tokens, dtype=torch.long, device=positions.device)
        embeds = torch.cat([self.frozen.embedding(token_ids)] + inputs).unsqueeze(0)  # [1, N, D]
        ranges = [positions[:running, 0]] + [
            positions[s.row, 0] - s.length + 1 + torch.arange(s.length, device=positions.device) for s in plan.segments
        ]
        logits = runner.packed_step(self.model, embeds, torch.cat(ranges).unsqueeze(0), plan, packed.cache(slots, plan))
        slots.advance(1)
        computed = iter(logits[running:])
        new_logits = []
        for j, (request, row) in enumerate(zip(requests, prepared)):
            if isinstance(row, PrefilledRow):
                new_logits.append(row.logits[0].clone())  # a copy: sampling may change it
                continue
            last = next(computed)
            if self.input_cache is not None:
                self.prefiller.remember(request, self._prefilled(running + j, lengths[j] + kvops.length(row[0]), last))
            new_logits.append(last)
        return (torch.stack(new_logits) if new_logits else logits[:0]), logits[:running]

    def _prefilled(self, row: int, length: int, logits: torch.Tensor) -> PrefilledRow:
        """A new row's key/values (its last `length` columns) and logits, as the input cache keeps them."""
        end = self.rows.width
        kv = [
            (k[row : row + 1, :, end - length : end].clone(), v[row : row + 1, :, end - length : end].clone())
            for k, v in self.rows.buffers
        ]
        mask = self.rows.mask_buffer[row : row + 1, end - length : end].clone()
        return PrefilledRow(kv, mask, logits[None].clone())

    def keep(self, rows: list[int], seqs: list[Sequence]) -> None:
        self.rows.keep(rows)

    def clear(self) -> None:
        self.rows.clear()

    def prewarm(self, prompt_key: tuple | None, head_ids: tuple[int, ...], soft: torch.Tensor | None) -> bool:
        return self.prefiller.prewarm(prompt_key, head_ids, soft)

    def fits(self, requests: list[GenerationRequest]) -> bool:
        return True  # the cache grows with the rows; the batch size is the bound

    def set_threads(self, threads: int) -> None:
        torch.set_num_threads(threads)  # per thread under OpenMP: the engine's thread calls it

    def stats(self) -> dict:
        return {
            "backend": self.name,
            "attention": self.model.config._attn_implementation,
            "packs_prefills": packs_prefills(self.model),
            "prefix_cache": self.prefix_cache.stats(),
            **({"input_cache": self.input_cache.stats()} if self.input_cache is not None else {}),
        }

    def close(self) -> None:
        self.clear()


def _reserve(prefix: kvops.KV | None, count: int, template: kvops.KV) -> tuple[kvops.KV, torch.Tensor]:
    """A new row's prefix key/values with `count` zero columns after it (the columns its tokens
    but the last will fill; the last goes in the column the pass opens), and its mask [1, P+count]."""
    layers = []
    for i, (keys, values) in enumerate(template):
        k, v = prefix[i] if prefix else (keys[:1, :, :0], values[:1, :, :0])
        zk = k.new_zeros(1, k.shape[1], count, k.shape[3])
        zv = v.new_zeros(1, v.shape[1], count, v.shape[3])
        layers.append((torch.cat([k, zk], dim=2), torch.cat([v, zv], dim=2)))
    width = layers[0][0].shape[2]
    return layers, torch.ones(1, width, dtype=torch.long, device=template[0][0].device)
