"""The torch backend: the transformers model itself, fp32, rows left-padded in one cache.

    cache columns  [pad][template head + soft prompt (cached prefix)][pad][tail][generated...]

with a mask marking real columns and explicit position ids (= real tokens before a token), so
every row computes exactly what it would compute alone (runner.py). Prefixes come from the
byte-bounded PrefixCache (prefill.py); finished rows are cut out and the cache compacted.
"""

from __future__ import annotations

import torch

from core.modeling import FrozenModel
from server.engine import kv as kvops
from server.engine import runner
from server.engine.prefill import Prefiller
from server.engine.prefix_cache import PrefixCache
from server.engine.sequence import GenerationRequest, Sequence


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
    ):
        self.model, self.growing_cache = frozen.model, growing_cache
        self.prefix_cache = prefix_cache or PrefixCache(max_bytes=1 << 30)
        self.prefiller = Prefiller(frozen, self.prefix_cache, use_prefix_cache=use_prefix_cache, pad_id=pad_id)
        self.cache = None  # DynamicCache [B, H, L, d] per layer
        self.mask: torch.Tensor | None = None  # [B, L]

    def prefill(self, requests: list[GenerationRequest]) -> tuple[object, torch.Tensor]:
        kv, mask, logits = self.prefiller.prefill(requests)
        return (kv, mask), logits

    def join(self, state: object, seqs: list[Sequence]) -> None:
        kv, mask = state
        running = [] if self.cache is None else [(kvops.from_cache(self.cache), self.mask)]
        kv, mask = kvops.stack_rows(running + [(kv, mask)])
        self.cache, self.mask = self._decode_cache(kv, seqs), mask

    def discard(self, state: object) -> None:
        pass  # nothing outside the state's own tensors

    def decode(self, tokens: list[int]) -> torch.Tensor:
        logits, self.cache, self.mask = runner.decode_step(self.model, tokens, self.mask, self.cache)
        return logits

    def keep(self, rows: list[int], seqs: list[Sequence]) -> None:
        if not rows:
            self.clear()
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        kv = kvops.select_rows(kvops.from_cache(self.cache), index)
        kv, mask = kvops.trim_left(kv, self.mask.index_select(0, index))
        self.cache, self.mask = self._decode_cache(kv, seqs), mask

    def clear(self) -> None:
        self.cache, self.mask = None, None

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
        }

    def close(self) -> None:
        self.clear()

    def _decode_cache(self, kv: kvops.KV, seqs: list[Sequence]):
        """The cache the decode steps append to: room for the longest remaining generation."""
        if not self.growing_cache:
            return kvops.to_cache(kv)
        spare = max(s.params.max_new_tokens - len(s.ids) for s in seqs) + 1
        return kvops.to_growing_cache(kv, spare)
