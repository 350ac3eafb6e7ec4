"""Model rewrites for serving, applied once where the app builds its state and reported there
(never as a side effect of building an Engine). Each keeps the model's numbers up to rounding:

- q/k/v and gate/up as one matrix product each (fused_linear.py);
- every linear layer through a copy of its weight packed for oneDNN (packed_linear.py; CPU fp32);
- prefills read grouped key/value heads in place (attention.py; CPU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from server.engine.attention import use_gqa_sdpa
from server.engine.fused_linear import fuse_projections
from server.engine.packed_linear import pack_linear_layers


@dataclass(frozen=True)
class ServingRewrites:
    fused_projection_groups: int
    packed_weights_bytes: int
    attention: str

    def as_dict(self) -> dict:
        return asdict(self)


def prepare_for_serving(
    model,
    *,
    fused_projections: bool = True,
    packed_weights: bool = True,
    gqa_attention: bool = True,
    max_batch_size: int = 16,
) -> ServingRewrites:
    """Rewrite `model` in place for serving (each rewrite is idempotent) and say what was done.
    Fusing comes first: it skips layers that are already packed."""
    fused = fuse_projections(model) if fused_projections else 0
    packed = pack_linear_layers(model, max_batch_size) if packed_weights else 0
    if gqa_attention:
        use_gqa_sdpa(model)
    return ServingRewrites(fused, packed, model.config._attn_implementation)
