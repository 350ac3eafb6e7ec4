"""The running batch: its rows, their key/value cache and attention mask, stepped by the runner.

Each row is left-padded:

    cache columns  [pad][template head + soft prompt (cached prefix)][pad][tail][generated...]

with a mask marking real columns and explicit position ids (= real tokens before a token), so
every row computes exactly what it would compute alone. Rows join after a prefill, decode one
token per step together, and leave as soon as they finish; the cache is then compacted.
Every stage fails only the rows it concerns.
"""

from __future__ import annotations

import logging

import torch

from server.engine import kv as kvops
from server.engine import runner
from server.engine.errors import EngineError
from server.engine.sampling import choose_tokens, rows_logprobs
from server.engine.sequence import Sequence

logger = logging.getLogger(__name__)


class Batch:
    def __init__(self, model, counters: dict, *, growing_cache: bool = True):
        self.model, self.counters, self.growing_cache = model, counters, growing_cache
        self.seqs: list[Sequence] = []
        self.cache = None  # DynamicCache [B, H, L, d] per layer
        self.mask: torch.Tensor | None = None  # [B, L]

    def __len__(self) -> int:
        return len(self.seqs)

    def join(self, new: list[Sequence], kv: kvops.KV, mask: torch.Tensor, logits: torch.Tensor) -> None:
        """Add prefilled rows (their key/values, mask [b, L] and last logits [b, V]): choose their first
        tokens, then merge them into the batch. On failure the running batch stays as it was; the
        caller retires rows that finished with their first token (`retire_finished`)."""
        self.advance(new, logits)
        running = [] if self.cache is None else [(kvops.from_cache(self.cache), self.mask)]
        kv, mask = kvops.stack_rows(running + [(kv, mask)])
        cache = self._decode_cache(kv, self.seqs + new)
        self.seqs += new
        self.cache, self.mask = cache, mask

    def step(self) -> None:
        """One decode step for every row."""
        seqs = self.seqs
        try:
            logits, cache, mask = runner.decode_step(self.model, [s.ids[-1] for s in seqs], self.mask, self.cache)
        except Exception as exc:  # the shared batch state is unknown now: every row in it fails
            logger.exception("decode step over %d rows failed", len(seqs))
            self.fail_all(EngineError(f"Decoding failed: {exc}"))
            return
        self.cache, self.mask = cache, mask
        self.counters["decode_steps"] += 1
        self.counters["max_batch_size_seen"] = max(self.counters["max_batch_size_seen"], len(seqs))
        for s in seqs:
            s.max_batch = max(s.max_batch, len(seqs))
        self.advance(seqs, logits)
        self.retire_finished()

    def advance(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Choose and record each row's next token (logits [B, V]); a row that fails here fails alone."""
        tokens = choose_tokens(logits, [s.params for s in seqs], [s.generator for s in seqs])
        logprobs = rows_logprobs(logits, tokens, [s.params for s in seqs])
        for row, (s, token) in enumerate(zip(seqs, tokens)):
            if s.request.cancelled or s.request.closed:
                continue
            if isinstance(token, Exception):
                self.fail(s.request, token)
                continue
            try:
                s.push(token, logprobs.get(row))
            except Exception as exc:
                logger.exception("could not record a token")
                self.fail(s.request, EngineError(f"Could not decode the output: {exc}"))
        self.counters["tokens_generated"] += len(seqs)

    def retire_finished(self) -> None:
        """Rows that finished, were cancelled or failed leave; the cache keeps the others' rows only."""
        done = [
            i for i, s in enumerate(self.seqs) if s.finish_reason is not None or s.request.cancelled or s.request.closed
        ]
        if not done:
            return
        for i in done:
            if not self.seqs[i].request.closed:
                self.seqs[i].finish()
                self.counters["requests_finished"] += 1
        keep = [i for i in range(len(self.seqs)) if i not in set(done)]
        self.seqs = [self.seqs[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        kv = kvops.select_rows(kvops.from_cache(self.cache), index)
        kv, mask = kvops.trim_left(kv, self.mask.index_select(0, index))
        self.cache, self.mask = self._decode_cache(kv, self.seqs), mask

    def _decode_cache(self, kv: kvops.KV, seqs: list[Sequence]):
        """The cache the decode steps append to: room for the longest remaining generation."""
        if not self.growing_cache:
            return kvops.to_cache(kv)
        spare = max(s.params.max_new_tokens - len(s.ids) for s in seqs) + 1
        return kvops.to_growing_cache(kv, spare)

    def fail(self, request, error: Exception) -> None:
        if not request.closed:
            self.counters["requests_failed"] += 1
        request.fail(error)

    def fail_all(self, error: Exception) -> None:
        for s in self.seqs:
            self.fail(s.request, error)
        self.seqs, self.cache, self.mask = [], None, None
