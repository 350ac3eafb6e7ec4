"""One published version of a prompt: its metadata, and its tensor once loaded and validated."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.fingerprint import ModelFingerprint
from prompt_store.names import VersionId


@dataclass(frozen=True)
class PromptVersion:
    """Metadata of one published version (the contents of its meta.json)."""

    id: VersionId
    path: Path | None  # the version's folder in a folder store; None where the files live in a database
    meta: dict

    @property
    def checksum(self) -> str:
        return self.meta["tensor_sha256"]

    @property
    def fingerprint(self) -> ModelFingerprint:
        return ModelFingerprint.from_dict(self.meta["fingerprint"])

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.meta["num_virtual_tokens"])


@dataclass(frozen=True)
class LoadedPrompt:
    """A validated prompt tensor ready to prepend: `embeddings` is fp32 `[P, D]` on CPU."""

    version: PromptVersion
    embeddings: torch.Tensor = field(repr=False)

    @property
    def cache_key(self) -> tuple[str, int, str]:
        """Identity for caches: name, version and checksum (never the name alone)."""
        return (self.version.id.name, self.version.id.version, self.version.checksum)
