"""Copy a folder store into a PostgreSQL store (`softprompt prompts migrate`), then verify it.

Everything is copied as it is, in one transaction: version numbers, tombstones (so a number
used once is still never reused), metadata, tensors byte for byte (the checksums recorded at
publish time still hold), aliases and evaluations. Then the copy is read back and compared
with the source, version by version; any difference is reported as an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tqdm import tqdm

from prompt_store.base import PromptStore
from prompt_store.errors import PromptStoreError
from prompt_store.names import VersionId
from prompt_store.postgres import PostgresStore, VersionRecord

logger = logging.getLogger(__name__)


class CopyMismatchError(PromptStoreError):
    """The copy read back differs from the source."""

    code = "copy_mismatch"


@dataclass
class CopyReport:
    names: int
    versions: int
    tombstones: int
    aliases: int
    evaluations: int

    def __str__(self) -> str:
        return (
            f"{self.versions} versions of {self.names} names, {self.tombstones} tombstones, "
            f"{self.aliases} aliases, {self.evaluations} evaluations"
        )


def read_records(source: PromptStore, *, progress: bool = True) -> list[VersionRecord]:
    """Every version number `source` has used, with the files of the live ones."""
    records = []
    numbers = {name: source._version_numbers(name, include_deleted=True) for name in source._used_names()}
    bar = tqdm(total=sum(map(len, numbers.values())), desc="reading", unit="version", disable=not progress)
    for name, used in numbers.items():
        live = set(source._version_numbers(name))
        for number in used:
            version_id = VersionId(name, number)
            if number in live:
                version = source._read_version(version_id)
                source.load(version)  # never copy a corrupted version: checksum, shape, finiteness
                records.append(
                    VersionRecord(
                        version_id,
                        version.meta,
                        source._adapter_config(version),
                        source._weights(version),
                        source.evaluations(version),
                    )
                )
            else:
                records.append(VersionRecord(version_id))
            bar.update()
    bar.close()
    return records


def copy_store(source: PromptStore, target: PostgresStore, *, progress: bool = True) -> CopyReport:
    records = read_records(source, progress=progress)
    live = {str(r.id) for r in records if not r.deleted}
    aliases = {a: t for a, t in source.aliases().items() if t in live}
    for alias in sorted(set(source.aliases()) - set(aliases)):  # a folder store can hold one whose target is gone
        logger.warning(
            "not copying alias %s: it points at %s, which is not a live version", alias, source.aliases()[alias]
        )
    target.insert_copies(records, aliases)
    verify_copy(records, aliases, target)
    live_records = [r for r in records if not r.deleted]
    report = CopyReport(
        names=len({r.id.name for r in records}),
        versions=len(live_records),
        tombstones=len(records) - len(live_records),
        aliases=len(aliases),
        evaluations=sum(len(r.evaluations) for r in live_records),
    )
    logger.info("copied %s from %s to %s", report, source.location, target.location)
    return report


def verify_copy(records: list[VersionRecord], aliases: dict[str, str], target: PromptStore) -> None:
    """Read every copied version back from `target` and compare it with the source's."""
    problems = []
    for name in sorted({r.id.name for r in records}):
        expected = [r.id.version for r in records if r.id.name == name]
        if target._version_numbers(name, include_deleted=True) != expected:
            problems.append(f"{name}: numbers {target._version_numbers(name, include_deleted=True)} != {expected}")
    for record in records:
        if record.deleted:
            continue
        copied = target._read_version(record.id)
        target.load(copied)  # the checksum recorded at publish time, against the copied bytes
        if copied.meta != record.meta or target._weights(copied) != record.weights:
            problems.append(f"{record.id}: metadata or tensor differs")
        if target._adapter_config(copied) != record.adapter_config:
            problems.append(f"{record.id}: adapter config differs")
        if target.evaluations(copied) != record.evaluations:
            problems.append(f"{record.id}: evaluations differ")
    copied_aliases = target.aliases()
    problems += [f"alias {a}: {copied_aliases.get(a)} != {t}" for a, t in aliases.items() if copied_aliases.get(a) != t]
    if problems:
        raise CopyMismatchError(f"the copy in {target.location} differs from the source: " + "; ".join(problems[:10]))
