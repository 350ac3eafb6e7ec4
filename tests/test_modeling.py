from __future__ import annotations

import pytest
import torch

from core.modeling import ModelSpecError, load_frozen_model, resolve_spec


def test_unknown_spec_says_what_is_expected(tmp_path):
    with pytest.raises(ModelSpecError, match="Hugging Face model folder"):
        resolve_spec(str(tmp_path / "nope"))


def test_default_spec_points_at_embedded_gguf():
    resolved = resolve_spec("default")
    assert resolved.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (resolved.folder / resolved.gguf_file).is_file()


def test_hf_folder_loads_frozen_with_same_weights(frozen, tmp_path):
    folder = tmp_path / "model"
    frozen.model.save_pretrained(folder)
    frozen.tokenizer.save_pretrained(folder)
    loaded = load_frozen_model(str(folder), device="cpu")
    assert loaded.dtype == torch.float32
    assert not any(p.requires_grad for p in loaded.model.parameters()) and not loaded.model.training
    assert loaded.fingerprint == frozen.fingerprint
    assert loaded.tokenizer.chat_template == frozen.tokenizer.chat_template
