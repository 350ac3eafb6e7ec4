"""Fixtures and helpers for HTTP tests: an app around the tiny untied model, SSE parsing."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from core.modeling import from_loaded
from server.app import create_app
from server.settings import Settings
from tests.engine_helpers import untied_llama


@pytest.fixture(scope="module")
def mixing(tokenizer):
    return from_loaded(untied_llama(len(tokenizer)), tokenizer, base_model="tiny-untied")


def make_settings(tmp_path, **overrides) -> Settings:
    values = dict(
        store=tmp_path / "store",
        store_poll_seconds=0.05,
        max_batch_size=8,
        max_queue=8,
        max_new_tokens_limit=64,
        api_key=None,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def app_client(mixing, tmp_path):
    def build(**overrides) -> TestClient:
        return TestClient(create_app(make_settings(tmp_path, **overrides), frozen=mixing))

    return build


def publish(store_root, frozen, name: str, vectors: int = 4, seed: int = 0):
    from prompt_store import open_store

    torch.manual_seed(seed)
    with open_store(store_root) as store:
        return store.publish(
            name,
            torch.randn(vectors, frozen.fingerprint.hidden_size),
            fingerprint=frozen.fingerprint,
            base_model=frozen.base_model,
        )


def parse_sse(body: str) -> list[tuple[str, dict]]:
    events = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip(" ") if line.startswith("data: ") else line[5:])
        if data:
            events.append((name, json.loads("\n".join(data))))
    return events
