"""MKL-packed linear layers for decode steps: nn.Linear's numbers (to float rounding), gradients untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from server.engine import Engine
from server.engine.packed_linear import PackedLinear, pack_linear_layers, packing_available
from tests.engine_helpers import make_job, untied_llama, wait_all
from trainer.modeling import from_loaded

pytestmark = pytest.mark.skipif(not packing_available(nn.Linear(2, 2)), reason="this torch build has no MKL packed GEMM")


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_linear_for_every_row_count(bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias).requires_grad_(False)
    packed = PackedLinear(linear, rows=8)
    with torch.inference_mode():
        for rows in range(1, 12):
            x = torch.randn(rows, 1, 96)
            torch.testing.assert_close(packed(x), linear(x), rtol=1e-6, atol=1e-5, msg=f"{rows} rows")
    assert packed.packed_calls == 4  # 5..8 rows are packed (8 exactly, 5-7 zero-padded); the rest fall back


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


def test_packing_a_model_keeps_ties_outputs_and_is_idempotent(tokenizer):
    from tests.tiny import tiny_llama

    model = tiny_llama(len(tokenizer))
    ids = torch.randint(0, len(tokenizer), (4, 1))
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        added = pack_linear_layers(model, rows=4)
        after = model(input_ids=ids).logits
    assert added > 0 and pack_linear_layers(model, rows=4) == 0
    assert isinstance(model.lm_head, PackedLinear) and model.lm_head.packed_calls == 1
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert not any(type(m) is nn.Linear for m in model.modules())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-4)  # rounding only: a different GEMM kernel


def test_packing_skips_models_that_are_not_fp32_on_cpu(tokenizer):
    from tests.tiny import tiny_llama

    model = tiny_llama(len(tokenizer)).to(torch.bfloat16)
    assert pack_linear_layers(model, rows=4) == 0
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


def test_engine_with_packed_decode_gives_the_same_tokens(tokenizer):
    """A full mixed batch decoded through packed weights == the same batch and solo runs without."""
    torch.manual_seed(7)
    softs = [torch.randn(3, 64), torch.randn(9, 64), None, torch.randn(5, 64)]
    texts = ["What is two plus three?", "The movie was great fun", "Classify", "a bad movie"]

    def run(packed: bool, together: bool):
        engine = Engine(from_loaded(untied_llama(len(tokenizer)), tokenizer, base_model="tiny-untied"),
                        max_batch_size=4, packed_decode=packed, fused_projections=False)
        engine.start()
        try:
            jobs = [make_job(tokenizer, text, soft, key=None if soft is None else ("p", i, "c"), max_new_tokens=12)
                    for i, (text, soft) in enumerate(zip(texts, softs))]
            if not together:
                return [_submit_and_wait(engine, job, sink) for job, sink in jobs], engine
            engine.pause()
            for job, _ in jobs:
                engine.submit(job)
            engine.resume()
            return [d.token_ids for d, _ in wait_all([sink for _, sink in jobs])], engine
        finally:
            engine.stop()

    packed_ids, engine = run(packed=True, together=True)
    assert engine.packed_bytes > 0
    assert engine.model.lm_head.packed_calls > 0  # the packed path really ran
    assert packed_ids == run(packed=False, together=True)[0] == run(packed=False, together=False)[0]


def _submit_and_wait(engine, job, sink) -> list[int]:
    engine.submit(job)
    return sink.result()[0].token_ids
