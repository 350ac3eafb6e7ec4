"""Tiny random models of the common decoder families, built from a config, for the family matrix.

Each is 2-3 layers, wide enough to be meaningful and small enough to run in milliseconds. Windows
are small (12 tokens: a request's template alone is longer), so every request runs far past
them and a sliding layer that looked one token too far (or not far enough) would change the
output. Weights are drawn so greedy tokens
depend on the whole context: an untied output head and strong attention projections.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

WINDOW = 12
COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _configs():
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    return {
        "llama": lambda v: LlamaConfig(vocab_size=v, num_hidden_layers=2, **COMMON),
        "qwen2": lambda v: Qwen2Config(vocab_size=v, num_hidden_layers=2, **COMMON),
        "qwen2-window": lambda v: Qwen2Config(
            vocab_size=v,
            num_hidden_layers=3,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=1,
            **COMMON,
        ),
        "qwen3": lambda v: Qwen3Config(vocab_size=v, num_hidden_layers=2, head_dim=16, **COMMON),
        "mistral": lambda v: MistralConfig(vocab_size=v, num_hidden_layers=2, sliding_window=None, **COMMON),
        "mistral-window": lambda v: MistralConfig(vocab_size=v, num_hidden_layers=3, sliding_window=WINDOW, **COMMON),
        "gemma2": lambda v: Gemma2Config(
            vocab_size=v,
            num_hidden_layers=3,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=WINDOW,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            **COMMON,
        ),
        "gemma3": lambda v: Gemma3TextConfig(
            vocab_size=v,
            num_hidden_layers=3,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=WINDOW,
            sliding_window_pattern=2,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            **COMMON,
        ),
        "phi3": lambda v: Phi3Config(vocab_size=v, num_hidden_layers=3, sliding_window=WINDOW, **COMMON),
    }


FAMILIES = sorted(_configs())
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
MLP = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
SLIDING = {"qwen2-window", "mistral-window", "gemma2", "gemma3", "phi3"}


def tiny_family_model(family: str, vocab_size: int, *, seed: int = 0):
    """A random model of `family` in eval mode (fp32, CPU), its attention as the family ships it."""
    torch.manual_seed(seed)
    config = _configs()[family](vocab_size)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1.0)
        model.get_output_embeddings().weight.normal_(0, 0.5)
        for name, module in model.named_modules():
            role = name.rsplit(".", 1)[-1]
            if isinstance(module, torch.nn.Linear) and role in ATTENTION:
                module.weight.normal_(0, 0.3)
            elif isinstance(module, torch.nn.Linear) and role in MLP:
                module.weight.normal_(0, 0.2)
    return model.eval()
