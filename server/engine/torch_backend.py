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
from server.engine import runner
from server.engine.kv import StackedRows
from server.engine.prefill import Prefiller
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
            "prefix_cache": self.prefix_cache.stats(),
            **({"input_cache": self.input_cache.stats()} if self.input_cache is not None else {}),
        }

    def close(self) -> None:
        self.clear()
