"""Model fingerprint: what a soft prompt needs to match to be meaningful on a model."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class ModelFingerprint:
    """Hidden size, vocabulary size and a hash of the input-embedding matrix.

    The hash is taken over the matrix rounded to bfloat16, so the same weights loaded in
    fp32 (CPU) or bf16 (GPU) give the same fingerprint.
    """

    hidden_size: int
    vocab_size: int
    embedding_sha256: str | None = None

    @classmethod
    def of_embeddings(cls, weight: torch.Tensor) -> ModelFingerprint:
        """Fingerprint an input-embedding matrix `[V, D]`."""
        rounded = weight.detach().to("cpu", torch.bfloat16).contiguous()  # [V, D]
        digest = hashlib.sha256(rounded.view(torch.int16).numpy().tobytes()).hexdigest()
        vocab_size, hidden_size = rounded.shape
        return cls(hidden_size=hidden_size, vocab_size=vocab_size, embedding_sha256=digest)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelFingerprint:
        return cls(
            hidden_size=int(data["hidden_size"]),
            vocab_size=int(data["vocab_size"]),
            embedding_sha256=data.get("embedding_sha256"),
        )

    def mismatch(self, other: ModelFingerprint) -> str | None:
        """Describe how `other` (the loaded model) differs from this one, or None if compatible.

        Unknown parts (an adapter imported with no model given records vocab_size 0 and no
        hash) are not a mismatch: only the hidden size is checked then.
        """
        if self.hidden_size != other.hidden_size:
            return f"hidden size {self.hidden_size} != model's {other.hidden_size}"
        if self.vocab_size and other.vocab_size and self.vocab_size != other.vocab_size:
            return f"vocabulary size {self.vocab_size} != model's {other.vocab_size}"
        if self.embedding_sha256 and other.embedding_sha256 and self.embedding_sha256 != other.embedding_sha256:
            return "input-embedding matrix differs (made for another model with the same shape)"
        return None
