"""How new rows are prefilled: each row's fixed block (template head + soft prompt) as cached
key/values when they can be reused, else through the forward pass with the rest of the row.

With an input cache, a whole input seen before (same prompt version, template head and query:
a retry, a polling client, a benchmark's fixed body) skips the forward pass altogether: its
key/values and last-token logits are kept from the first time, as automatic prefix caching
does in vLLM and SGLang for whole prompts. Prefill is compute: on the default model a 16-token
query costs about 1.6 ms a token, as much as a decode step for one more row per token.

The choice is made here, once per row, and the runner's pure steps do the work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.modeling import FrozenModel
from server.engine import kv as kvops
from server.engine import runner
from server.engine.prefix_cache import PrefixCache
from server.engine.sequence import GenerationRequest


@dataclass(frozen=True)
class PrefilledRow:
    """One input's prefill, as kept by the input cache: key/values [1, H, L, d] per layer, its mask
    [1, L] and its last-token logits [1, V]."""

    kv: kvops.KV
    mask: torch.Tensor
    logits: torch.Tensor

    def nbytes(self) -> int:
        return kvops.nbytes(self.kv) + self.mask.nbytes + self.logits.nbytes


def input_cache(max_bytes: int) -> PrefixCache | None:
    """An LRU of PrefilledRow bounded by `max_bytes` (None: no input cache)."""
    return PrefixCache(max_bytes, size=PrefilledRow.nbytes) if max_bytes > 0 else None


class Prefiller:
    def __init__(
        self,
        frozen: FrozenModel,
        prefix_cache: PrefixCache,
        *,
        use_prefix_cache: bool,
        pad_id: int,
        inputs: PrefixCache | None = None,
    ):
        self.frozen, self.prefix_cache, self.use_prefix_cache, self.pad_id = (
            frozen,
            prefix_cache,
            use_prefix_cache,
            pad_id,
        )
        self.inputs = inputs  # the input cache (None: off)

    def prefill(self, requests: list[GenerationRequest]) -> tuple[kvops.KV, torch.Tensor, torch.Tensor]:
        """One forward over every new row's tail on top of its prefix, for the rows whose whole input
        is not cached: (kv, mask [b, L], logits [b, V]) in the order of `requests`."""
        if self.inputs is None:
            return self._forward(requests)
        rows = [self.cached(request) for request in requests]
        missing = [i for i, row in enumerate(rows) if row is None]
        if missing:
            kv, mask, logits = self._forward([requests[i] for i in missing])
            for j, i in enumerate(missing):
                row_kv, row_mask = kvops.trim_left(kvops.select_rows(kv, torch.tensor([j])), mask[j : j + 1])
                rows[i] = PrefilledRow(row_kv, row_mask, logits[j : j + 1].clone())
                self.remember(requests[i], rows[i])
            if len(missing) == len(requests):  # none came from the cache: the forward pass's rows as they are
                return kv, mask, logits
        kv, mask = kvops.stack_rows([(row.kv, row.mask) for row in rows])
        return kv, mask, torch.cat([row.logits for row in rows])  # a copy: sampling may change it

    def cached(self, request: GenerationRequest) -> PrefilledRow | None:
        """The input cache's prefill of this whole input, if it holds one."""
        key = self.input_key(request) if self.inputs is not None else None
        return self.inputs.get(key) if key is not None else None

    def holds(self, request: GenerationRequest) -> bool:
        """Whether the input cache holds this whole input (a look, not a use: no hit is counted)."""
        key = self.input_key(request) if self.inputs is not None else None
        return key is not None and key in self.inputs

    def remember(self, request: GenerationRequest, row: PrefilledRow) -> None:
        """Keep a prefill computed elsewhere (a packed pass) in the input cache."""
        key = self.input_key(request) if self.inputs is not None else None
        if key is not None and row.nbytes() <= self.inputs.max_bytes:  # a long input may not stay beyond
            self.inputs.put(key, row)  # the bound as the one entry left

    def _forward(self, requests: list[GenerationRequest]) -> tuple[kvops.KV, torch.Tensor, torch.Tensor]:
        pad = self.frozen.embedding(torch.tensor(self.pad_id, device=self.frozen.device))  # [D]
        return runner.prefill(self.frozen.model, [self.row_inputs(request) for request in requests], pad)

    @staticmethod
    def input_key(request: GenerationRequest) -> tuple | None:
        """What identifies a whole input: the prompt version, the template head and the query
        (None for a soft prompt without a version key: it could change under the same name)."""
        if request.soft is not None and request.prompt_key is None:
            return None
        return (request.prompt_key, "input", tuple(request.head_ids), tuple(request.tail_ids))

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
