"""End-to-end checks on the embedded default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import pytest
import torch

from core.layout import ChatLayout
from core.models import MODELS
from core.prepend import prepend_soft_prompt

pytestmark = pytest.mark.real_model

INSTRUCTION = "Please answer with one word."
QUERIES = ["What colour is the sky on a clear day?", "Name a fruit that is yellow."]


def test_default_model_is_frozen_fp32_and_fingerprinted(real_model):
    assert real_model.base_model == MODELS["default"].model_id
    assert real_model.dtype == torch.float32 or real_model.device.type == "cuda"
    assert not any(p.requires_grad for p in real_model.model.parameters())
    assert not real_model.model.training
    assert real_model.fingerprint.hidden_size == 576 and real_model.fingerprint.vocab_size == 49152


def test_soft_prompt_from_text_embeddings_generates_like_the_text(real_model):
    """Greedy output with the instruction as a soft prompt (its token embeddings) equals
    greedy output with the instruction as tokens, in one left-padded batch."""
    tokenizer, model = real_model.tokenizer, real_model.model
    layout = ChatLayout(tokenizer)
    embed = real_model.embedding
    text_ids = tokenizer(INSTRUCTION, add_special_tokens=False).input_ids
    layouts = [layout.for_input(q) for q in QUERIES]
    head = list(layouts[0].head_ids)
    width = max(len(q.tail_ids) for q in layouts)
    tails = torch.tensor([[tokenizer.pad_token_id] * (width - len(q.tail_ids)) + list(q.tail_ids) for q in layouts])
    mask = torch.tensor([[0] * (width - len(q.tail_ids)) + [1] * len(q.tail_ids) for q in layouts])
    with torch.no_grad():
        soft = embed(torch.tensor(head + text_ids))  # [P, D]
        batch = prepend_soft_prompt(soft, embed(tails), mask)
        with_soft = model.generate(
            inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, max_new_tokens=12, do_sample=False
        )
    for row, query in enumerate(layouts):
        ids = torch.tensor([head + text_ids + list(query.tail_ids)])
        with torch.no_grad():
            as_text = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
            )
        expected = tokenizer.decode(as_text[0, ids.shape[1] :], skip_special_tokens=True)
        got = tokenizer.decode(with_soft[row], skip_special_tokens=True)
        assert got == expected and expected.strip()
