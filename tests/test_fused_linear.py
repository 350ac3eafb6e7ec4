"""Fused q/k/v and gate/up projections: the model's numbers (to float rounding), no extra memory."""

from __future__ import annotations

import torch
from torch import nn

from server.engine.fused_linear import FusedLinear, fuse_projections
from tests.engine_helpers import mixed_batch_tokens
from tests.tiny import tiny_llama


def test_fusing_keeps_weights_outputs_and_memory(tokenizer):
    model = tiny_llama(len(tokenizer)).requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, len(tokenizer), (3, 7))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        fused = fuse_projections(model)
        after = model(input_ids=ids).logits
    layers = model.config.num_hidden_layers
    assert fused == 2 * layers and fuse_projections(model) == 0  # q/k/v and gate/up per layer; idempotent
    attention = model.model.layers[0].self_attn
    assert all(isinstance(getattr(attention, n), FusedLinear) for n in ("q_proj", "k_proj", "v_proj"))
    group = attention.q_proj.group
    assert attention.k_proj.weight.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr()
    assert group._last.x is None  # every member took its part: nothing is held between forwards
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_fused_projection_runs_one_product_per_input(monkeypatch):
    torch.manual_seed(0)
    parent = nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = nn.Linear(8, 6), nn.Linear(8, 2), nn.Linear(8, 2)
    parent.requires_grad_(False)
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    expected = [parent.q_proj(x), parent.k_proj(x), parent.v_proj(x), parent.k_proj(y)]
    assert fuse_projections(parent) == 1 and parent.q_proj.group.bounds == [0, 6, 8, 10]
    calls = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: calls.append(a[0].shape) or linear(*a))
    with torch.inference_mode():
        got = [parent.q_proj(x), parent.k_proj(x), parent.v_proj(x)]
        assert len(calls) == 1  # one [4, 10] product for the three
        got.append(parent.k_proj(y))  # another input: computed for it, never the stale x
        assert len(calls) == 2
        switched = [parent.q_proj(x), parent.k_proj(y), parent.v_proj(x)]  # inputs change within a group
    assert len(calls) == 5
    for a, b in zip(got + switched, expected + [expected[0], expected[3], expected[2]]):
        torch.testing.assert_close(a, b)


def test_a_moved_or_reassigned_model_falls_back_to_its_own_weights(tokenizer):
    """`.to(dtype)` or `load_state_dict(assign=True)` after fusing replace the parameters: the
    group's matrix is stale then, so each layer must use its own (new) weight."""
    model = tiny_llama(len(tokenizer)).requires_grad_(False)
    plain = tiny_llama(len(tokenizer)).requires_grad_(False)
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, len(tokenizer), (2, 6))
    fuse_projections(model)
    with torch.inference_mode():
        torch.testing.assert_close(model.double()(input_ids=ids).logits, plain.double()(input_ids=ids).logits)
        shifted = {k: v + 0.01 for k, v in plain.state_dict().items()}
        model.load_state_dict(shifted, assign=True)
        plain.load_state_dict(shifted)
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_fused_model_keeps_gradients_flowing(tokenizer):
    """Training through a served model (the soft prompt needs gradients) takes the plain path."""
    model = tiny_llama(len(tokenizer)).requires_grad_(False)
    embeds = torch.randn(2, 5, model.config.hidden_size, requires_grad=True)
    model(inputs_embeds=embeds).logits.square().mean().backward()
    plain, embeds.grad = embeds.grad.clone(), None
    fuse_projections(model)
    model(inputs_embeds=embeds).logits.square().mean().backward()
    torch.testing.assert_close(embeds.grad, plain)


def test_engine_with_fused_projections_gives_the_same_tokens(tokenizer):
    """A mixed batch through fused projections == the same batch and solo runs without them."""
    plain = {"packed_weights": False}  # fusing alone
    fused_ids, engine = mixed_batch_tokens(tokenizer, together=True, fused_projections=True, **plain)
    assert any(isinstance(m, FusedLinear) for m in engine.model.modules())
    unfused = {"fused_projections": False, **plain}
    assert fused_ids == mixed_batch_tokens(tokenizer, together=True, **unfused)[0]
    assert fused_ids == mixed_batch_tokens(tokenizer, together=False, **unfused)[0]
    assert mixed_batch_tokens(tokenizer, together=False, fused_projections=True, **plain)[0] == fused_ids
    assert len(set(map(tuple, fused_ids))) == len(fused_ids)  # the four requests really differ
