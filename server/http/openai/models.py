"""GET /v1/models: the base model, then every servable prompt reference, read from the store
on each call (a version published or deleted anywhere shows up or goes at once)."""

from __future__ import annotations

from datetime import datetime

from prompt_store import ModelFingerprint, PromptStore, PromptVersion

OWNER = "softprompt-server"


def list_models(store: PromptStore, model_id: str, fingerprint: ModelFingerprint, started_at: float) -> dict:
    """As vLLM lists LoRA adapters: `root` is the base model; `parent` is the base model for a
    name (its newest version), the name for a version, the target version for an alias."""
    data = [_entry(model_id, int(started_at), model_id, None)]
    servable: dict[str, PromptVersion] = {}
    by_name, aliases = store.catalog()
    for name, found in by_name.items():
        versions = [v for v in found if v.fingerprint.mismatch(fingerprint) is None]
        if not versions:
            continue
        data.append(_entry(name, _created(versions[-1]), model_id, model_id))
        for version in versions:
            servable[str(version.id)] = version
            data.append(_entry(str(version.id), _created(version), model_id, name))
    for alias, target in sorted(aliases.items()):
        if target in servable:
            data.append(_entry(alias, _created(servable[target]), model_id, target))
    return {"object": "list", "data": data}


def _entry(model: str, created: int, root: str, parent: str | None) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": OWNER, "root": root, "parent": parent}


def _created(version: PromptVersion) -> int:
    try:
        return int(datetime.fromisoformat(version.meta["created_at"]).timestamp())
    except (KeyError, TypeError, ValueError):
        return 0
