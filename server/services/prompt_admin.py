"""Prompt management behind the HTTP API: list, show, alias, upload (validated), delete.

Uploads accept a safetensors file holding `prompt_embeddings` [P, D] or a zip of a PEFT
prompt-tuning adapter folder. Both are validated (shape, finiteness, hidden size) before
they are published, and pre-warmed right after, so the new version is servable at once.
"""

from __future__ import annotations

import hashlib
import io
import logging
import zipfile
import zlib
from pathlib import PurePosixPath

from core.modeling import FrozenModel
from prompt_store import (
    IncompatibleModelError,
    InvalidAdapterError,
    PromptStore,
    PromptVersion,
    StoreUnavailableError,
)
from prompt_store.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_from_bytes, weights_from_bytes
from server.engine import PrefixCache
from server.services.errors import PayloadTooLargeError
from server.services.prompt_cache import PromptCache
from server.services.watcher import StoreWatcher

logger = logging.getLogger(__name__)

MAX_ZIP_MEMBERS = 16
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
ENCRYPTED = 0x1  # general-purpose flag bit of a password-protected member
COMPRESSIONS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
# What zipfile raises for a corrupt or unsupported archive: bad headers or CRC, broken deflate
# data, a truncated stream, features it lacks, impossible offsets or member names that are not UTF-8.
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, ValueError)


def version_info(version: PromptVersion) -> dict:
    meta = version.meta
    return {
        "id": str(version.id),
        "name": version.id.name,
        "version": version.id.version,
        "num_virtual_tokens": version.num_virtual_tokens,
        "hidden_size": meta.get("hidden_size"),
        "base_model": meta.get("base_model"),
        "created_at": meta.get("created_at"),
        "checksum": version.checksum,
        "init_text": meta.get("init_text"),
        "parent": meta.get("parent"),
        "metrics": {k: v for k, v in meta.get("metrics", {}).items() if k != "curve"},  # the curve: GET /prompts/{ref}
        "training_config": meta.get("training_config", {}),
    }


class PromptAdmin:
    def __init__(
        self,
        store: PromptStore,
        frozen: FrozenModel,
        prompts: PromptCache,
        prefixes: PrefixCache,
        watcher: StoreWatcher | None,
        *,
        max_upload_bytes: int,
    ):
        self.store, self.frozen, self.prompts, self.prefixes, self.watcher = store, frozen, prompts, prefixes, watcher
        self.max_upload_bytes = max_upload_bytes

    def list(self) -> dict:
        by_name, aliases = self.store.catalog()
        prompts = []
        for name, found in by_name.items():
            versions = [version_info(v) for v in found]
            prompts.append(
                {
                    "name": name,
                    "latest": versions[-1]["id"],
                    "versions": versions,
                    "aliases": sorted(a for a, t in aliases.items() if t.rsplit("-v", 1)[0] == name),
                }
            )
        return {"prompts": prompts, "aliases": aliases}

    def show(self, ref: str) -> dict:
        version = self.store.resolve(ref)
        problem = version.fingerprint.mismatch(self.frozen.fingerprint)
        return {
            **version_info(version),
            "ref": ref,
            "compatible": problem is None,
            "incompatibility": problem,
            "versions": [str(v.id) for v in self.store.versions(version.id.name)],
            "meta": version.meta,
            "evaluations": self.store.evaluations(version),
        }

    def set_alias(self, alias: str, target: str) -> dict:
        version_id = self.store.set_alias(alias, target)
        self._warm(self.store.resolve(str(version_id)))
        return {"alias": alias, "target": str(version_id)}

    def remove_alias(self, alias: str) -> None:
        self.store.remove_alias(alias)

    def delete(self, ref: str, *, force: bool) -> list[str]:
        removed = self.store.delete(ref, force=force)
        for version_id in removed:
            self.prompts.evict_prompt(version_id.name, version_id.version)
            self.prefixes.evict_prompt(version_id.name, version_id.version)
        return [str(v) for v in removed]

    def upload(self, name: str, filename: str, data: bytes, *, idempotency_key: str | None = None) -> dict:
        if len(data) > self.max_upload_bytes:
            raise PayloadTooLargeError(
                self.max_upload_bytes, f"The upload is {len(data)} bytes; the limit is {self.max_upload_bytes}."
            )
        if data[:4] == b"PK\x03\x04":
            tensor, config = self._read_zip(data, filename or "upload.zip")
            base_model = config.get("base_model_name_or_path") or self.frozen.base_model
            init_text = config.get("prompt_tuning_init_text")
        else:
            tensor = weights_from_bytes(data, where=filename or "upload")
            base_model, init_text = self.frozen.base_model, None
        hidden = self.frozen.fingerprint.hidden_size
        if tensor.shape[1] != hidden:
            raise IncompatibleModelError(
                f"{filename or 'upload'}: prompt width {tensor.shape[1]} does not match the served model's hidden "
                f"size {hidden}."
            )
        # Uploaded for the model this server runs: record its full fingerprint.
        idempotency = (idempotency_key, _request_sha256(name, data)) if idempotency_key else None
        version = self.store.publish(
            name,
            tensor,
            fingerprint=self.frozen.fingerprint,
            base_model=base_model,
            init_text=init_text,
            extra={"uploaded_as": filename},
            idempotency=idempotency,
        )
        self._warm(version)
        return version_info(version)

    def _warm(self, version: PromptVersion) -> None:
        if self.watcher is not None:
            try:
                self.watcher.warm(version)
            except StoreUnavailableError as exc:  # published already: the watcher warms it once the store answers
                logger.warning("could not pre-warm %s now: %s", version.id, exc)

    def _read_zip(self, data: bytes, shown: str):
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except ZIP_ERRORS as exc:
            raise InvalidAdapterError(f"not a readable zip file ({exc}).") from exc
        members = [m for m in archive.infolist() if not m.is_dir()]
        declared = sum(m.file_size for m in members)
        if len(members) > MAX_ZIP_MEMBERS or declared > self.max_upload_bytes:
            raise PayloadTooLargeError(
                self.max_upload_bytes, f"The upload is {declared} bytes; the limit is {self.max_upload_bytes}."
            )
        configs = [m for m in members if PurePosixPath(m.filename).name == ADAPTER_CONFIG]
        if len(configs) != 1:
            raise InvalidAdapterError(f"the zip must hold exactly one {ADAPTER_CONFIG} (found {len(configs)}).")
        folder = PurePosixPath(configs[0].filename).parent
        files = {}
        for member in members:
            path = PurePosixPath(member.filename)
            if path.parent == folder and path.name in ADAPTER_FILES:
                files[path.name] = _read_member(archive, member)
        # named as the client knows them: adapter.zip:adapter/adapter_model.safetensors
        where, join = (shown, ":") if str(folder) == "." else (f"{shown}:{folder}", "/")
        return adapter_from_bytes(files.get(ADAPTER_CONFIG), files.get(ADAPTER_WEIGHTS), where=where, join=join)


def _read_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> bytes:
    """A member's bytes, read no further than its declared size (so a member that inflates past
    it fails its CRC check), which they must fill exactly."""
    name = member.filename
    if member.flag_bits & ENCRYPTED:
        raise InvalidAdapterError(f"{name}: the zip member is encrypted; zip the adapter without a password.")
    if member.compress_type not in COMPRESSIONS:
        raise InvalidAdapterError(
            f"{name}: compression method {member.compress_type} is not supported; zip it stored or deflated."
        )
    try:
        with archive.open(member) as handle:
            content = handle.read(member.file_size)
    except ZIP_ERRORS as exc:
        raise InvalidAdapterError(f"{name}: corrupt zip member ({exc}).") from exc
    if len(content) != member.file_size:
        raise InvalidAdapterError(f"{name}: decompresses to another size than the {member.file_size} bytes declared.")
    return content


def _request_sha256(name: str, data: bytes) -> str:
    """What makes two uploads the same request: the name and the file's bytes."""
    return hashlib.sha256(name.encode() + b"\0" + data).hexdigest()
