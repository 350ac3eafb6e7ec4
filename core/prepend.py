"""The one place where a soft prompt is put in front of a query (used by trainer and server).

The "soft" part is whatever fixed block precedes the query: the soft-prompt vectors, usually
preceded by the embedded template head (see `layout.py`). Rows are left-padded so that every
row reads `[pad][soft][query]` and its last real token sits in the last column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class PrependedBatch:
    inputs_embeds: torch.Tensor  # [B, P+T, D]
    attention_mask: torch.Tensor  # [B, P+T], 1 = real token
    position_ids: torch.Tensor  # [B, P+T], 0 at each row's first real token
    labels: torch.Tensor | None  # [B, P+T], IGNORE_INDEX over pads and the soft prompt


def prepend_soft_prompt(
    soft_prompt: torch.Tensor,
    query_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    soft_mask: torch.Tensor | None = None,
) -> PrependedBatch:
    """Prepend `soft_prompt` to each query and left-align the padding.

    soft_prompt: [P, D] shared by every row, or [B, P, D] per row (with `soft_mask` [B, P]
        marking real vectors when rows have prompts of different lengths).
    query_embeds: [B, T, D]; attention_mask: [B, T] (left or right padded); labels: [B, T].
    """
    batch, query_len, _ = query_embeds.shape
    if soft_prompt.dim() == 2:
        soft_prompt = soft_prompt.unsqueeze(0).expand(batch, -1, -1)  # [B, P, D]
    soft_prompt = soft_prompt.to(query_embeds.dtype)
    prompt_len = soft_prompt.shape[1]
    if soft_mask is None:
        soft_mask = attention_mask.new_ones(batch, prompt_len)  # [B, P]

    embeds = torch.cat([soft_prompt, query_embeds], dim=1)  # [B, P+T, D]
    mask = torch.cat([soft_mask.to(attention_mask.dtype), attention_mask], dim=1)  # [B, P+T]
    # A stable sort on the mask moves pads (0) to the front and keeps every row's real
    # tokens in order, wherever the pads were: [soft][query][pad] -> [pad][soft][query].
    order = torch.sort(mask, dim=1, stable=True).indices  # [B, P+T]
    embeds = embeds.gather(1, order.unsqueeze(-1).expand_as(embeds))
    mask = mask.gather(1, order)
    positions = position_ids(mask)  # [B, P+T]

    full_labels = None
    if labels is not None:
        ignored = labels.new_full((batch, prompt_len), IGNORE_INDEX)  # [B, P]
        full_labels = torch.cat([ignored, labels], dim=1).gather(1, order)  # [B, P+T]
        full_labels = full_labels.masked_fill(mask == 0, IGNORE_INDEX)
    return PrependedBatch(embeds, mask, positions, full_labels)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Each column's position: the number of real tokens before it in its row (mask [B, L] -> [B, L]),
    so a left-padded row counts from 0 at its first real token, exactly as it would alone."""
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def left_pad(rows: list[torch.Tensor], pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of embeddings `[n_i, D]` as one batch, right-aligned: (embeds [B, T, D] filled with
    `pad` [D] on the left, mask [B, T] with 1 over real columns)."""
    width = max(row.shape[0] for row in rows)
    embeds = pad.expand(len(rows), width, -1).clone()  # [B, T, D]
    mask = torch.zeros(len(rows), width, dtype=torch.long, device=pad.device)  # [B, T]
    for i, row in enumerate(rows):
        embeds[i, width - row.shape[0] :] = row
        mask[i, width - row.shape[0] :] = 1
    return embeds, mask
