"""How new rows are prefilled: each row's fixed block (template head + soft prompt) as cached
key/values when they can be reused, else through the forward pass with the rest of the row.

The choice is made here, once per row, and the runner's pure steps do the work.
"""

from __future__ import annotations

import torch

from core.modeling import FrozenModel
from server.engine import kv as kvops
from server.engine import runner
from server.engine.prefix_cache import PrefixCache
from server.engine.sequence import GenerationRequest


class Prefiller:
    def __init__(self, frozen: FrozenModel, prefix_cache: PrefixCache, *, use_prefix_cache: bool, pad_id: int):
        self.frozen, self.prefix_cache, self.use_prefix_cache, self.pad_id = (
            frozen,
            prefix_cache,
            use_prefix_cache,
            pad_id,
        )

    def prefill(self, requests: list[GenerationRequest]) -> tuple[kvops.KV, torch.Tensor, torch.Tensor]:
        """One forward over every new row's tail on top of its prefix: (kv, mask [b, L], logits [b, V])."""
        pad = self.frozen.embedding(torch.tensor(self.pad_id, device=self.frozen.device))  # [D]
        return runner.prefill(self.frozen.model, [self.row_inputs(request) for request in requests], pad)

    def row_inputs(self, request: GenerationRequest) -> tuple[kvops.KV | None, torch.Tensor]:
        """(prefix key/values or None, the embeddings after them [n, D]) for one new row."""
        tail = runner.embed_tail(self.frozen, request.tail_ids)  # [t, D]
        if self.use_prefix_cache and request.tail_ids and (request.head_ids or request.soft_len):
            return self.prefix(request.prompt_key, request.head_ids, request.soft), tail
        return None, runner.whole_row(runner.embed_block(self.frozen, request.head_ids, request.soft), tail)  # [P+t, D]

    def prefix(self, prompt_key: tuple | None, head_ids: tuple[int, ...], soft: torch.Tensor | None) -> kvops.KV:
        """The fixed block's key/values from the cache, computed and cached on a miss."""
        key = PrefixCache.key(prompt_key, head_ids)
        prefix = self.prefix_cache.get(key)
        if prefix is None:
            prefix = self.compute_prefix(head_ids, soft)
            self.prefix_cache.put(key, prefix)
        return prefix

    def prewarm(self, prompt_key: tuple | None, head_ids: tuple[int, ...], soft: torch.Tensor | None) -> bool:
        """Compute and cache a prefix ahead of use (not a request: neither a hit nor a miss); False if cached."""
        key = PrefixCache.key(prompt_key, head_ids)
        if key in self.prefix_cache:
            return False
        self.prefix_cache.put(key, self.compute_prefix(head_ids, soft))
        return True

    def compute_prefix(self, head_ids: tuple[int, ...], soft: torch.Tensor | None) -> kvops.KV:
        return runner.compute_prefix(self.frozen.model, runner.embed_block(self.frozen, head_ids, soft))
