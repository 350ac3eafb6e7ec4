from __future__ import annotations

import torch

from core.layout import ChatLayout
from core.prepend import IGNORE_INDEX, prepend_soft_prompt


def test_left_padding_gives_pad_soft_query_layout():
    soft = torch.full((2, 3), 7.0)  # [P=2, D=3]
    query = torch.arange(2 * 3 * 3, dtype=torch.float).view(2, 3, 3)  # [B=2, T=3, D=3]
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])  # row 0 left-padded
    labels = torch.tensor([[5, 6, 7], [8, 9, 10]])
    out = prepend_soft_prompt(soft, query, mask, labels)
    assert out.inputs_embeds.shape == (2, 5, 3)
    assert out.attention_mask.tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert out.position_ids.tolist() == [[0, 0, 1, 2, 3], [0, 1, 2, 3, 4]]
    assert torch.equal(out.inputs_embeds[0, 1:3], soft) and torch.equal(out.inputs_embeds[0, 3:], query[0, 1:])
    assert out.labels.tolist() == [[IGNORE_INDEX] * 3 + [6, 7], [IGNORE_INDEX] * 2 + [8, 9, 10]]


def test_right_padded_queries_are_realigned_to_the_left():
    soft = torch.zeros(1, 2)
    query = torch.tensor([[[1.0, 1], [2, 2], [0, 0]]])  # [1, 3, 2], last column is padding
    out = prepend_soft_prompt(soft, query, torch.tensor([[1, 1, 0]]))
    assert out.attention_mask.tolist() == [[0, 1, 1, 1]]
    assert out.inputs_embeds[0, 2:].tolist() == [[1, 1], [2, 2]]
    assert out.labels is None


def test_per_row_prompts_of_different_lengths():
    soft = torch.stack([torch.ones(3, 2), torch.cat([torch.zeros(1, 2), 2 * torch.ones(2, 2)])])  # [2, 3, 2]
    soft_mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    query = torch.full((2, 1, 2), 9.0)
    out = prepend_soft_prompt(soft, query, torch.ones(2, 1, dtype=torch.long), soft_mask=soft_mask)
    assert out.attention_mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert out.inputs_embeds[1, 1:3].tolist() == [[2, 2], [2, 2]]
    assert out.position_ids[1].tolist() == [0, 0, 1, 2]


def test_gradients_reach_only_the_soft_prompt():
    soft = torch.randn(2, 4, requires_grad=True)
    query = torch.randn(1, 3, 4)
    out = prepend_soft_prompt(soft, query, torch.ones(1, 3, dtype=torch.long))
    out.inputs_embeds.sum().backward()
    assert torch.equal(soft.grad, torch.ones(2, 4))


def test_soft_prompt_of_token_embeddings_matches_text_tokens(frozen):
    """Prepending the embeddings of a text must equal feeding that text as tokens, in a
    left-padded batch: this checks the layout, attention mask and position ids."""
    layout = ChatLayout(frozen.tokenizer)
    embed = frozen.embedding
    text_ids = frozen.tokenizer("Please reason step by step.", add_special_tokens=False).input_ids
    queries = [layout.for_input("What is two plus three?"), layout.for_input("Yes")]
    width = max(len(q.tail_ids) for q in queries)
    pad = frozen.tokenizer.pad_token_id
    # The fixed block before each query: the template head, then the soft prompt.
    soft = embed(torch.tensor(list(queries[0].head_ids) + text_ids))  # [P, D]
    tail = torch.tensor([[pad] * (width - len(q.tail_ids)) + list(q.tail_ids) for q in queries])
    mask = (torch.arange(width) >= torch.tensor([[width - len(q.tail_ids)] for q in queries])).long()
    batch = prepend_soft_prompt(soft, embed(tail), mask)
    logits = frozen.model(
        inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids
    ).logits
    for row, query in enumerate(queries):
        ids = torch.tensor([list(query.head_ids) + text_ids + list(query.tail_ids)])
        expected = frozen.model(input_ids=ids).logits[0]
        got = logits[row, -ids.shape[1] :]
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
