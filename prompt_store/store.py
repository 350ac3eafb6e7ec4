"""The versioned prompt store on the filesystem.

Layout under the root::

    prompts/<name>/v<N>/adapter_config.json       PEFT prompt-tuning config
    prompts/<name>/v<N>/adapter_model.safetensors  {"prompt_embeddings": [P, D]}
    prompts/<name>/v<N>/meta.json                  our metadata (fingerprint, checksum, ...)
    prompts/<name>/v<N>.deleted                    tombstone: version numbers are never reused
    aliases.json                                   {"math-prod": "math-v2", ...}
    evaluations/<name>/v<N>.json                   scores measured later (mutable, outside the version)
    .locks/                                        file locks (one per name, one for aliases)
    .tmp/<pid>-<uuid>/                             versions being written

A version is written completely under `.tmp/`, fsync'd, then renamed into place, so a crash
leaves the old state or the whole new version. Published files are read-only.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import shutil
import stat
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import torch
from filelock import FileLock

from . import peft_format
from .atomic import fsync_dir, pid_alive, replace_json_atomically, write_bytes_durably
from .errors import (
    AliasInUseError,
    ChecksumMismatchError,
    IdempotencyKeyReusedError,
    IncompatibleModelError,
    NameConflictError,
    PromptNotFoundError,
)
from .fingerprint import ModelFingerprint
from .names import VersionId, parse_ref, validate_name
from .version import LoadedPrompt, PromptVersion

logger = logging.getLogger(__name__)

META_FILE = "meta.json"
MAX_EVALUATIONS = 100  # per version; older records are dropped
STAGING_MAX_AGE_SECONDS = 600.0  # a publish or delete holds its .tmp folder for well under a second
FORMAT_VERSION = 1


class PromptStore:
    """Versioned, immutable, atomically published soft prompts."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._prompts = self.root / "prompts"
        self._locks = self.root / ".locks"
        self._tmp = self.root / ".tmp"
        self._aliases_path = self.root / "aliases.json"
        self._evaluations = self.root / "evaluations"
        for folder in (self._prompts, self._locks, self._tmp):
            folder.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------- reading
    def names(self) -> list[str]:
        """Names that have at least one published version, sorted."""
        return sorted(p.name for p in self._prompts.iterdir() if p.is_dir() and self._version_numbers(p.name))

    def versions(self, name: str) -> list[PromptVersion]:
        """All published versions of `name`, oldest first."""
        validate_name(name)
        return [self._read_version(VersionId(name, n)) for n in self._version_numbers(name)]

    def aliases(self) -> dict[str, str]:
        """Alias -> `name-vN`."""
        if not self._aliases_path.exists():
            return {}
        return json.loads(self._aliases_path.read_text())

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
        if expect is not None:  # first: no need to read a file made for another model
            self.check_compatible(version, expect)
        weights = version.path / peft_format.ADAPTER_WEIGHTS
        data = weights.read_bytes()
        if hashlib.sha256(data).hexdigest() != version.checksum:
            raise ChecksumMismatchError(
                f"{version.id}: {weights} does not match the checksum recorded at publish time; "
                "the file was modified or corrupted."
            )
        tensor = peft_format.read_weights(weights)
        if tensor.shape[0] != version.num_virtual_tokens:
            raise ChecksumMismatchError(f"{version.id}: tensor has {tensor.shape[0]} vectors, meta says {version.num_virtual_tokens}.")
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

    def signature(self) -> tuple:
        """A cheap value that changes whenever a version is published or deleted, or an alias moves."""
        entries = []
        for folder in self._prompts.iterdir():
            if folder.is_dir():
                entries.append((folder.name, folder.stat().st_mtime_ns, tuple(self._version_numbers(folder.name))))
        alias_mtime = self._aliases_path.stat().st_mtime_ns if self._aliases_path.exists() else 0
        return (tuple(sorted(entries)), alias_mtime)

    # ----------------------------------------------------------------- evaluations
    def evaluations(self, ref: str | PromptVersion) -> list[dict]:
        """Scores recorded for a version after it was published, oldest first."""
        version = ref if isinstance(ref, PromptVersion) else self.resolve(ref)
        path = self._evaluations_path(version.id)
        try:
            records = json.loads(path.read_text())
        except FileNotFoundError:
            return []
        except ValueError:
            logger.warning("ignoring unreadable evaluations file %s", path)
            return []
        return records if isinstance(records, list) else []

    def record_evaluation(self, ref: str | PromptVersion, record: dict) -> PromptVersion:
        """Keep `record` (a JSON object: data, metric, score, when) with the version.

        The version's own files stay untouched: evaluations live beside them and are replaced
        atomically, so a crash keeps the older list. The newest MAX_EVALUATIONS are kept."""
        version = ref if isinstance(ref, PromptVersion) else self.resolve(ref)
        path = self._evaluations_path(version.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(self._locks / f"{version.id.name}.lock"):  # the lock delete takes: no record for a deleted version
            if version.id.version not in self._version_numbers(version.id.name):
                raise self._not_found(str(version.id))
            records = [*self.evaluations(version), record][-MAX_EVALUATIONS:]
            replace_json_atomically(path, records)
        logger.info("recorded an evaluation of %s: %s %s", version.id, record.get("metric"), record.get("score"))
        return version

    def _evaluations_path(self, version_id: VersionId) -> Path:
        return self._evaluations / version_id.name / f"v{version_id.version}.json"

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
        The key is written in the version's meta.json in the same rename, so the check and the
        publish are one step under the name's lock."""
        validate_name(name)
        if name in self.aliases():
            raise NameConflictError(f"{name!r} is an alias; choose another prompt name or remove the alias.")
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
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "tensor_sha256": hashlib.sha256(weights).hexdigest(),
            **(extra or {}),
        }
        if idempotency is not None:
            meta["idempotency_key"], meta["request_sha256"] = idempotency
        staging = self._tmp / f"{os.getpid()}-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            with FileLock(self._locks / f"{name}.lock"):
                earlier = self._published_with(name, *idempotency) if idempotency is not None else None
                if earlier is not None:
                    shutil.rmtree(staging, ignore_errors=True)
                    logger.info("%s was already published with this Idempotency-Key", earlier.id)
                    return earlier
                number = max(self._version_numbers(name, include_deleted=True), default=0) + 1
                version_id = VersionId(name, number)
                meta["name"], meta["version"], meta["id"] = name, number, str(version_id)
                write_bytes_durably(staging / peft_format.ADAPTER_WEIGHTS, weights)
                write_bytes_durably(staging / peft_format.ADAPTER_CONFIG, json.dumps(config, indent=2).encode())
                write_bytes_durably(staging / META_FILE, json.dumps(meta, indent=2).encode())
                for child in staging.iterdir():
                    child.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
                fsync_dir(staging)
                name_dir = self._prompts / name
                name_dir.mkdir(exist_ok=True)
                os.rename(staging, name_dir / f"v{number}")
                fsync_dir(name_dir)
                fsync_dir(self._prompts)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("published %s (%d vectors) to %s", version_id, tensor.shape[0], name_dir / f"v{number}")
        return self._read_version(version_id)

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
        """Copy a version's PEFT adapter folder (with meta.json) to `destination`."""
        version = self.resolve(ref)
        self.load(version)  # refuse to export a corrupted version
        destination = Path(destination)
        destination.mkdir(parents=True, exist_ok=True)
        for child in version.path.iterdir():
            target = destination / child.name
            shutil.copyfile(child, target)
            target.chmod(0o644)
        logger.info("exported %s to %s", version.id, destination)
        return destination

    def set_alias(self, alias: str, ref: str) -> VersionId:
        """Point `alias` at the version `ref` resolves to now (a fixed version, not a moving name)."""
        validate_name(alias, kind="alias")
        if self._version_numbers(alias):
            raise NameConflictError(f"{alias!r} is a prompt name; an alias must have a name of its own.")
        target = self.resolve(ref).id
        with FileLock(self._locks / "_aliases.lock"):
            aliases = self.aliases()
            aliases[alias] = str(target)
            replace_json_atomically(self._aliases_path, aliases)
        logger.info("alias %s -> %s", alias, target)
        return target

    def remove_alias(self, alias: str) -> None:
        with FileLock(self._locks / "_aliases.lock"):
            aliases = self.aliases()
            if alias not in aliases:
                raise self._not_found(alias)
            del aliases[alias]
            replace_json_atomically(self._aliases_path, aliases)

    def delete(self, ref: str, *, force: bool = False) -> list[VersionId]:
        """Delete one version (`math-v2`) or every version of a name (`math`).

        Refuses when an alias points at a deleted version unless `force`, which also removes
        those aliases. Version numbers are never reused.
        """
        parsed = parse_ref(ref)
        if parsed.version is None and parsed.name in self.aliases():
            raise NameConflictError(f"{ref!r} is an alias; remove it with the alias command, not delete.")
        numbers = self._version_numbers(parsed.name)
        targets = [VersionId(parsed.name, n) for n in numbers if parsed.version in (None, n)]
        if not targets:
            raise self._not_found(ref)
        with FileLock(self._locks / "_aliases.lock"):
            aliases = self.aliases()
            pointing = {a: t for a, t in aliases.items() if t in {str(v) for v in targets}}
            if pointing and not force:
                raise AliasInUseError(
                    f"Aliases point at {ref}: {', '.join(f'{a} -> {t}' for a, t in sorted(pointing.items()))}. "
                    "Move them first or delete with force."
                )
            with FileLock(self._locks / f"{parsed.name}.lock"):
                for version_id in targets:
                    folder = self._prompts / version_id.name / f"v{version_id.version}"
                    tombstone = folder.with_name(f"v{version_id.version}.deleted")
                    write_bytes_durably(tombstone, b"")
                    trash = self._tmp / f"{os.getpid()}-deleted-{uuid.uuid4().hex}"
                    os.rename(folder, trash)
                    fsync_dir(folder.parent)
                    shutil.rmtree(trash)
                    self._evaluations_path(version_id).unlink(missing_ok=True)
            if pointing:
                replace_json_atomically(self._aliases_path, {a: t for a, t in aliases.items() if a not in pointing})
        logger.info("deleted %s", ", ".join(map(str, targets)))
        return targets

    def collect_garbage(self, *, older_than_seconds: float = STAGING_MAX_AGE_SECONDS) -> int:
        """Remove temp folders left by publishers and deleters that died; return how many were removed.

        A folder goes when its owner's pid is gone, or when it is older than any publish takes
        (a pid can live on: in a container every server is pid 1)."""
        removed = 0
        cutoff = time.time() - older_than_seconds
        for folder in self._tmp.iterdir():
            owner = folder.name.split("-", 1)[0]
            try:
                stale = folder.stat().st_mtime < cutoff
            except FileNotFoundError:  # its publisher just renamed it into place
                continue
            if stale or (owner.isdigit() and not pid_alive(int(owner))):
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        return removed

    # ----------------------------------------------------------------- helpers
    def _version_numbers(self, name: str, *, include_deleted: bool = False) -> list[int]:
        folder = self._prompts / name
        if not folder.is_dir():
            return []
        numbers = set()
        for child in folder.iterdir():
            stem, _, suffix = child.name.partition(".")
            if stem.startswith("v") and stem[1:].isdigit():
                if suffix == "" and child.is_dir() and (child / META_FILE).is_file():
                    numbers.add(int(stem[1:]))
                elif suffix == "deleted" and include_deleted:
                    numbers.add(int(stem[1:]))
        return sorted(numbers)

    def _published_with(self, name: str, key: str, request_sha256: str) -> PromptVersion | None:
        """The version of `name` published under Idempotency-Key `key`, if any (call under the name's lock)."""
        for number in self._version_numbers(name):
            version = self._read_version(VersionId(name, number))
            if version.meta.get("idempotency_key") == key:
                if version.meta.get("request_sha256") != request_sha256:
                    raise IdempotencyKeyReusedError(key, f"it published {version.id}")
                return version
        return None

    def _read_version(self, version_id: VersionId) -> PromptVersion:
        path = self._prompts / version_id.name / f"v{version_id.version}"
        try:
            meta = json.loads((path / META_FILE).read_text())
        except FileNotFoundError:
            raise self._not_found(str(version_id)) from None
        return PromptVersion(id=version_id, path=path, meta=meta)

    def _not_found(self, ref: str) -> PromptNotFoundError:
        known = self.names() + list(self.aliases())
        known += [f"{n}-v{v}" for n in self.names() for v in self._version_numbers(n)]
        return PromptNotFoundError(ref, difflib.get_close_matches(ref, known, n=3, cutoff=0.5))

