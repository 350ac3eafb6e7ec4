"""An exported store version is a real PEFT adapter: PEFT loads it and computes our logits."""

from __future__ import annotations

import torch

from core.modeling import from_loaded
from core.prepend import prepend_soft_prompt
from tests.tiny import tiny_llama


def test_peft_loads_exported_version_with_same_logits(tokenizer, store, tmp_path):
    from peft import PeftModel

    # A model of its own: PEFT wraps it, and the shared fixture must stay untouched.
    frozen = from_loaded(tiny_llama(len(tokenizer), seed=3), tokenizer)

    prompt = torch.randn(4, frozen.fingerprint.hidden_size) * 0.5
    store.publish("peft", prompt, fingerprint=frozen.fingerprint, base_model="tiny-llama", init_text="hello")
    exported = store.export("peft", tmp_path / "adapter")

    peft_model = PeftModel.from_pretrained(frozen.model, str(exported))
    peft_model.eval()
    ids = torch.tensor([[5, 17, 42, 9, 3]])
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # [1, P+T, V]
        batch = prepend_soft_prompt(prompt, frozen.embedding(ids), torch.ones_like(ids))
        ours = frozen.model(
            inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits
    torch.testing.assert_close(peft_logits[:, -ids.shape[1] :], ours[:, -ids.shape[1] :], atol=1e-5, rtol=1e-5)
