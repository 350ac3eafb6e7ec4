"""Schemathesis against the whole app: every documented operation, valid and invalid inputs,
all built-in checks but one (see CONFIG): no 5xx, only documented statuses, bodies and headers as documented.

Bounded and deterministic for CI: 50 fuzzed examples per operation plus schemathesis's explicit
examples and coverage cases, with a derandomized Hypothesis. The app runs with its lifespan, an
API key (sent, so admin routes are exercised past auth) and small generation limits.

The schema is loaded at import with `from_dict` (the document needs no model) and each case is sent
through schemathesis's own in-process ASGI session: `schemathesis.pytest.from_fixture` fails under
pytest 9 (it sets `Function._nodeid`, which pytest 9 no longer has).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, settings
from safetensors.torch import save
from schemathesis.config import SchemathesisConfig
from schemathesis.python import asgi

from server.app import create_app
from tests.http_helpers import make_settings, mixing, publish  # noqa: F401

pytestmark = pytest.mark.fuzz

API_KEY = "schemathesis-key"
BASE_URL = f"http://{asgi.HOST}"

# positive_data_acceptance is off: the document is looser than the server on purpose, so schema-valid
# requests get intentional 422s: prompt and alias names must match prompt_store's name pattern
# (invalid_name), a generation needs exactly one of `input`/`messages` with a user turn and a
# `max_new_tokens` within this server's configured limit, and POST /train reads its multipart or
# JSON body itself (not described by the document).
# negative_data_rejection also accepts 413: an invalid body over the size limit is refused unread.
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {
            "positive_data_acceptance": {"enabled": False},
            "negative_data_rejection": {
                "expected-statuses": [
                    "400",
                    "401",
                    "403",
                    "404",
                    "405",
                    "406",
                    "409",
                    "413",
                    "415",
                    "422",
                    "428",
                    "429",
                    "5xx",
                ]
            },
        }
    }
)
schema = schemathesis.openapi.from_dict(create_app(make_settings(Path("unused"))).openapi(), config=CONFIG)


@pytest.fixture(scope="module")
def session(mixing, tmp_path_factory):
    """A requests session into the app; schemathesis starts its lifespan (again after each test's end)."""
    app_settings = make_settings(
        tmp_path_factory.mktemp("schemathesis"),
        api_key=API_KEY,
        max_new_tokens_limit=16,
        max_batch_size=4,
        max_queue=16,
    )
    publish(app_settings.store, mixing, "math")  # prompt routes have a version to find
    with asgi.get_client(create_app(app_settings, frozen=mixing)) as client:
        client.headers["Authorization"] = f"Bearer {API_KEY}"
        yield client
    asgi.shutdown_lifespans()


@schema.parametrize()
@settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
def test_api_conforms_to_its_openapi_document(case, session):
    case.call_and_validate(base_url=BASE_URL, session=session)


def _safetensors(hidden_size: int) -> bytes:
    return save({"prompt_embeddings": torch.randn(3, hidden_size)})


def test_main_flows_conform_to_the_document(session, mixing):
    """Fuzzing rarely names a real prompt or a servable generation: walk the main flows by hand,
    through the same checks."""
    calls = [
        ("/generate", "POST", dict(query={"prompt": "math"}, body={"input": "hi", "max_new_tokens": 4})),
        (
            "/generate",
            "POST",
            dict(query={"prompt": "math", "stream": "true"}, body={"input": "hi", "max_new_tokens": 4}),
        ),
        ("/prompts/{ref}", "GET", dict(path_parameters={"ref": "math"})),
        ("/aliases/{alias}", "PUT", dict(path_parameters={"alias": "prod"}, body={"target": "math"})),
        ("/aliases/{alias}", "DELETE", dict(path_parameters={"alias": "prod"})),
        (
            "/prompts",
            "POST",
            dict(
                body={"name": "uploaded", "file": _safetensors(mixing.fingerprint.hidden_size)},
                media_type="multipart/form-data",
            ),
        ),
        ("/prompts/{ref}", "DELETE", dict(path_parameters={"ref": "uploaded"})),
        ("/prompts", "GET", {}),
    ]
    statuses = [
        schema[path][method].Case(**parts).call_and_validate(base_url=BASE_URL, session=session).status_code
        for path, method, parts in calls
    ]
    wrong_key = (
        schema["/aliases/{alias}"]["DELETE"]
        .Case(path_parameters={"alias": "prod"})
        .call_and_validate(base_url=BASE_URL, session=session, headers={"Authorization": "Bearer wrong"})
    )
    assert statuses == [200, 200, 200, 200, 204, 201, 200, 200] and wrong_key.status_code == 401
