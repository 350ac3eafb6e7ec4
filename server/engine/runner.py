"""How a batch runs: pure steps over (model, key/values, mask, positions), no threads, no queues.

Every row is laid out as the trainer lays it out (core.prepend):

    cache columns  [pad][template head + soft prompt][pad][tail][generated...]

the fixed block before the query either as cached key/values (the prefix) or as embeddings at
the front of the row; positions count each row's real tokens (`position_ids`), so a row in a
batch computes what it would compute alone.
"""

from __future__ import annotations

import torch

from core.modeling import FrozenModel
from core.prepend import left_pad, position_ids, prepend_soft_prompt
from server.engine import kv as kvops
from server.engine import packed
from server.engine.masks import attention_mask


def embed_block(frozen: FrozenModel, head_ids: tuple[int, ...], soft: torch.Tensor | None) -> torch.Tensor:
    """The fixed block before the query: embedded template head ++ soft prompt, [h+P, D]."""
    device, dtype = frozen.device, frozen.dtype
    head = frozen.embedding(torch.tensor(head_ids, dtype=torch.long, device=device))  # [h, D]
    if soft is None:
        return head
    return torch.cat([head, soft.to(device=device, dtype=dtype)], dim=0)  # [h+P, D]


def embed_tail(frozen: FrozenModel, tail_ids: tuple[int, ...]) -> torch.Tensor:
    """The query after the soft prompt, [t, D]."""
    return frozen.embedding(torch.tensor(tail_ids, dtype=torch.long, device=frozen.device))


def whole_row(block: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """A row with no cached prefix: [block][tail] through the shared prepend, [P+t, D]."""
    ones = torch.ones(1, tail.shape[0], dtype=torch.long, device=tail.device)
    return prepend_soft_prompt(block, tail.unsqueeze(0), ones).inputs_embeds[0]


def compute_prefix(model, block: torch.Tensor) -> kvops.KV:
    """Key/values of the fixed block alone (positions 0..P-1): [1, H, P, d] per layer."""
    no_query = block.new_zeros(1, 0, block.shape[1])  # [1, 0, D]
    pre = prepend_soft_prompt(block, no_query, torch.ones(1, 0, dtype=torch.long, device=block.device))
    cache = kvops.to_cache(None)  # every layer keeps its whole history, sliding ones too
    out = model(
        inputs_embeds=pre.inputs_embeds,
        attention_mask=attention_mask(model, pre.inputs_embeds, pre.attention_mask, cache),
        position_ids=pre.position_ids,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return kvops.from_cache(out.cache)


def prefill(model, rows: list[tuple[kvops.KV | None, torch.Tensor]], pad: torch.Tensor):
    """One forward over new rows, each (its prefix key/values or None, the embeddings after it [n, D]).

    Returns (key/values [b, H, L, d] per layer, mask [b, L], last-token logits [b, V] in fp32)."""
    device = pad.device
    parts = [(prefix, torch.ones(1, kvops.length(prefix), dtype=torch.long, device=device)) for prefix, _ in rows]
    prefix_kv, prefix_mask = kvops.stack_rows(parts)  # [b, P]
    embeds, input_mask = left_pad([inputs for _, inputs in rows], pad)  # [b, T, D], [b, T]
    mask = torch.cat([prefix_mask, input_mask], dim=1)  # [b, P+T]
    cache = kvops.to_cache(prefix_kv)
    out = model(
        inputs_embeds=embeds,
        attention_mask=attention_mask(model, embeds, mask, cache),
        position_ids=position_ids(mask)[:, prefix_mask.shape[1] :],
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return kvops.from_cache(out.cache), mask, out.logits[:, -1].float()


def decode_step(model, last_tokens: list[int], positions: torch.Tensor, mask: torch.Tensor, cache):
    """One token for every running row: ids [B, 1] at `positions` [B, 1] (= real tokens so far), on
    top of `cache`; `mask` [B, L+1] covers the cache's columns and the new one.

    Returns the logits [B, V] in fp32; the cache has grown by the new column."""
    ids = torch.tensor([[token] for token in last_tokens], dtype=torch.long, device=mask.device)  # [B, 1]
    shape = torch.empty(len(last_tokens), 1, 0, dtype=model.dtype, device=mask.device)  # [B, 1, -]: what the masks need
    out = model(
        input_ids=ids,
        attention_mask=attention_mask(model, shape, mask, cache),
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1].float()


def packed_step(model, embeds: torch.Tensor, positions: torch.Tensor, plan: packed.Plan, cache) -> torch.Tensor:
    """One forward over a packed sequence (packed.py): embeds [1, N, D] at `positions` [1, N], on
    top of the row slots in `cache`. Returns the logits of `plan.last_tokens()` [K, V] in fp32."""
    keep = torch.tensor(plan.last_tokens(), dtype=torch.long, device=embeds.device)
    no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=embeds.device)  # 4-D: no mask is built; attention
    out = model(  # reads the plan's masks
        inputs_embeds=embeds,
        attention_mask=no_mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=keep,
        **{packed.KWARG: plan},
    )
    return out.logits[0].float()
