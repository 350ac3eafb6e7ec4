"""The versioned prompt store on the filesystem.

Layout under the root::

    prompts/<name>/v<N>/adapter_config.json       PEFT prompt-tuning config
    prompts/<name>/v<N>/adapter_model.safetensors  {"prompt_embeddings": [P, D]}
    prompts/<name>/v<N>/meta.json                  our metadata (fingerprint, checksum, ...)
    prompts/<name>/v<N>.deleted                    tombstone: version numbers are never reused
    aliases.json                                   {"math-prod": "math-v2", ...}
    evaluations/<name>/v<N>.json                   scores measured later (mutable, outside the version)
    .locks/                                        file locks (one per name, one for aliases, one for
                                                   Idempotency-Keys), always taken in that order:
                                                   aliases or key, then name
    .tmp/<pid>-<uuid>/                             versions being written

A version is written completely under `.tmp/`, fsync'd, then renamed into place, so a crash
leaves the old state or the whole new version. Published files are read-only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

from filelock import FileLock

from core.atomic import fsync_dir, pid_alive, replace_json_atomically, write_bytes_durably
from core.settings import absolute
from prompt_store import peft_format
from prompt_store.base import MAX_EVALUATIONS, META_FILE, PromptStore, json_safe
from prompt_store.errors import AliasInUseError, NameConflictError
from prompt_store.names import VersionId, parse_ref
from prompt_store.version import PromptVersion

logger = logging.getLogger(__name__)

STAGING_MAX_AGE_SECONDS = 600.0  # a publish or delete holds its .tmp folder for well under a second


class FolderStore(PromptStore):
    """The store in a folder on one machine (the embedded default)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(absolute(root))
        self.location = str(self.root)
        self._prompts = self.root / "prompts"
        self._locks = self.root / ".locks"
        self._tmp = self.root / ".tmp"
        self._aliases_path = self.root / "aliases.json"
        self._evaluations = self.root / "evaluations"
        for folder in (self._prompts, self._locks, self._tmp):
            folder.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------- reading
    def names(self) -> list[str]:
        return sorted(p.name for p in self._prompts.iterdir() if p.is_dir() and self._version_numbers(p.name))

    def _used_names(self) -> list[str]:
        return sorted(
            p.name
            for p in self._prompts.iterdir()
            if p.is_dir() and self._version_numbers(p.name, include_deleted=True)
        )

    def aliases(self) -> dict[str, str]:
        if not self._aliases_path.exists():
            return {}
        return json.loads(self._aliases_path.read_text())

    def _weights(self, version: PromptVersion) -> bytes:
        return self._read_file(version, peft_format.ADAPTER_WEIGHTS)

    def _adapter_config(self, version: PromptVersion) -> dict:
        return json.loads(self._read_file(version, peft_format.ADAPTER_CONFIG))

    def _read_file(self, version: PromptVersion, filename: str) -> bytes:
        """A file of a version read by an earlier lookup; if the version was deleted since (its
        folder is renamed away), the same not-found the PostgreSQL store gives."""
        try:
            return (version.path / filename).read_bytes()
        except FileNotFoundError:
            raise self._not_found(str(version.id)) from None

    def signature(self) -> tuple:
        entries = []
        for folder in self._prompts.iterdir():
            if folder.is_dir():
                entries.append((folder.name, folder.stat().st_mtime_ns, tuple(self._version_numbers(folder.name))))
        alias_mtime = self._aliases_path.stat().st_mtime_ns if self._aliases_path.exists() else 0
        return (tuple(sorted(entries)), alias_mtime)

    # ----------------------------------------------------------------- evaluations
    def evaluations(self, ref: str | PromptVersion) -> list[dict]:
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
        """Evaluations live beside the version's files and are replaced atomically, so a crash
        keeps the older list."""
        version = ref if isinstance(ref, PromptVersion) else self.resolve(ref)
        path = self._evaluations_path(version.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(
            self._locks / f"{version.id.name}.lock"
        ):  # the lock delete takes: no record for a deleted version
            if version.id.version not in self._version_numbers(version.id.name):
                raise self._not_found(str(version.id))
            records = [*self.evaluations(version), json_safe(record)][-MAX_EVALUATIONS:]
            replace_json_atomically(path, records)
        logger.info("recorded an evaluation of %s: %s %s", version.id, record.get("metric"), record.get("score"))
        return version

    def _evaluations_path(self, version_id: VersionId) -> Path:
        return self._evaluations / version_id.name / f"v{version_id.version}.json"

    # ----------------------------------------------------------------- writing
    def _write_version(
        self, name: str, weights: bytes, config: dict, meta: dict, idempotency: tuple[str, str] | None
    ) -> PromptVersion:
        """Write the version completely under `.tmp/`, fsync it, then rename it into place."""
        staging = self._tmp / f"{os.getpid()}-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            # a key answers one upload across every name: its look-up and the publish are one step
            with (
                FileLock(self._locks / "_idempotency.lock") if idempotency else nullcontext(),
                FileLock(self._locks / f"{name}.lock"),
            ):
                earlier = (
                    self._earlier_answer(self._published_with_key(idempotency[0]), *idempotency)
                    if idempotency
                    else None
                )
                if earlier is not None:
                    shutil.rmtree(staging, ignore_errors=True)
                    return earlier
                if name in self.aliases():  # an alias is written under this name's lock too (_write_alias)
                    raise NameConflictError(f"{name!r} is an alias; choose another prompt name or remove the alias.")
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
        logger.info("published %s (%d vectors) to %s", version_id, meta["num_virtual_tokens"], name_dir / f"v{number}")
        return self._read_version(version_id)

    def _published_with_key(self, key: str) -> PromptVersion | None:
        """The live version of any name whose metadata holds Idempotency-Key `key` (under the key's lock)."""
        for name in self.names():
            for version in self.versions(name):
                if version.meta.get("idempotency_key") == key:
                    return version
        return None

    def _write_alias(self, alias: str, target: VersionId) -> None:
        """Under the aliases lock, which delete holds while it deletes, and the alias name's lock,
        which publish holds: the target is live and the alias is no prompt name when it is written."""
        with FileLock(self._locks / "_aliases.lock"), FileLock(self._locks / f"{alias}.lock"):
            if self._version_numbers(alias):
                raise NameConflictError(f"{alias!r} is a prompt name; an alias must have a name of its own.")
            if target.version not in self._version_numbers(target.name):  # deleted since it was resolved
                raise self._not_found(str(target))
            aliases = self.aliases()
            aliases[alias] = str(target)
            replace_json_atomically(self._aliases_path, aliases)

    def _remove_alias(self, alias: str) -> None:
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
        # What to delete is read under both locks: a delete racing this one, or an alias moving
        # onto one of these versions, is either wholly before or wholly after it.
        with FileLock(self._locks / "_aliases.lock"), FileLock(self._locks / f"{parsed.name}.lock"):
            aliases = self.aliases()
            if parsed.version is None and parsed.name in aliases:
                raise NameConflictError(f"{ref!r} is an alias; remove it with the alias command, not delete.")
            numbers = self._version_numbers(parsed.name)
            targets = [VersionId(parsed.name, n) for n in numbers if parsed.version in (None, n)]
            if not targets:
                raise self._not_found(ref)
            pointing = {a: t for a, t in aliases.items() if t in {str(v) for v in targets}}
            if pointing and not force:
                raise AliasInUseError(
                    f"Aliases point at {ref}: {', '.join(f'{a} -> {t}' for a, t in sorted(pointing.items()))}. "
                    "Move them first or delete with force."
                )
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

    def _read_version(self, version_id: VersionId) -> PromptVersion:
        path = self._prompts / version_id.name / f"v{version_id.version}"
        try:
            meta = json.loads((path / META_FILE).read_text())
        except FileNotFoundError:
            raise self._not_found(str(version_id)) from None
        return PromptVersion(id=version_id, path=path, meta=meta)
