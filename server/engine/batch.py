"""The running batch: its rows (sequences) in order, stepped together on a backend (backend.py).

Rows join after a prefill, decode one token per step together, and leave as soon as they
finish. The backend keeps what the model computed for them in the same order; this class
chooses the tokens (sampling.py), records them and sends the events. Every stage fails only
the rows it concerns.
"""

from __future__ import annotations

import logging

import torch

from server.engine.backend import Backend
from server.engine.errors import EngineError
from server.engine.sampling import choose_tokens, rows_logprobs
from server.engine.sequence import Sequence

logger = logging.getLogger(__name__)


class Batch:
    def __init__(self, backend: Backend, counters: dict):
        self.backend, self.counters = backend, counters
        self.seqs: list[Sequence] = []

    def __len__(self) -> int:
        return len(self.seqs)

    def join(self, new: list[Sequence], state: object, logits: torch.Tensor) -> None:
        """Add prefilled rows (the backend's state for them and their last logits [b, V]): choose
        their first tokens, then merge them into the batch. On failure the running batch stays as
        it was; the caller retires rows that finished with their first token (`retire_finished`)."""
        self.advance(new, logits)
        self.backend.join(state, self.seqs + new)
        self.seqs += new

    def join_beside(self, new: list[Sequence], prepared: list) -> None:
        """Prefill `new` rows inside a decode step of the running ones (one forward pass,
        packed.py): every running row gets its next token, the new rows their first, and the new
        rows join; the caller retires rows that finished (`retire_finished`). A failure here fails
        every row: the pass had already changed the shared state."""
        seqs = self.seqs
        try:
            new_logits, logits = self.backend.step_beside([s.request for s in new], prepared, [s.ids[-1] for s in seqs])
        except Exception as exc:
            logger.exception("a decode step with %d new rows over %d running rows failed", len(new), len(seqs))
            self.fail_all(EngineError(f"Decoding failed: {exc}"))
            for s in new:
                self.fail(s.request, EngineError(f"Prefill failed: {exc}"))
            return
        self._count_step(seqs + new)
        self.advance(seqs, logits)
        self.advance(new, new_logits)
        self.seqs = seqs + new

    def step(self) -> None:
        """One decode step for every row."""
        seqs = self.seqs
        try:
            logits = self.backend.decode([s.ids[-1] for s in seqs])
        except Exception as exc:  # the shared batch state is unknown now: every row in it fails
            logger.exception("decode step over %d rows failed", len(seqs))
            self.fail_all(EngineError(f"Decoding failed: {exc}"))
            return
        self._count_step(seqs)
        self.advance(seqs, logits)
        self.retire_finished()

    def _count_step(self, seqs: list[Sequence]) -> None:
        self.counters["decode_steps"] += 1
        self.counters["max_batch_size_seen"] = max(self.counters["max_batch_size_seen"], len(seqs))
        for s in seqs:
            s.max_batch = max(s.max_batch, len(seqs))

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
        """Rows that finished, were cancelled or failed leave; the backend keeps the others' rows only."""
        done = {
            i for i, s in enumerate(self.seqs) if s.finish_reason is not None or s.request.cancelled or s.request.closed
        }
        if not done:
            return
        for i in sorted(done):
            if not self.seqs[i].request.closed:
                self.seqs[i].finish()
                self.counters["requests_finished"] += 1
        keep = swap_remove_order(len(self.seqs), done)
        self.seqs = [self.seqs[i] for i in keep]
        self.backend.keep(keep, self.seqs)

    def fail(self, request, error: Exception) -> None:
        if not request.closed:
            self.counters["requests_failed"] += 1
        request.fail(error)

    def fail_all(self, error: Exception) -> None:
        for s in self.seqs:
            self.fail(s.request, error)
        self.seqs = []
        try:
            self.backend.clear()
        except Exception:  # the rows are gone either way; the next prefill starts from a clean slate
            logger.exception("could not clear the backend's rows")


def swap_remove_order(count: int, done: set[int]) -> list[int]:
    """The rows that stay, as the new order: a leaving row's place goes to a staying row from the
    end, so the backend moves as few rows as there are leaving rows below the new length."""
    staying = count - len(done)
    order = list(range(staying))
    movers = (i for i in range(staying, count) if i not in done)
    for hole in sorted(i for i in done if i < staying):
        order[hole] = next(movers)
    return order
