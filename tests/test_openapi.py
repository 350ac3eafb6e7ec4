"""The OpenAPI document lists each route's real error statuses with the one error body, and
OPTIONS / wrong methods name every method the path serves."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.http.openapi_responses import ErrorResponse
from tests.http_helpers import app_client, make_settings, mixing  # noqa: F401

ERROR_REF = "#/components/schemas/ErrorResponse"
OPENAI_ERROR_REF = "#/components/schemas/OpenAIErrorResponse"  # /v1 routes answer in OpenAI's shape


@pytest.fixture
def document(tmp_path) -> dict:
    return create_app(make_settings(tmp_path)).openapi()


def _operations(document: dict):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield f"{method.upper()} {path}", operation


def _error_statuses(operation: dict) -> set[int]:
    return {int(status) for status in operation["responses"] if int(status) >= 400}


def test_every_error_response_uses_the_error_body(document):
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for label, operation in _operations(document):
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                ref = OPENAI_ERROR_REF if label.split(" ")[1].startswith("/v1/") else ERROR_REF
                assert response["content"]["application/json"]["schema"] == {"$ref": ref}, (label, status)
                assert response["description"], (label, status)


def test_error_detail_allows_extra_fields(document):
    detail = document["components"]["schemas"]["ErrorDetail"]
    assert detail["required"] == ["code", "message"] and detail["additionalProperties"] is True


def test_routes_list_the_statuses_they_can_give(document):
    ops = dict(_operations(document))
    assert _error_statuses(ops["POST /generate"]) == {400, 401, 404, 409, 413, 422, 503}
    for route in ("POST /v1/chat/completions", "POST /v1/completions"):
        assert _error_statuses(ops[route]) == {400, 401, 404, 409, 413, 429, 503}, route
    assert _error_statuses(ops["GET /v1/models"]) == {401, 503}
    assert "Retry-After" in ops["POST /generate"]["responses"]["503"]["headers"]
    assert "text/event-stream" in ops["POST /generate"]["responses"]["200"]["content"]
    assert _error_statuses(ops["GET /ready"]) == {503}
    assert _error_statuses(ops["POST /prompts"]) == {400, 401, 403, 409, 413, 422, 503}
    assert _error_statuses(ops["POST /train"]) == {400, 401, 403, 409, 413, 422}
    assert _error_statuses(ops["POST /train/{job_id}/cancel"]) == {401, 403, 404, 409, 422}
    assert list(ops["GET /train/{job_id}/curve.png"]["responses"]["200"]["content"]) == ["image/png"]
    assert list(ops["GET /train/{job_id}/events"]["responses"]["200"]["content"]) == ["text/event-stream"]
    assert _error_statuses(ops["GET /health"]) == set()


def test_admin_routes_document_401_and_403(document):
    admin = [
        "POST /prompts",
        "PUT /aliases/{alias}",
        "DELETE /aliases/{alias}",
        "DELETE /prompts/{ref}",
        "POST /train",
        "POST /train/{job_id}/cancel",
    ]
    ops = dict(_operations(document))
    for label in admin:
        assert {401, 403} <= _error_statuses(ops[label]), label
    assert "WWW-Authenticate" in ops["POST /prompts"]["responses"]["401"]["headers"]


def test_routes_with_parameters_or_a_body_document_422(document):
    for label, operation in _operations(document):
        invalid = 400 if label.split(" ")[1].startswith("/v1/") else 422  # /v1 answers an invalid body as OpenAI: 400
        if operation.get("parameters") or operation.get("requestBody"):
            assert invalid in _error_statuses(operation), label
        if operation.get("requestBody"):
            assert 413 in _error_statuses(operation), label


def test_error_answers_match_the_documented_body(app_client):
    with app_client() as client:
        answers = [
            client.post("/generate", params={"prompt": "nope"}, json={"input": "hi"}),
            client.post("/generate", json={"max_new_tokens": 0}),
            client.get("/train/nope"),
        ]
    assert [a.status_code for a in answers] == [404, 422, 404]
    for answer in answers:
        ErrorResponse.model_validate(answer.json())


def test_options_answers_204_with_every_method_of_the_path(tmp_path):
    client = TestClient(create_app(make_settings(tmp_path)))
    prompts = client.options("/prompts")
    one = client.options("/prompts/math")
    alias = client.options("/aliases/prod")
    assert prompts.status_code == 204 and prompts.content == b""
    assert prompts.headers["allow"] == "GET, POST, OPTIONS"
    assert one.headers["allow"] == "GET, DELETE, OPTIONS"
    assert alias.headers["allow"] == "PUT, DELETE, OPTIONS"
    assert client.options("/nope").status_code == 404


def test_wrong_method_is_405_naming_every_route_of_the_path(tmp_path):
    client = TestClient(create_app(make_settings(tmp_path)))
    patch = client.patch("/prompts")
    put = client.put("/train")
    assert patch.status_code == 405 and patch.json()["error"]["code"] == "method_not_allowed"
    assert patch.headers["allow"] == "GET, POST, OPTIONS"
    assert put.status_code == 405 and put.headers["allow"] == "GET, POST, OPTIONS"
    assert client.get("/aliases/prod").headers["allow"] == "PUT, DELETE, OPTIONS"
