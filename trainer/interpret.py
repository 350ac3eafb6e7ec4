"""Reading an optimized prompt back as text: nearest vocabulary token for each vector.

The "hard-prompt distillation" replaces every vector by its nearest token's embedding; its
metric tells how much of the gain survives as a plain text prompt.
"""

from __future__ import annotations

import torch

from core.modeling import FrozenModel


@torch.no_grad()
def nearest_tokens(frozen: FrozenModel, vectors: torch.Tensor) -> list[dict]:
    """For each row of `vectors` [P, D]: the vocabulary token with the highest cosine."""
    table = frozen.embedding.weight.float()  # [V, D]
    table = table / table.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    rows = vectors.float().to(table.device)
    rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [P, D]
    cos, ids = (rows @ table.T).max(dim=-1)  # [P]
    return [
        {
            "token_id": int(i),
            "token": frozen.tokenizer.convert_ids_to_tokens(int(i)),
            "text": frozen.tokenizer.decode([int(i)]),
            "cosine": round(float(c), 4),
        }
        for i, c in zip(ids, cos)
    ]


@torch.no_grad()
def hard_prompt(frozen: FrozenModel, vectors: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The projected prompt: nearest tokens' embeddings [P, D] (fp32 cpu) and their text."""
    ids = [t["token_id"] for t in nearest_tokens(frozen, vectors)]
    embeds = frozen.embedding(torch.tensor(ids, device=frozen.device)).float().cpu()
    return embeds, frozen.tokenizer.decode(ids)
