"""Token ids for examples, padded batches, and the forward pass through the frozen model.

Every row is laid out by `prepend_soft_prompt` as

    [pad] [template head | SOFT PROMPT] [user input, template tail | target]

where the template head (e.g. system turn + "<|im_start|>user\\n") is frozen token embeddings
and only the soft prompt is trainable. Because rows are left-padded, each row's target sits
in the last columns, so logits are computed for those columns only (`logits_to_keep`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.layout import ChatLayout
from core.modeling import FrozenModel
from core.prepend import IGNORE_INDEX, PrependedBatch, prepend_soft_prompt
from trainer.data import Example


@dataclass(frozen=True)
class Encoded:
    query_ids: tuple[int, ...]  # user input + template tail (ends where the answer begins)
    target_ids: tuple[int, ...]  # answer tokens + end-of-turn


class Encoder:
    """Turns examples into token ids with the model's prompt template."""

    def __init__(self, frozen: FrozenModel, *, use_chat_template: bool | None = None, max_input_tokens: int = 512):
        self.tokenizer = frozen.tokenizer
        self.layout = ChatLayout(frozen.tokenizer, use_chat_template=use_chat_template)
        self.max_input_tokens = max_input_tokens
        # Single-turn queries share one head; it is part of the fixed block before the query.
        self.head_ids = self.layout.for_input("").head_ids

    def encode(self, example: Example) -> Encoded:
        return Encoded(self.query_ids(example.input), tuple(self.layout.target_ids(example.output)))

    def query_ids(self, text: str) -> tuple[int, ...]:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) > self.max_input_tokens:  # keep the end: the question follows the story
            text = self.tokenizer.decode(ids[-self.max_input_tokens :])
        layout = self.layout.for_input(text)
        if layout.head_ids != self.head_ids:
            raise ValueError("the chat template renders a different head for this input; cannot share the prefix")
        return layout.tail_ids


@dataclass
class TokenBatch:
    ids: torch.Tensor  # [B, T] left-padded query (+ target) ids
    mask: torch.Tensor  # [B, T]
    labels: torch.Tensor | None  # [B, T], IGNORE_INDEX except target tokens
    target_len: int  # longest target in the batch (targets occupy the last columns)


def collate(rows: Sequence[Encoded], pad_id: int, *, with_targets: bool = True) -> TokenBatch:
    """Left-pad queries (followed by their targets when `with_targets`) into one batch."""
    seqs = [r.query_ids + (r.target_ids if with_targets else ()) for r in rows]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long) if with_targets else None
    for i, (row, seq) in enumerate(zip(rows, seqs)):
        ids[i, width - len(seq) :] = torch.tensor(seq)
        mask[i, width - len(seq) :] = 1
        if labels is not None:
            labels[i, width - len(row.target_ids) :] = torch.tensor(row.target_ids)
    target_len = max(len(r.target_ids) for r in rows) if with_targets else 0
    return TokenBatch(ids, mask, labels, target_len)


PLACEMENTS = ("user_turn", "sequence_start")


def prefix_block(
    frozen: FrozenModel, head_ids: Sequence[int], soft: torch.Tensor, placement: str = "user_turn"
) -> torch.Tensor:
    """The fixed block before every query: embedded template head, then the soft prompt
    ("user_turn", ours); or the soft prompt before the whole sequence ("sequence_start",
    where HF PEFT prompt tuning puts it; used to evaluate PEFT prompts)."""
    head = frozen.embedding(torch.tensor(list(head_ids), dtype=torch.long, device=frozen.device))  # [H, D]
    soft = soft.to(device=head.device, dtype=head.dtype)  # [P, D]
    if placement == "sequence_start":
        return torch.cat([soft, head], dim=0)  # [P+H, D]
    if placement != "user_turn":
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    return torch.cat([head, soft], dim=0)  # [H+P, D]


def lay_out(frozen: FrozenModel, prefix: torch.Tensor, batch: TokenBatch) -> PrependedBatch:
    """[pad][prefix][query(+target)] embeddings, mask, positions and labels for the model."""
    ids = batch.ids.to(frozen.device)
    labels = batch.labels.to(frozen.device) if batch.labels is not None else None
    return prepend_soft_prompt(prefix, frozen.embedding(ids), batch.mask.to(frozen.device), labels)  # [B, H+P+T, D]


def target_loss(frozen: FrozenModel, prefix: torch.Tensor, batch: TokenBatch) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over target tokens (teacher forcing) and the number of them."""
    laid = lay_out(frozen, prefix, batch)
    keep = batch.target_len + 1  # logits at columns -K-1 .. -2 predict the K target columns
    logits = frozen.model(
        inputs_embeds=laid.inputs_embeds,
        attention_mask=laid.attention_mask,
        position_ids=laid.position_ids,
        logits_to_keep=keep,
        use_cache=False,
    ).logits[:, :-1]  # [B, K, V]
    labels = laid.labels[:, -batch.target_len :]  # [B, K]
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((labels != IGNORE_INDEX).sum())
