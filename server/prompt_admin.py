"""Prompt management behind the HTTP API: list, show, alias, upload (validated), delete.

Uploads accept a safetensors file holding `prompt_embeddings` [P, D] or a zip of a PEFT
prompt-tuning adapter folder. Both are validated (shape, finiteness, hidden size) before
they are published, and pre-warmed right after, so the new version is servable at once.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from prompt_store import IncompatibleModelError, InvalidAdapterError, PromptStore, PromptVersion
from prompt_store.peft_format import ADAPTER_CONFIG, read_adapter, read_weights
from trainer.modeling import FrozenModel

from .engine import PrefixCache, PromptCache
from .errors import PayloadTooLargeError
from .watcher import StoreWatcher

MAX_ZIP_MEMBERS = 16


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
        "metrics": meta.get("metrics", {}),
        "training_config": meta.get("training_config", {}),
    }


class PromptAdmin:
    def __init__(self, store: PromptStore, frozen: FrozenModel, prompts: PromptCache, prefixes: PrefixCache,
                 watcher: StoreWatcher | None, *, max_upload_bytes: int):
        self.store, self.frozen, self.prompts, self.prefixes, self.watcher = store, frozen, prompts, prefixes, watcher
        self.max_upload_bytes = max_upload_bytes

    def list(self) -> dict:
        aliases = self.store.aliases()
        prompts = []
        for name in self.store.names():
            versions = [version_info(v) for v in self.store.versions(name)]
            prompts.append({"name": name, "latest": versions[-1]["id"], "versions": versions,
                            "aliases": sorted(a for a, t in aliases.items() if t.rsplit("-v", 1)[0] == name)})
        return {"prompts": prompts, "aliases": aliases}

    def show(self, ref: str) -> dict:
        version = self.store.resolve(ref)
        problem = version.fingerprint.mismatch(self.frozen.fingerprint)
        return {**version_info(version), "ref": ref, "compatible": problem is None, "incompatibility": problem,
                "versions": [str(v.id) for v in self.store.versions(version.id.name)], "meta": version.meta}

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

    def upload(self, name: str, filename: str, data: bytes) -> dict:
        if len(data) > self.max_upload_bytes:
            raise PayloadTooLargeError(len(data), self.max_upload_bytes)
        if data[:4] == b"PK\x03\x04":
            tensor, config = self._read_zip(data)
            base_model = config.get("base_model_name_or_path") or self.frozen.base_model
            init_text = config.get("prompt_tuning_init_text")
        else:
            tensor = self._read_safetensors(data)
            base_model, init_text = self.frozen.base_model, None
        hidden = self.frozen.fingerprint.hidden_size
        if tensor.shape[1] != hidden:
            raise IncompatibleModelError(
                f"{filename or 'upload'}: prompt width {tensor.shape[1]} does not match the served model's hidden size {hidden}."
            )
        # Uploaded for the model this server runs: record its full fingerprint.
        version = self.store.publish(name, tensor, fingerprint=self.frozen.fingerprint, base_model=base_model,
                                     init_text=init_text, extra={"uploaded_as": filename})
        self._warm(version)
        return version_info(version)

    def _warm(self, version: PromptVersion) -> None:
        if self.watcher is not None:
            self.watcher.warm(version)

    @staticmethod
    def _read_safetensors(data: bytes):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "upload.safetensors"
            path.write_bytes(data)
            return read_weights(path)

    def _read_zip(self, data: bytes):
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile as exc:
            raise InvalidAdapterError(f"not a readable zip file ({exc}).") from exc
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) > MAX_ZIP_MEMBERS or sum(m.file_size for m in members) > self.max_upload_bytes:
            raise PayloadTooLargeError(sum(m.file_size for m in members), self.max_upload_bytes)
        configs = [m for m in members if PurePosixPath(m.filename).name == ADAPTER_CONFIG]
        if len(configs) != 1:
            raise InvalidAdapterError(f"the zip must hold exactly one {ADAPTER_CONFIG} (found {len(configs)}).")
        folder = PurePosixPath(configs[0].filename).parent
        with tempfile.TemporaryDirectory() as tmp:
            for member in members:
                path = PurePosixPath(member.filename)
                if path.parent != folder or path.is_absolute() or ".." in path.parts:
                    continue  # only the adapter's own folder, never paths outside the temp dir
                (Path(tmp) / path.name).write_bytes(archive.read(member))
            return read_adapter(Path(tmp))
