"""The trust region: each prompt vector stays within a cosine of its initial vector.

After every optimizer step each row v with cos(v, v0) < c is replaced by the vector in the
plane of (v0, v), at angle arccos(c) from v0, with v's own norm:

    v' = |v| * (c * u0 + sqrt(1 - c^2) * w),   u0 = v0/|v0|,  w = unit(v - (v.u0) u0)

Only the direction is constrained; the norm is whatever the optimizer made it (with Adam at
these learning rates it stays close to the token's norm, and `cosine_stats` reports it).
A tiny margin keeps rounding from reporting 0.9499999 for a bound of 0.95.
"""

from __future__ import annotations

import torch

MARGIN = 1e-5


def row_cosines(vectors: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """Cosine of each row to its initial row: [P]."""
    return torch.nn.functional.cosine_similarity(vectors.double(), initial.double(), dim=-1).to(vectors.dtype)


@torch.no_grad()
def project_to_cone(vectors: torch.Tensor, initial: torch.Tensor, min_cosine: float) -> int:
    """Project rows of `vectors` [P, D] in place into {v: cos(v, v0) >= min_cosine}; returns
    how many rows were moved."""
    v, v0 = vectors.double(), initial.double()
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [P, D]
    along = (v * u0).sum(-1, keepdim=True)  # [P, 1]
    norms = v.norm(dim=-1, keepdim=True)  # [P, 1]
    cos = along / norms.clamp_min(1e-12)
    target = min(min_cosine + MARGIN, 1.0)
    outside = (cos < min_cosine).squeeze(-1)  # [P]
    if not outside.any():
        return 0
    ortho = v - along * u0  # [P, D]
    ortho_norm = ortho.norm(dim=-1, keepdim=True)
    # A vector exactly opposite to v0 has no plane; any orthogonal direction will do.
    fallback = torch.randn(v.shape, dtype=v.dtype, device=v.device) if bool((ortho_norm < 1e-12).any()) else None
    if fallback is not None:
        fallback = fallback - (fallback * u0).sum(-1, keepdim=True) * u0
        ortho = torch.where(ortho_norm < 1e-12, fallback, ortho)
        ortho_norm = ortho.norm(dim=-1, keepdim=True)
    w = ortho / ortho_norm
    projected = norms * (target * u0 + (1 - target**2) ** 0.5 * w)  # [P, D]
    vectors[outside] = projected[outside].to(vectors.dtype)
    return int(outside.sum())


def cosine_stats(vectors: torch.Tensor, initial: torch.Tensor) -> dict:
    """Per-vector cosine to the init, their mean/min, and the norm ratio |v|/|v0|."""
    cos = row_cosines(vectors, initial)
    ratio = vectors.norm(dim=-1) / initial.norm(dim=-1).clamp_min(1e-12)
    return {
        "cosines": [round(float(c), 6) for c in cos],
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "norm_ratio_mean": float(ratio.mean()),
    }
