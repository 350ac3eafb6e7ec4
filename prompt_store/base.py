"""The store interface: what every backend (a folder, PostgreSQL) does the same way.

`PromptStore` holds the semantics shared by all backends: how references resolve (`math-v2`,
`math` = newest, `math-latest`, aliases), validation before anything is written, the metadata
a version carries, checksum and model checks on load, PEFT import and export. A backend
supplies storage primitives: list and read versions, write one version atomically under a
per-name lock (numbers never reused), aliases, tombstoned deletes, evaluation records, and a
cheap change signature. `open_store` (open.py) picks the backend from the location.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import os
import threading
from abc import ABC, abstractmethod
from datetime import UTC, datetime
from pathlib import Path

import torch

from core.fingerprint import ModelFingerprint
from prompt_store import peft_format
from prompt_store.errors import (
    ChecksumMismatchError,
    IdempotencyKeyReusedError,
    IncompatibleModelError,
    PromptNotFoundError,
)
from prompt_store.names import VersionId, parse_ref, validate_name
from prompt_store.version import LoadedPrompt, PromptVersion

logger = logging.getLogger(__name__)

META_FILE = "meta.json"
MAX_EVALUATIONS = 100  # per version; older records are dropped
FORMAT_VERSION = 1


class PromptStore(ABC):
    """Versioned, immutable, atomically published soft prompts."""

    location: str  # where the store lives, for messages (a folder, or a URL without its password)

    # ----------------------------------------------------------------- backend primitives
    @abstractmethod
    def names(self) -> list[str]:
        """Names that have at least one published version, sorted."""

    @abstractmethod
    def aliases(self) -> dict[str, str]:
        """Alias -> `name-vN`."""

    @abstractmethod
    def _version_numbers(self, name: str, *, include_deleted: bool = False) -> list[int]:
        """Published version numbers of `name`, ascending (with tombstones when asked)."""

    @abstractmethod
    def _read_version(self, version_id: VersionId) -> PromptVersion:
        """The metadata of a published version; PromptNotFoundError if there is none."""

    @abstractmethod
    def _weights(self, version: PromptVersion) -> bytes:
        """The bytes of the version's adapter_model.safetensors."""

    @abstractmethod
    def _adapter_config(self, version: PromptVersion) -> dict:
        """The version's adapter_config.json."""

    @abstractmethod
    def _write_version(
        self, name: str, weights: bytes, config: dict, meta: dict, idempotency: tuple[str, str] | None
    ) -> PromptVersion:
        """Under the name's lock (and the key's, with `idempotency`): return the live version of
        any name published earlier with `idempotency`'s key, refuse a name that is an alias, or
        take the next number (tombstones included) and write the whole version atomically."""

    @abstractmethod
    def _write_alias(self, alias: str, target: VersionId) -> None:
        """Point `alias` at `target`, checking under the locks that delete and publish take that
        `target` is live and that `alias` is no prompt name."""

    @abstractmethod
    def _remove_alias(self, alias: str) -> None:
        """Remove `alias`; PromptNotFoundError when there is no such alias."""

    @abstractmethod
    def delete(self, ref: str, *, force: bool = False) -> list[VersionId]:
        """Delete one version (`math-v2`) or every version of a name (`math`), leaving tombstones.

        Refuses (AliasInUseError) when an alias points at a deleted version unless `force`,
        which also removes those aliases. Evaluations of deleted versions go with them."""

    @abstractmethod
    def evaluations(self, ref: str | PromptVersion) -> list[dict]:
        """Scores recorded for a version after it was published, oldest first."""

    @abstractmethod
    def record_evaluation(self, ref: str | PromptVersion, record: dict) -> PromptVersion:
        """Keep `record` (a JSON object: data, metric, score, when) with the version, outside its
        immutable files; the newest MAX_EVALUATIONS are kept. Not for a deleted version."""

    @abstractmethod
    def signature(self) -> object:
        """A cheap value that changes whenever a version is published or deleted, or an alias moves."""

    @property
    def available(self) -> bool:
        """False while the store is known to be unreachable (a database that is away)."""
        return True

    def _used_names(self) -> list[str]:
        """Every name that has a version number in use, live or only tombstones, sorted."""
        return self.names()

    def wait_for_change(self, timeout: float, stop: threading.Event) -> None:
        """Block until the store may have changed, `timeout` passed or `stop` is set. Polling
        backends just wait; a backend that is told about changes returns as soon as one happens."""
        stop.wait(timeout)

    def collect_garbage(self) -> int:
        """Remove what publishers that died left behind; return how many things were removed."""
        return 0

    def close(self) -> None:
        """Release connections or other resources (the store is not used afterwards)."""

    def __enter__(self) -> PromptStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- reading
    def versions(self, name: str) -> list[PromptVersion]:
        """All published versions of `name`, oldest first (one deleted meanwhile is left out)."""
        validate_name(name)
        found = []
        for number in self._version_numbers(name):
            try:
                found.append(self._read_version(VersionId(name, number)))
            except PromptNotFoundError:  # deleted between listing and reading
                continue
        return found

    def catalog(self) -> tuple[dict[str, list[PromptVersion]], dict[str, str]]:
        """Every name's live versions (oldest first) and the aliases, for listings. A name whose
        last version is deleted while this reads is left out, never an error."""
        aliases = self.aliases()
        by_name = {name: self.versions(name) for name in self.names()}
        return {name: versions for name, versions in by_name.items() if versions}, aliases

    def resolve(self, ref: str) -> PromptVersion:
        """Find the version a reference names: `math-v2`, `math`/`math-latest` (newest), or an alias."""
        parsed = parse_ref(ref)
        if parsed.version is None:
            aliases = self.aliases()
            if parsed.name in aliases and not ref.endswith("-latest"):
                return self.resolve(aliases[parsed.name])
            numbers = self._version_numbers(parsed.name)
            if not numbers:
                raise self._not_found(ref)
            return self._read_version(VersionId(parsed.name, numbers[-1]))
        if parsed.version not in self._version_numbers(parsed.name):
            raise self._not_found(ref)
        return self._read_version(VersionId(parsed.name, parsed.version))

    def load(self, ref: str | PromptVersion, *, expect: ModelFingerprint | None = None) -> LoadedPrompt:
        """Load and validate a version: checksum, shape, finiteness, and model compatibility."""
        version = ref if isinstance(ref, PromptVersion) else self.resolve(ref)
        if expect is not None:  # first: no need to read a tensor made for another model
            self.check_compatible(version, expect)
        data = self._weights(version)
        where = f"{version.id} ({self.location})"
        if hashlib.sha256(data).hexdigest() != version.checksum:
            raise ChecksumMismatchError(
                f"{where}: {peft_format.ADAPTER_WEIGHTS} does not match the checksum recorded at publish "
                "time; it was modified or corrupted."
            )
        tensor = peft_format.weights_from_bytes(data, where=where)
        if tensor.shape[0] != version.num_virtual_tokens:
            raise ChecksumMismatchError(
                f"{version.id}: tensor has {tensor.shape[0]} vectors, meta says {version.num_virtual_tokens}."
            )
        return LoadedPrompt(version=version, embeddings=tensor)

    @staticmethod
    def check_compatible(version: PromptVersion, model: ModelFingerprint) -> None:
        """Raise IncompatibleModelError if `version` was not made for `model`."""
        problem = version.fingerprint.mismatch(model)
        if problem:
            raise IncompatibleModelError(
                f"{version.id} was made for {version.meta.get('base_model')!r} and does not fit the "
                f"loaded model: {problem}."
            )

    # ----------------------------------------------------------------- writing
    def publish(
        self,
        name: str,
        embeddings: torch.Tensor,
        *,
        fingerprint: ModelFingerprint,
        base_model: str,
        init_text: str | None = None,
        training_config: dict | None = None,
        metrics: dict | None = None,
        parent: str | None = None,
        extra: dict | None = None,
        num_layers: int | None = None,
        num_attention_heads: int | None = None,
        idempotency: tuple[str, str] | None = None,
    ) -> PromptVersion:
        """Publish `embeddings` `[P, D]` as the next version of `name`, atomically.

        `idempotency` is (key, SHA-256 of the request): when a version of `name` was already
        published with that key, it is returned instead of publishing again (a client's retry
        after a lost answer); the same key with another request raises IdempotencyKeyReusedError.
        The key is kept in the version's metadata, written in the same atomic step, so the
        check and the publish are one step under the name's lock."""
        validate_name(name)
        tensor = peft_format.validate_tensor(embeddings, where=f"prompt {name!r}")
        if tensor.shape[1] != fingerprint.hidden_size:
            raise IncompatibleModelError(
                f"prompt {name!r} has width {tensor.shape[1]} but the model's hidden size is {fingerprint.hidden_size}."
            )
        weights = peft_format.serialize_tensor(tensor)
        config = peft_format.adapter_config(
            num_virtual_tokens=tensor.shape[0],
            token_dim=tensor.shape[1],
            base_model=base_model,
            init_text=init_text,
            num_layers=num_layers,
            num_attention_heads=num_attention_heads,
        )
        meta = {
            "format_version": FORMAT_VERSION,
            "base_model": base_model,
            "fingerprint": fingerprint.to_dict(),
            "num_virtual_tokens": tensor.shape[0],
            "hidden_size": tensor.shape[1],
            "init_text": init_text,
            "training_config": training_config or {},
            "metrics": metrics or {},
            "parent": parent,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "tensor_sha256": hashlib.sha256(weights).hexdigest(),
            **(extra or {}),
        }
        if idempotency is not None:
            meta["idempotency_key"], meta["request_sha256"] = idempotency
        return self._write_version(name, weights, json_safe(config), json_safe(meta), idempotency)

    def import_adapter(
        self,
        folder: str | os.PathLike,
        name: str,
        *,
        fingerprint: ModelFingerprint | None = None,
        base_model: str | None = None,
    ) -> PromptVersion:
        """Publish an existing PEFT prompt-tuning adapter folder as the next version of `name`.

        Without a `fingerprint` only the hidden size (from the adapter) is recorded, and
        loading checks that alone.
        """
        tensor, config = peft_format.read_adapter(Path(folder))
        if fingerprint is None:
            fingerprint = ModelFingerprint(hidden_size=tensor.shape[1], vocab_size=0)
        return self.publish(
            name,
            tensor,
            fingerprint=fingerprint,
            base_model=base_model or config.get("base_model_name_or_path") or "unknown",
            init_text=config.get("prompt_tuning_init_text"),
            extra={"imported_from": str(Path(folder).resolve())},
            num_layers=config.get("num_layers"),
            num_attention_heads=config.get("num_attention_heads"),
        )

    def export(self, ref: str, destination: str | os.PathLike) -> Path:
        """Write a version's PEFT adapter folder (with meta.json) to `destination`."""
        version = self.resolve(ref)
        self.load(version)  # refuse to export a corrupted version
        destination = Path(destination)
        destination.mkdir(parents=True, exist_ok=True)
        files = {
            peft_format.ADAPTER_WEIGHTS: self._weights(version),
            peft_format.ADAPTER_CONFIG: json.dumps(self._adapter_config(version), indent=2).encode(),
            META_FILE: json.dumps(version.meta, indent=2).encode(),
        }
        for file_name, data in files.items():
            target = destination / file_name
            if target.exists():
                target.chmod(0o644)
            target.write_bytes(data)
            target.chmod(0o644)
        logger.info("exported %s to %s", version.id, destination)
        return destination

    def remove_alias(self, alias: str) -> None:
        """Remove `alias` (InvalidNameError for a name no alias can have, PromptNotFoundError when there is none)."""
        self._remove_alias(validate_name(alias, kind="alias"))

    def set_alias(self, alias: str, ref: str) -> VersionId:
        """Point `alias` at the version `ref` resolves to now (a fixed version, not a moving name)."""
        validate_name(alias, kind="alias")
        target = self.resolve(ref).id
        self._write_alias(alias, target)
        logger.info("alias %s -> %s", alias, target)
        return target

    # ----------------------------------------------------------------- helpers for backends
    @staticmethod
    def _earlier_answer(version: PromptVersion | None, key: str, request_sha256: str) -> PromptVersion | None:
        """The live version published under Idempotency-Key `key` (found by the backend under the
        key's lock), if it answered this same request; the key with another request is refused."""
        if version is None:
            return None
        if version.meta.get("request_sha256") != request_sha256:
            raise IdempotencyKeyReusedError(key, f"it published {version.id}")
        logger.info("%s was already published with this Idempotency-Key", version.id)
        return version

    def _not_found(self, ref: str) -> PromptNotFoundError:
        names = self.names()
        known = names + list(self.aliases())
        known += [f"{n}-v{v}" for n in names for v in self._version_numbers(n)]
        return PromptNotFoundError(ref, difflib.get_close_matches(ref, known, n=3, cutoff=0.5))


def json_safe(value):
    """`value` as every backend can keep it as JSON: non-finite numbers (a diverged run's loss)
    become null and NUL characters U+FFFD, so the folder and the database store the same."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {json_safe(str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
