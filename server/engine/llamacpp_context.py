"""llama.cpp through llama-cpp-python's low-level API: one model, one context, batches in and logits out.

Only what the llama.cpp backend needs: load a GGUF, feed tokens or input embeddings (a
llama.cpp batch carries one or the other, never both) to given sequences at given positions,
read the logits of the positions that asked for them, and copy or drop sequences in the key/value
memory. The memory is unified (`kv_unified`): a sequence copied from another shares its cells,
so a soft prompt's prefix is computed once and every row that uses it points at the same cells.
Not thread-safe: the engine's thread is the only caller.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

INSTALL_HINT = "the llama.cpp engine needs llama-cpp-python: run `make install-llamacpp` (builds it, a few minutes)"


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:  # not installed: say how to get it
        raise RuntimeError(f"SOFTPROMPT_ENGINE=llamacpp: {INSTALL_HINT} ({exc})") from exc
    return llama_cpp


@dataclass
class Tokens:
    """A run of tokens of one sequence starting at `pos`; `logits` asks for the last one's."""

    seq: int
    pos: int
    ids: tuple[int, ...]
    logits: bool = False


@dataclass
class Embeds:
    """A run of input embeddings [n, D] of one sequence starting at `pos`."""

    seq: int
    pos: int
    vectors: torch.Tensor
    logits: bool = False


FLASH_ATTENTION = {"auto": -1, "off": 0, "on": 1}  # llama_flash_attn_type


class LlamaCppError(RuntimeError):
    pass


_log_callback = None  # llama.cpp keeps the pointer: the callback must outlive every context


def _route_logs(llama_cpp) -> None:
    """llama.cpp's own log lines go to this module's logger (debug; errors as warnings), not stderr."""
    global _log_callback
    if _log_callback is not None:
        return

    levels = {3: logging.WARNING, 4: logging.ERROR}  # ggml's WARN and ERROR; DEBUG, INFO and CONT are debug

    @llama_cpp.llama_log_callback
    def callback(level, text, _user):
        line = text.decode("utf-8", "replace").rstrip()
        if "n_ctx_seq" in line and "n_ctx_train" in line:  # unified memory is sized for every row; a row's
            level = 1  # positions stay within the model's context (requests are checked), so this is expected
        if line:
            logger.log(levels.get(level, logging.DEBUG), "llama.cpp: %s", line)

    _log_callback = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


class LlamaContext:
    def __init__(
        self,
        gguf: Path,
        *,
        n_ctx: int,
        n_seq_max: int,
        threads: int,
        n_batch: int = 2048,
        flash_attention: str = "auto",
    ):
        L = self.L = import_llama_cpp()
        _route_logs(L)
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(gguf).encode(), mparams)
        if not self.model:
            raise LlamaCppError(f"llama.cpp could not load {gguf}")
        cparams = L.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = self.n_batch = min(n_batch, n_ctx)
        cparams.n_seq_max = n_seq_max
        cparams.kv_unified = True  # sequences share cells: prefixes are copied by reference
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        cparams.flash_attn_type = FLASH_ATTENTION[flash_attention]  # auto: on for CPU (F16 inside)
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise LlamaCppError(f"llama.cpp could not make a context of {n_ctx} cells for {n_seq_max} sequences")
        self.n_ctx = L.llama_n_ctx(self.ctx)
        self.n_embd = L.llama_model_n_embd(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.memory = L.llama_get_memory(self.ctx)
        self._tokens = L.llama_batch_init(self.n_batch, 0, 1)
        self._embeds = L.llama_batch_init(self.n_batch, self.n_embd, 1)

    def close(self) -> None:
        L = self.L
        if self.ctx:
            L.llama_batch_free(self._tokens)
            L.llama_batch_free(self._embeds)
            L.llama_free(self.ctx)
            L.llama_model_free(self.model)
            self.ctx = self.model = None

    def set_threads(self, threads: int) -> None:
        self.L.llama_set_n_threads(self.ctx, threads, threads)

    # ------------------------------------------------------------ memory
    def drop(self, seq: int) -> None:
        """Forget a sequence; cells other sequences share stay theirs."""
        self.L.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def copy(self, src: int, dst: int) -> None:
        """`dst` gets every position of `src` (shared cells, nothing computed or copied)."""
        self.L.llama_memory_seq_cp(self.memory, src, dst, -1, -1)

    # ------------------------------------------------------------ compute
    def run(self, runs: list[Tokens] | list[Embeds]) -> dict[int, np.ndarray]:
        """Decode runs of one kind (all Tokens or all Embeds), in chunks of at most n_batch positions.

        Returns the logits [V] of every run that asked for them, by its index in `runs`."""
        if not runs:
            return {}
        embeds = isinstance(runs[0], Embeds)
        batch = self._embeds if embeds else self._tokens
        out: dict[int, np.ndarray] = {}
        wanted: list[tuple[int, int]] = []  # (run index, position in the chunk)
        n = 0
        for index, run in enumerate(runs):
            items = run.vectors if embeds else run.ids
            if embeds:
                vectors = np.ascontiguousarray(run.vectors.detach().to(torch.float32).cpu().numpy())
            for offset in range(len(items)):
                if n == self.n_batch:
                    self._decode(batch, n, wanted, out)
                    n, wanted = 0, []
                if embeds:
                    ctypes.memmove(
                        ctypes.addressof(batch.embd.contents) + n * self.n_embd * 4,
                        vectors[offset].ctypes.data,
                        self.n_embd * 4,
                    )
                else:
                    batch.token[n] = items[offset]
                batch.pos[n] = run.pos + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = run.seq
                last = run.logits and offset == len(items) - 1
                batch.logits[n] = last
                if last:
                    wanted.append((index, n))
                n += 1
        if n:
            self._decode(batch, n, wanted, out)
        return out

    def step(self, seqs: list[int], positions: list[int], tokens: list[int]) -> np.ndarray:
        """One token for each sequence at its position: logits [B, V] in the given order."""
        batch, n = self._tokens, len(tokens)
        if n > self.n_batch:
            raise LlamaCppError(f"{n} rows do not fit a batch of {self.n_batch}")
        for i, (seq, pos, token) in enumerate(zip(seqs, positions, tokens)):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, True
            batch.seq_id[i][0] = seq
        batch.n_tokens = n
        self._check(self.L.llama_decode(self.ctx, batch), n)
        pointer = self.L.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(pointer, shape=(n, self.n_vocab)).copy()

    def _decode(self, batch, n: int, wanted: list[tuple[int, int]], out: dict[int, np.ndarray]) -> None:
        batch.n_tokens = n
        self._check(self.L.llama_decode(self.ctx, batch), n)
        for index, at in wanted:
            pointer = self.L.llama_get_logits_ith(self.ctx, at)
            out[index] = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()

    @staticmethod
    def _check(code: int, n: int) -> None:
        if code == 1:
            raise LlamaCppError(f"llama.cpp found no room in its key/value memory for {n} positions")
        if code != 0:
            raise LlamaCppError(f"llama_decode failed with code {code} on {n} positions")
