"""The llama.cpp backend: rows decoded by llama.cpp on the GGUF's own (4-bit) weights.

Each running row is a llama.cpp sequence. A new row is prefilled in position order, as the
torch backend lays it out (core.layout): its template head as tokens, its soft prompt as input
embeddings, its tail as tokens. With the prefix cache on, head + soft prompt are computed once
into a prefix sequence of their own and every row that uses them starts as a copy of it (shared
cells in llama.cpp's unified memory); up to `prefix_slots` prefixes are kept, least recently used
first out, never while a running row still counts on one. Logits come back to torch, so sampling,
seeds and stop strings are the torch engine's own (batch.py).

Room: every row reserves its prompt plus its max_new_tokens of the context's cells when it is
admitted (a cached prefix's cells are counted once, in its slot), so a running row never finds
the memory full; a request that does not fit waits for rows to finish (scheduler.admit).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from core.modeling import FrozenModel
from server.engine.llamacpp_context import Embeds, LlamaContext, Tokens
from server.engine.prefix_cache import PrefixCache
from server.engine.sequence import GenerationRequest, Sequence

logger = logging.getLogger(__name__)


@dataclass
class Row:
    seq: int  # the llama.cpp sequence id
    pos: int  # the position its next token takes
    cells: int  # the cells it reserved (its own positions, prefix excluded when shared)
    slot: Slot | None = None  # the prefix it copied, if any


@dataclass
class Slot:
    seq: int
    length: int
    users: int = 0  # running rows that copied it


class PrefixSlots:
    """Prefixes (head + soft prompt) kept as llama.cpp sequences; PrefixCache's keys and stats."""

    def __init__(self, seqs: list[int]):
        self.free = list(seqs)
        self.items: OrderedDict[tuple, Slot] = OrderedDict()
        self.doomed: list[Slot] = []  # evicted by another thread: dropped by the engine's thread
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    def __contains__(self, key: tuple) -> bool:
        with self._lock:
            return key in self.items

    def cells(self) -> int:
        with self._lock:
            return sum(slot.length for slot in self.items.values()) + sum(slot.length for slot in self.doomed)

    def evict_prompt(self, name: str, version: int | None = None) -> int:
        """Forget the prefixes of a deleted prompt (its memory is freed at the engine's next step)."""
        with self._lock:
            doomed = [k for k in self.items if k[0] is not None and k[0][0] == name and version in (None, k[0][1])]
            self.doomed += [self.items.pop(k) for k in doomed]
            return len(doomed)

    def close(self) -> None:
        self.rows = []
        self.ctx.close()

    def stats(self) -> dict:
        with self._lock:
            return {
                "entries": len(self.items),
                "bytes": 0,  # llama.cpp's memory is sized once, at start (its cells, below)
                "cells": sum(slot.length for slot in self.items.values()),
                "max_bytes": 0,
                "hits": self.hits,
                "misses": self.misses,
            }


@dataclass
class Start:
    """A new row being started: the runs before its tail (when its prefix is not a cached copy),
    its tail's run, and the logits of its last position when it has no tail."""

    row: Row
    heads: list[Tokens] = field(default_factory=list)
    softs: list[Embeds] = field(default_factory=list)
    tail: Tokens | None = None
    logits: np.ndarray | None = None


class LlamaCppBackend:
    name = "llamacpp"

    def __init__(
        self,
        frozen: FrozenModel,
        gguf: Path,
        *,
        max_rows: int,
        kv_tokens: int,
        prefix_slots: int = 8,
        use_prefix_cache: bool = True,
        threads: int | None = None,
        flash_attention: str = "auto",
    ):
        self.frozen, self.use_prefix_cache = frozen, use_prefix_cache
        n_ctx = max(kv_tokens, frozen.context_length)  # any single request the server accepts fits alone
        self.ctx = LlamaContext(
            gguf,
            n_ctx=n_ctx,
            n_seq_max=max_rows + prefix_slots,
            threads=threads or torch.get_num_threads(),
            flash_attention=flash_attention,
        )
        hidden = frozen.embedding.weight.shape[1]
        if self.ctx.n_embd != hidden:
            self.ctx.close()
            raise ValueError(f"{gguf} has {self.ctx.n_embd}-wide embeddings, the loaded model {hidden}: not one model")
        self.vocab = frozen.model.get_output_embeddings().weight.shape[0]
        # Soft prompts are what the embedding module outputs; llama.cpp scales what it is given as
        # its embedding weight's rows (Gemma: sqrt(hidden)), so it gets them unscaled. Measured on
        # many rows, so one all-zero row (a padding token's) cannot make it 0/0.
        probe = list(range(min(64, frozen.embedding.weight.shape[0])))
        weight_rows = frozen.embedding.weight[probe].float()
        self.input_scale = float(frozen.token_embeddings(probe).float().norm() / weight_rows.norm())
        self.free = list(range(max_rows))
        self.prefix_cache = PrefixSlots(list(range(max_rows, max_rows + prefix_slots)))
        self.rows: list[Row] = []
        logger.info(
            "llama.cpp engine on %s: %d cells, %d rows + %d prefix slots", gguf, self.ctx.n_ctx, max_rows, prefix_slots
        )

    # ------------------------------------------------------------ rows
    def prefill(self, requests: list[GenerationRequest]) -> tuple[object, torch.Tensor]:
        self._drop_doomed()
        new: list[Row] = []
        try:
            heads, softs, tails = [], [], []
            for request in requests:
                start = self._start(request, new)
                heads += start.heads
                softs += start.softs
                tails += [start.tail] if start.tail else []
            logits: dict[int, np.ndarray] = {}
            for runs in (heads, softs, tails):  # positions in order: a run sees what came before it
                for index, values in self.ctx.run(runs).items():
                    logits[runs[index].seq] = values
            return new, self._logits([logits[row.seq] for row in new])
        except BaseException:
            self.discard(new)
            raise

    def _start(self, request: GenerationRequest, new: list[Row]) -> Start:
        """A new row for `request` (appended to `new` at once, so a failure can release it), its prefix
        copied from a cached one or left as head and soft-prompt runs, and its tail's run."""
        row = Row(self.free.pop(), 0, request.prompt_tokens + request.params.max_new_tokens)
        new.append(row)
        start = Start(row)
        tail = request.tail_ids
        if self.use_prefix_cache and tail and (request.head_ids or request.soft_len):
            key = PrefixCache.key(request.prompt_key, request.head_ids)
            slot = row.slot = self._prefix(key, request.head_ids, request.soft)
            slot.users += 1
            self.ctx.copy(slot.seq, row.seq)
            row.pos, row.cells = slot.length, row.cells - slot.length
        else:
            soft, last = self._soft(request.soft), not tail
            if request.head_ids:
                start.heads.append(Tokens(row.seq, 0, request.head_ids, logits=last and soft is None))
            if soft is not None:
                start.softs.append(Embeds(row.seq, len(request.head_ids), soft, logits=last))
            row.pos = len(request.head_ids) + request.soft_len
        if tail:
            start.tail = Tokens(row.seq, row.pos, tail, logits=True)
            row.pos += len(tail)
        return start

    # ------------------------------------------------------------ new rows inside a decode step
    def packs(self, requests: list[GenerationRequest]) -> bool:
        """Whether new rows' tails can ride the running rows' next decode step (one llama_decode)."""
        return bool(self.rows)  # no input cache here: every new row is computed

    def prepare_beside(self, request: GenerationRequest) -> Start:
        """A new row with everything before its tail computed (its prefix copied, or its head and soft
        prompt run); the tail waits for the packed step. Running rows are not touched."""
        self._drop_doomed()
        new: list[Row] = []
        try:
            start = self._start(request, new)
            for runs in (start.heads, start.softs):
                for _, values in self.ctx.run(runs).items():
                    start.logits = values  # the last run's, when there is no tail
            return start
        except BaseException:
            self.discard(new)
            raise

    def step_beside(
        self, requests: list[GenerationRequest], prepared: list[Start], tokens: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The running rows' next `tokens` and the new rows' tails in one batch; the new rows join.
        Returns (new rows' last logits [b, V], running rows' [R, V])."""
        rows = self.rows
        runs = [Tokens(r.seq, r.pos, [token], logits=True) for r, token in zip(rows, tokens)]
        tails = [start.tail for start in prepared if start.tail]
        try:
            out = self.ctx.run(runs + tails)
        except BaseException:
            self.discard([start.row for start in prepared])
            raise
        for row in rows:
            row.pos += 1
        computed = iter(range(len(runs), len(runs) + len(tails)))
        new = [out[next(computed)] if start.tail else start.logits for start in prepared]
        self.rows = rows + [start.row for start in prepared]
        return self._logits(new), self._logits([out[i] for i in range(len(runs))])

    def join(self, state: object, seqs: list[Sequence]) -> None:
        self.rows += state

    def discard(self, state: object) -> None:
        for row in state:
            self._release(row)

    def decode(self, tokens: list[int]) -> torch.Tensor:
        rows = self.rows
        logits = self.ctx.step([r.seq for r in rows], [r.pos for r in rows], tokens)
        for row in rows:
            row.pos += 1
        return self._logits(logits)

    def keep(self, rows: list[int], seqs: list[Sequence]) -> None:
        kept = set(rows)
        for i, row in enumerate(self.rows):
            if i not in kept:
                self._release(row)
        self.rows = [self.rows[i] for i in rows]

    def clear(self) -> None:
        for row in self.rows:
            self._release(row)
        self.rows = []

    def fits(self, requests: list[GenerationRequest]) -> bool:
        """Whether these new rows' prompts, prefixes and generations fit the cells left."""
        need = sum(r.prompt_tokens + r.params.max_new_tokens for r in requests)
        if self._reserved() + need <= self.ctx.n_ctx:
            return True
        self._evict_unused(self._reserved() + need - self.ctx.n_ctx)
        return self._reserved() + need <= self.ctx.n_ctx

    def _reserved(self) -> int:
        """Cells reserved by running rows and held by cached prefixes."""
        return sum(row.cells for row in self.rows) + self.prefix_cache.cells()

    # ------------------------------------------------------------ prefixes
    def prewarm(self, prompt_key: tuple | None, head_ids: tuple[int, ...], soft: torch.Tensor | None) -> bool:
        key = PrefixCache.key(prompt_key, head_ids)
        if key in self.prefix_cache:
            return False
        self._drop_doomed()
        self._prefix(key, head_ids, soft, count=False)
        return True

    def _prefix(self, key: tuple, head_ids: tuple[int, ...], soft: torch.Tensor | None, *, count: bool = True) -> Slot:
        cache = self.prefix_cache
        slot = cache.items.get(key)
        if slot is not None:
            cache.items.move_to_end(key)
            cache.hits += count
            return slot
        cache.misses += count
        if not cache.free:
            self._evict_unused(0, at_least_one=True)
        if not cache.free:
            raise RuntimeError("every prefix slot is in use by running rows; raise SOFTPROMPT_LLAMACPP_PREFIX_SLOTS")
        seq = cache.free.pop()
        soft = self._soft(soft)
        try:
            self.ctx.run([Tokens(seq, 0, head_ids)] if head_ids else [])
            self.ctx.run([Embeds(seq, len(head_ids), soft)] if soft is not None else [])
        except BaseException:
            self.ctx.drop(seq)
            cache.free.append(seq)
            raise
        slot = Slot(seq, len(head_ids) + (0 if soft is None else soft.shape[0]))
        with cache._lock:
            cache.items[key] = slot
        return slot

    def _evict_unused(self, cells: int, *, at_least_one: bool = False) -> None:
        """Drop least recently used prefixes no running row counts on, until `cells` are free."""
        cache = self.prefix_cache
        with cache._lock:
            freed = 0
            for key in [k for k, slot in cache.items.items() if slot.users == 0]:
                if freed >= cells and (freed > 0 or not at_least_one):
                    break
                slot = cache.items.pop(key)
                cache.doomed.append(slot)
                freed += slot.length
        self._drop_doomed()

    def _drop_doomed(self) -> None:
        cache = self.prefix_cache
        with cache._lock:
            doomed = [slot for slot in cache.doomed if slot.users == 0]
            cache.doomed = [slot for slot in cache.doomed if slot.users > 0]
        for slot in doomed:
            self.ctx.drop(slot.seq)
            cache.free.append(slot.seq)

    # ------------------------------------------------------------ helpers
    def _release(self, row: Row) -> None:
        self.ctx.drop(row.seq)
        self.free.append(row.seq)
        if row.slot is not None:
            row.slot.users -= 1
            row.slot = None

    def _soft(self, soft: torch.Tensor | None) -> torch.Tensor | None:
        if soft is None or soft.shape[0] == 0:
            return None
        return soft.float() / self.input_scale if self.input_scale != 1.0 else soft

    def _logits(self, rows: list[np.ndarray]) -> torch.Tensor:
        logits = torch.from_numpy(np.stack(rows))  # [b, V'] fp32
        if logits.shape[1] < self.vocab:  # the GGUF's vocabulary is shorter than the padded head
            logits = torch.nn.functional.pad(logits, (0, self.vocab - logits.shape[1]), value=float("-inf"))
        return logits[:, : self.vocab]

    def set_threads(self, threads: int) -> None:
        self.ctx.set_threads(threads)
        torch.set_num_threads(threads)  # sampling runs in torch, on the same thread

    def close(self) -> None:
        self.rows = []
        self.ctx.close()

    def stats(self) -> dict:
        return {
            "backend": self.name,
            "attention": "llama.cpp",
            "packs_prefills": True,
            "prefix_cache": self.prefix_cache.stats(),
            "kv_cells": self.ctx.n_ctx,
            "kv_cells_reserved": self._reserved(),
        }
