"""The served model's attention: native GQA for prefills gives transformers' SDPA numbers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from server.engine.attention import NAME, use_gqa_sdpa
from tests.engine_helpers import mixed_batch_tokens, untied_llama


def _logits_with_a_cached_prefix(model, ids, mask) -> torch.Tensor:
    """A padded prefill over a cached prefix, then one decode step: [B, 2, V]."""
    prefix, rest = ids[:, :5], ids[:, 5:]
    cache = DynamicCache(config=model.config)
    model(input_ids=prefix, attention_mask=mask[:, :5], cache=cache, use_cache=True)
    tail = model(input_ids=rest, attention_mask=mask, cache=cache, use_cache=True).logits[:, -1:]
    step = model(
        input_ids=tail.argmax(-1),
        attention_mask=torch.cat([mask, mask[:, -1:]], 1),
        cache=cache,
        use_cache=True,
    ).logits
    return torch.cat([tail, step], 1)


def test_native_gqa_gives_the_same_logits_and_skips_the_kv_copies(monkeypatch):
    model = untied_llama(200).requires_grad_(False)
    assert model.config.num_attention_heads // model.config.num_key_value_heads == 2  # grouped heads
    ids = torch.randint(3, 200, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding, so a mask is passed
    with torch.inference_mode():
        before = _logits_with_a_cached_prefix(model, ids, mask)
        assert use_gqa_sdpa(model) and model.config._attn_implementation == NAME
        calls = []
        sdpa = F.scaled_dot_product_attention
        monkeypatch.setattr(
            F,
            "scaled_dot_product_attention",
            lambda q, k, v, **kw: (
                calls.append((q.shape[2], k.shape[1], kw.get("enable_gqa", False))) or sdpa(q, k, v, **kw)
            ),
        )
        after = _logits_with_a_cached_prefix(model, ids, mask)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    layers = model.config.num_hidden_layers
    kv_heads = model.config.num_key_value_heads
    assert calls[layers : 2 * layers] == [(7, kv_heads, True)] * layers  # the prefill: grouped heads, no copies
    assert all(not gqa for _, _, gqa in calls[2 * layers :])  # decode steps keep transformers' own path


def test_gradients_through_native_gqa_equal_transformers_sdpa():
    """Training code may run a switched model (the session's shared one is): backward must agree."""
    model = untied_llama(200).requires_grad_(False)
    ids = torch.randint(3, 200, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0

    def embedding_grad():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=embeds, attention_mask=mask).logits.square().mean().backward()
        return embeds.grad

    before = embedding_grad()
    assert use_gqa_sdpa(model)
    torch.testing.assert_close(embedding_grad(), before, rtol=1e-5, atol=1e-7)


def test_models_it_would_not_help_are_left_alone():
    eager = untied_llama(200)
    eager.set_attn_implementation("eager")
    assert not use_gqa_sdpa(eager) and eager.config._attn_implementation == "eager"
    shape = {
        "vocab_size": 50,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
    }
    ungrouped = LlamaForCausalLM(LlamaConfig(**shape, num_key_value_heads=4))
    assert not use_gqa_sdpa(ungrouped) and ungrouped.config._attn_implementation == "sdpa"
    with torch.device("meta"):  # not on the CPU: CUDA models are left alone the same way
        elsewhere = LlamaForCausalLM(LlamaConfig(**shape, num_key_value_heads=2))
    assert not use_gqa_sdpa(elsewhere) and elsewhere.config._attn_implementation == "sdpa"


def test_queries_it_does_not_cover_go_to_transformers(monkeypatch):
    """Single-token, unmasked and non-CPU queries take transformers' own SDPA function."""
    from server.engine import attention

    handed = []
    monkeypatch.setattr(
        attention, "sdpa_attention_forward", lambda *a, **kw: handed.append(a[1].device.type) or (None, None)
    )
    module = torch.nn.Module()
    module.num_key_value_groups = 2
    q, kv, mask = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.ones(1, 1, 3, 3, dtype=torch.bool)
    attention.gqa_sdpa_attention(module, q[:, :, :1], kv, kv, mask[:, :, :1])  # a decode step
    attention.gqa_sdpa_attention(module, q, kv, kv, None)  # no mask
    attention.gqa_sdpa_attention(module, q.to("meta"), kv.to("meta"), kv.to("meta"), mask.to("meta"))
    assert handed == ["cpu", "cpu", "meta"]


def test_engine_with_native_gqa_gives_the_same_tokens(tokenizer):
    gqa_ids, engine = mixed_batch_tokens(tokenizer, together=True)
    assert engine.stats()["attention"] == engine.model.config._attn_implementation == NAME
    plain = {"gqa_attention": False, "packed_weights": False, "fused_projections": False}
    assert gqa_ids == mixed_batch_tokens(tokenizer, together=True, **plain)[0]
    assert gqa_ids == mixed_batch_tokens(tokenizer, together=False, **plain)[0]
