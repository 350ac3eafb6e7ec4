"""What the engine's loop drives: a model that computes rows, behind one small interface.

The loop (engine.py) owns the requests, the queue and admission; the running batch (batch.py)
owns the rows' tokens, sampling and events. A backend owns only what the model computes for
those rows, kept in the rows' order:

- `prefill(requests)` computes new rows (each a template head, a soft prompt, a tail) and
  returns their state, not yet running, and their last logits `[b, V]` (fp32, torch);
- `join(state, seqs)` appends them to the running rows; `discard(state)` drops them instead;
- `decode(tokens)` feeds one token to every running row and returns the next logits `[B, V]`;
- `keep(rows, seqs)` keeps only the running rows at those indices; `clear()` drops them all;
- `prewarm(...)` computes a prefix (head + soft prompt) ahead of use; `close()` frees the model's
  working memory once the loop has ended;
- `fits(requests)` says whether new rows' key/values fit beside the running ones;
- `packs(requests)` says whether these new rows are best prefilled inside the running rows'
  next step (rows run and some new row needs the model); `prepare_beside(request)` readies one
  new row without touching the running ones, and `step_beside(requests, prepared, tokens)`
  runs the running rows' step and the new rows' prefill as one pass, returning (new rows'
  logits, running rows' logits) (packed.py).

Two backends implement it: torch_backend.py (transformers, fp32, the default) and
llamacpp_backend.py (llama.cpp on the GGUF's own 4-bit weights, SOFTPROMPT_ENGINE=llamacpp).
Sampling, stop strings, streaming and every failure rule live above it, so both behave alike.
"""

from __future__ import annotations

from typing import Protocol

import torch

from server.engine.sequence import GenerationRequest, Sequence

ENGINES = ("torch", "llamacpp")


class Backend(Protocol):
    name: str
    prefix_cache: object  # stats(), evict_prompt(name, version), `key in cache` (prefix_cache.PrefixCache's)

    def prefill(self, requests: list[GenerationRequest]) -> tuple[object, torch.Tensor]: ...

    def join(self, state: object, seqs: list[Sequence]) -> None: ...

    def discard(self, state: object) -> None: ...

    def decode(self, tokens: list[int]) -> torch.Tensor: ...

    def keep(self, rows: list[int], seqs: list[Sequence]) -> None: ...

    def clear(self) -> None: ...

    def prewarm(self, prompt_key: tuple | None, head_ids: tuple[int, ...], soft: torch.Tensor | None) -> bool: ...

    def fits(self, requests: list[GenerationRequest]) -> bool: ...

    def packs(self, requests: list[GenerationRequest]) -> bool: ...

    def prepare_beside(self, request: GenerationRequest) -> object: ...

    def step_beside(
        self, requests: list[GenerationRequest], prepared: list, tokens: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def set_threads(self, threads: int) -> None: ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...
