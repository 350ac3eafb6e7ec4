"""Prompt management over HTTP: list, show, alias, upload (safetensors / PEFT zip), delete, auth.

Every test runs on both store backends (a folder, PostgreSQL)."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from server.app import create_app
from tests.http_helpers import make_settings, mixing, publish  # noqa: F401

KEY = {"Authorization": "Bearer s3cret"}


@pytest.fixture
def app_client(mixing, tmp_path, store_location):
    def build(**overrides) -> TestClient:
        return TestClient(create_app(make_settings(tmp_path, store=store_location, **overrides), frozen=mixing))

    return build


def _safetensors(tensor: torch.Tensor) -> bytes:
    return save({"prompt_embeddings": tensor.contiguous()})


def _peft_zip(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": tensor.shape[0],
        "token_dim": tensor.shape[1],
        "prompt_tuning_init_text": "Add the numbers.",
    }
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("adapter/adapter_config.json", json.dumps(config))
        archive.writestr("adapter/adapter_model.safetensors", _safetensors(tensor))
    return buffer.getvalue()


def test_list_and_show_with_metadata(app_client, mixing, store_location):
    publish(store_location, mixing, "math", vectors=4)
    publish(store_location, mixing, "math", vectors=6)
    with app_client() as client:
        listed = client.get("/prompts").json()
        shown = client.get("/prompts/math").json()
        first = client.get("/prompts/math-v1").json()
    [math] = listed["prompts"]
    assert math["name"] == "math" and [v["id"] for v in math["versions"]] == ["math-v1", "math-v2"]
    assert math["latest"] == "math-v2" and math["versions"][1]["num_virtual_tokens"] == 6
    assert shown["id"] == "math-v2" and shown["compatible"] is True and shown["versions"] == ["math-v1", "math-v2"]
    assert first["num_virtual_tokens"] == 4 and "meta" in first


def test_alias_set_and_move(app_client, mixing, store_location):
    publish(store_location, mixing, "math", seed=1)
    publish(store_location, mixing, "math", seed=2)
    with app_client() as client:
        assert client.put("/aliases/prod", json={"target": "math-v1"}).json() == {"alias": "prod", "target": "math-v1"}
        assert client.post("/generate", params={"prompt": "prod"}, json={"input": "hi"}).json()["prompt"] == "math-v1"
        client.put("/aliases/prod", json={"target": "math-v2"})
        assert client.post("/generate", params={"prompt": "prod"}, json={"input": "hi"}).json()["prompt"] == "math-v2"
        assert client.get("/prompts").json()["aliases"] == {"prod": "math-v2"}
        assert client.delete("/aliases/prod").status_code == 204


def test_upload_safetensors_and_peft_zip_then_generate(app_client, mixing):
    with app_client() as client:
        one = client.post(
            "/prompts", data={"name": "up"}, files={"file": ("p.safetensors", _safetensors(torch.randn(5, 64)))}
        )
        two = client.post(
            "/prompts", data={"name": "up"}, files={"file": ("adapter.zip", _peft_zip(torch.randn(7, 64)))}
        )
        served = client.post("/generate", params={"prompt": "up"}, json={"input": "hi", "max_new_tokens": 4}).json()
        stats = client.get("/stats").json()
    assert one.status_code == 201 and one.json()["id"] == "up-v1"
    assert two.status_code == 201 and two.json()["id"] == "up-v2" and two.json()["init_text"] == "Add the numbers."
    assert served["prompt"] == "up-v2" and served["usage"]["soft_prompt_tokens"] == 7
    assert "up-v2" in stats["watcher"]["warmed"]


def test_upload_validation(app_client):
    with app_client(max_prompt_upload_bytes=4000) as client:
        wrong_width = client.post(
            "/prompts", data={"name": "bad"}, files={"file": ("p.safetensors", _safetensors(torch.randn(3, 32)))}
        )
        nan = torch.randn(3, 64)
        nan[0, 0] = float("nan")
        non_finite = client.post("/prompts", data={"name": "bad"}, files={"file": ("p.safetensors", _safetensors(nan))})
        garbage = client.post("/prompts", data={"name": "bad"}, files={"file": ("p.safetensors", b"not a tensor")})
        too_big = client.post(
            "/prompts", data={"name": "bad"}, files={"file": ("p.safetensors", _safetensors(torch.randn(40, 64)))}
        )
        bad_name = client.post(
            "/prompts", data={"name": "Bad Name"}, files={"file": ("p.safetensors", _safetensors(torch.randn(3, 64)))}
        )
        nothing = client.get("/prompts").json()["prompts"]
    assert (wrong_width.status_code, wrong_width.json()["error"]["code"]) == (409, "incompatible_model")
    assert (non_finite.status_code, non_finite.json()["error"]["code"]) == (422, "non_finite_values")
    assert (garbage.status_code, garbage.json()["error"]["code"]) == (422, "invalid_adapter")
    for refused in (non_finite, garbage):  # named by the client's file, not by a server temp path
        assert refused.json()["error"]["message"].startswith("p.safetensors:"), refused.json()
    assert (too_big.status_code, too_big.json()["error"]["code"]) == (413, "payload_too_large")
    assert (bad_name.status_code, bad_name.json()["error"]["code"]) == (422, "invalid_name")
    assert nothing == []


def test_delete_version_and_alias_protection(app_client, mixing, store_location):
    publish(store_location, mixing, "math", seed=1)
    publish(store_location, mixing, "math", seed=2)
    with app_client() as client:
        client.put("/aliases/prod", json={"target": "math-v2"})
        refused = client.delete("/prompts/math-v2")
        gone = client.delete("/prompts/math-v1")
        forced = client.delete("/prompts/math-v2", params={"force": "true"})
        after = client.post("/generate", params={"prompt": "math-v2"}, json={"input": "hi"})
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "alias_in_use")
    assert gone.json() == {"deleted": ["math-v1"]} and forced.json() == {"deleted": ["math-v2"]}
    assert after.status_code == 404


def test_admin_routes_need_the_api_key(app_client, mixing, store_location):
    publish(store_location, mixing, "math")
    with app_client(api_key="s3cret") as client:
        no_key = client.put("/aliases/prod", json={"target": "math-v1"})
        wrong = client.delete("/prompts/math", headers={"Authorization": "Bearer nope"})
        upload = client.post(
            "/prompts", data={"name": "x"}, files={"file": ("p.safetensors", _safetensors(torch.randn(2, 64)))}
        )
        ok = client.put("/aliases/prod", json={"target": "math-v1"}, headers=KEY)
        public = client.get("/prompts")
        generate = client.post("/generate", params={"prompt": "prod"}, json={"input": "hi", "max_new_tokens": 2})
    for answer in (no_key, wrong, upload):
        assert answer.status_code == 401 and answer.json()["error"]["code"] == "unauthorized"
    assert no_key.headers["www-authenticate"] == "Bearer"
    assert ok.status_code == 200 and public.status_code == 200 and generate.status_code == 200
