"""oneDNN-packed linear layers: nn.Linear's numbers (to float rounding), gradients and weight changes honoured."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from server.engine.fused_linear import fuse_projections
from server.engine.packed_linear import PackedLinear, pack_linear_layers, packing_available
from tests.engine_helpers import mixed_batch_tokens
from tests.tiny import tiny_llama

pytestmark = pytest.mark.skipif(not packing_available(nn.Linear(2, 2)), reason="this torch build has no oneDNN linear")


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_linear_for_every_row_count(bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias).requires_grad_(False)
    packed = PackedLinear(linear, rows=8)
    with torch.inference_mode():
        for rows in (*range(1, 12), 300):  # decode batches of any size, and a prefill
            x = torch.randn(rows, 1, 96)
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-6, atol=1e-5, msg=f"{rows} rows")
        x = torch.randn(4, 3, 192)[..., ::2]  # a strided view
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-6, atol=1e-5)
    assert packed.packed_calls == 13


def test_packed_linear_keeps_gradients_flowing():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16).requires_grad_(False)
    packed = PackedLinear(linear, rows=4)
    x = torch.randn(4, 32, requires_grad=True)
    packed(x).square().sum().backward()
    grad, x.grad = x.grad.clone(), None
    linear(x).square().sum().backward()
    assert torch.equal(grad, x.grad)
    assert packed.packed_calls == 0


def test_a_changed_or_replaced_weight_is_never_served_from_the_stale_copy():
    torch.manual_seed(0)
    linear = nn.Linear(24, 40).requires_grad_(False)
    packed = PackedLinear(linear, rows=4)
    x = torch.randn(3, 24)
    with torch.no_grad():
        linear.weight.mul_(2)  # in place: same storage, new version
        torch.testing.assert_close(packed(x), linear(x))
        assert not packed.is_packed  # the stale copy is dropped, not kept in memory
        linear.bias.zero_()
        torch.testing.assert_close(packed(x), linear(x))
        packed.weight = nn.Parameter(torch.randn(40, 24), requires_grad=False)  # replaced
        torch.testing.assert_close(packed(x), nn.functional.linear(x, packed.weight, packed.bias))
    assert packed.packed_calls == 0
    rebias = PackedLinear(nn.Linear(24, 40).requires_grad_(False), rows=4)
    with torch.no_grad():
        rebias.bias.add_(1)  # the bias alone changed
        torch.testing.assert_close(rebias(x), nn.functional.linear(x, rebias.weight, rebias.bias))
    assert rebias.packed_calls == 0
    swapped = PackedLinear(nn.Linear(24, 40).requires_grad_(False), rows=4)
    with torch.inference_mode():  # replaced by a tensor that keeps no version counter
        swapped.weight = nn.Parameter(torch.randn(40, 24), requires_grad=False)
        torch.testing.assert_close(swapped(x), nn.functional.linear(x, swapped.weight, swapped.bias))
    assert swapped.packed_calls == 0 and not swapped.is_packed


def test_a_dtype_round_trip_cannot_land_the_new_weight_on_the_packed_address():
    """`.half().float()` frees the old storage and allocates one of the same size; the layer keeps
    what it packed alive, so the new weight gets another address and the layer falls back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40)).requires_grad_(False)
    pack_linear_layers(model, rows=4)
    packed_address = model[0].weight.data_ptr()
    model.half().float()  # same Parameter objects, new data (rounded through fp16)
    assert model[0].weight.data_ptr() != packed_address
    x = torch.randn(3, 24)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), nn.functional.linear(x, model[0].weight, model[0].bias))
    assert model[0].packed_calls == 0 and not model[0].is_packed


def test_a_frozen_weight_with_a_trainable_bias_keeps_gradients():
    linear = nn.Linear(8, 4)
    linear.weight.requires_grad_(False)
    packed = PackedLinear(linear, rows=4)
    packed(torch.randn(2, 8)).sum().backward()
    assert packed.bias.grad is not None and packed.packed_calls == 0


def test_packing_a_fused_model_keeps_ties_outputs_and_is_idempotent(tokenizer):
    model = tiny_llama(len(tokenizer)).requires_grad_(False)
    ids = torch.randint(0, len(tokenizer), (4, 5))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        fused = fuse_projections(model)
        added = pack_linear_layers(model, rows=4)
        after = model(input_ids=ids).logits
    assert fused > 0 and added > 0 and pack_linear_layers(model, rows=4) == 0
    matrices = [p for p in model.parameters() if p.dim() == 2]  # the embedding is the tied lm_head's weight
    assert added == sum(p.numel() * p.element_size() for p in matrices)  # every linear weight, each once
    assert isinstance(model.lm_head, PackedLinear) and model.lm_head.packed_calls == 1
    assert model.lm_head.weight is model.get_input_embeddings().weight
    group = model.model.layers[0].self_attn.q_proj.group
    assert isinstance(group.product, PackedLinear) and group.product.packed_calls == 1
    assert not any(type(m) is nn.Linear for m in model.modules())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-4)  # rounding only: a different GEMM kernel


def test_a_packed_model_follows_load_state_dict(tokenizer):
    model = tiny_llama(len(tokenizer)).requires_grad_(False)
    plain = tiny_llama(len(tokenizer)).requires_grad_(False)
    fuse_projections(model)
    pack_linear_layers(model, rows=4)
    shifted = {k: v + 0.01 for k, v in plain.state_dict().items()}
    model.load_state_dict(shifted)
    plain.load_state_dict(shifted)
    ids = torch.randint(0, len(tokenizer), (2, 6))
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-4)


def test_packing_skips_models_that_are_not_fp32_on_cpu(tokenizer):
    model = tiny_llama(len(tokenizer)).to(torch.bfloat16)
    assert pack_linear_layers(model, rows=4) == 0
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    meta = nn.Sequential(nn.Linear(4, 4, device="meta"))
    assert pack_linear_layers(meta, rows=4) == 0 and type(meta[0]) is nn.Linear


def test_packing_skips_weights_made_under_inference_mode():
    """They keep no in-place version, so a packed copy could not tell when they change."""
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    assert pack_linear_layers(model, rows=4) == 0 and type(model[0]) is nn.Linear


def test_engine_with_packed_weights_gives_the_same_tokens(tokenizer):
    """A mixed batch through packed (and fused) weights == the same batch and solo runs without."""
    packed_ids, engine = mixed_batch_tokens(tokenizer, together=True, packed_weights=True, fused_projections=True)
    assert any(isinstance(m, PackedLinear) for m in engine.model.modules())
    assert engine.model.lm_head.packed_calls > 0  # the packed path really ran
    plain = {"packed_weights": False, "fused_projections": False}
    assert packed_ids == mixed_batch_tokens(tokenizer, together=True, **plain)[0]
    assert packed_ids == mixed_batch_tokens(tokenizer, together=False, **plain)[0]
    assert mixed_batch_tokens(tokenizer, together=False, packed_weights=True)[0] == packed_ids
