"""The served model's attention: transformers' SDPA, with native GQA for multi-token queries.

Models with grouped key/value heads (SmolLM2: 9 query heads over 3 KV heads) reach
transformers' SDPA path with a mask; for a query of more than one token it then copies every
KV head once per query head it serves (`repeat_kv`) before calling SDPA. A prefill on top of
a cached soft-prompt prefix pays that copy over the whole prefix, in every layer: for one
request with a 100-vector prompt it was 12 % of the prefill, the time to first token. SDPA
can read the grouped heads directly (`enable_gqa=True`), which is what this function does for
those queries. Single-token queries (decode steps) keep transformers' own path, which already
avoids the copy (`pack_gqa`). Registered with transformers' `AttentionInterface`, the public
hook for custom attention, under `NAME`; `use_gqa_sdpa(model)` switches a model to it.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from server.engine import packed

logger = logging.getLogger(__name__)

NAME = "softprompt_sdpa"


def gqa_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [B, H, q, d], key/value [B, H_kv, k, d] -> ([B, q, H, d], None), as transformers' SDPA.
    A packed pass (packed.py) hands its plan down as `softprompt_packed`: it attends per row."""
    plan = kwargs.get(packed.KWARG)
    if plan is not None:
        return packed.attend(query, key, value, plan, scaling), None
    plain = (
        query.shape[2] == 1
        or getattr(module, "num_key_value_groups", 1) == 1
        or attention_mask is None
        or query.device.type != "cpu"
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
    )
    if plain:  # decode steps, models without groups, CUDA, and anything this function does not cover
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    """Make `NAME` known to transformers (idempotent; done on first use, not at import)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, gqa_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the same masks as "sdpa"


def use_gqa_sdpa(model: torch.nn.Module) -> bool:
    """Switch a CPU model with grouped KV heads that runs transformers' SDPA attention to
    `gqa_sdpa_attention`, in place. Returns whether the model now uses it (models on another
    implementation, e.g. eager or flash attention, on CUDA, or without groups are left alone)."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation == NAME:
        return True
    param = next(model.parameters(), None)
    grouped = any(getattr(m, "num_key_value_groups", 1) > 1 for m in model.modules())
    if implementation != "sdpa" or param is None or param.device.type != "cpu" or not grouped:
        return False
    _register()
    model.set_attn_implementation(NAME)
    logger.info("attention: SDPA with native GQA for multi-token queries (%s)", NAME)
    return True


def packs_prefills(model: torch.nn.Module) -> bool:
    """Whether the engine can prefill new rows inside a decode step on `model` (packed.py): its
    attention must be this module's function, and every layer full attention."""
    return model.config._attn_implementation == NAME and packed.full_attention(model.config)
