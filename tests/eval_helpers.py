"""Labeled data and prompts for evaluation tests: two random versions that disagree on some rows."""

from __future__ import annotations

import json

import torch

LABELS = ("negative", "positive")
ROWS = [
    {"input": f"review {i}: {'great fun' if i % 3 else 'dull and slow'}", "output": LABELS[i % 3 != 0]}
    for i in range(40)
]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def publish_random(store, frozen, name: str, seed: int, vectors: int = 4):
    """Publish `vectors` random vectors (3 x N(0, 1)): large enough to change the untied model's choices."""
    generator = torch.Generator().manual_seed(seed)
    return store.publish(
        name,
        3 * torch.randn(vectors, frozen.fingerprint.hidden_size, generator=generator),
        fingerprint=frozen.fingerprint,
        base_model=frozen.base_model,
    )
