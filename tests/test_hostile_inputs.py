"""Hostile /train and /generate requests: each gets a 4xx JSON error naming what to fix, never a 500."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from tests.http_helpers import app_client, mixing  # noqa: F401
from tests.jobs_helpers import SENTIMENT, jsonl, save_tiny_model
from trainer.config import TrainConfig, TrainConfigError
from trainer.data import DataError, parse_examples

INIT = "Classify the sentiment."
LONE_SURROGATE = '"\\ud800"'  # a JSON string escape that decodes to a str no UTF-8 can hold


@pytest.fixture(scope="module")
def model_folder(frozen, tmp_path_factory):
    return save_tiny_model(frozen, tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def train_client(frozen, model_folder, tmp_path):
    app = create_app(Settings(model=model_folder, store=tmp_path / "store", max_upload_bytes=4096), frozen=frozen)
    with TestClient(app) as client:
        yield client


def post_json(client, path: str, text: str | bytes, **kwargs):
    """Send `text` as the raw JSON body (the test client's own encoder refuses NaN and surrogates)."""
    body = text.encode() if isinstance(text, str) else text
    return client.post(path, content=body, headers={"content-type": "application/json"}, **kwargs)


def assert_refused(answer, needle: str, status: int = 422) -> dict:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) >= {"code", "message"} and needle in error["message"], error
    return error


# --- /train: the JSONL data --------------------------------------------------------------


def test_deeply_nested_jsonl_line_is_refused(train_client):
    data = jsonl(SENTIMENT[:3]) + b"[" * 3_000 + b"\n"
    answer = train_client.post("/train", files={"file": ("t.jsonl", data)}, data={"name": "s", "init": INIT})
    error = assert_refused(answer, "line 4: not valid JSON (nested too deeply)")
    assert error["code"] == "invalid_training_data"
    assert train_client.get("/train").json()["jobs"] == []


@pytest.mark.parametrize("field", ["input", "output"])
def test_lone_surrogate_in_a_jsonl_field_is_refused(train_client, field):
    row = {"input": "A fine film.", "output": "positive"}
    line = json.dumps(row).replace(json.dumps(row[field]), LONE_SURROGATE).encode()
    data = jsonl(SENTIMENT[:3]) + line + b"\n"
    answer = train_client.post("/train", files={"file": ("t.jsonl", data)}, data={"name": "s", "init": INIT})
    assert_refused(answer, f"line 4: field {field!r} is not valid Unicode text")
    assert train_client.get("/train").json()["jobs"] == []


def test_parse_examples_refuses_lone_surrogates_and_deep_nesting():
    with pytest.raises(DataError, match="line 2: field 'input' is not valid Unicode"):
        parse_examples(['{"input": "a", "output": "b"}', '{"input": "\\udfff", "output": "b"}'])
    with pytest.raises(DataError, match="line 1: not valid JSON"):
        parse_examples(["{" * 50_000])


# --- /train: settings --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"min_lr_ratio": None}, "min_lr_ratio"),
        ({"weight_decay": "abc"}, "weight_decay"),
        ({"max_grad_norm": "x"}, "max_grad_norm"),
        ({"max_grad_norm": True}, "max_grad_norm"),
        ({"weight_decay": float("inf")}, "weight_decay"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": True}, "lr"),
        ({"min_cosine": None}, "min_cosine"),
        ({"eval_fraction": [0.1]}, "eval_fraction"),
        ({"weight_decay": 10**400}, "weight_decay"),
        ({"use_chat_template": "yes"}, "use_chat_template"),
        ({"task": ["auto"]}, "task"),
        ({"seed": 2**64}, "seed"),
        ({"init_text": "Start \ud800 here."}, "init_text"),
    ],
)
def test_train_config_type_checks_every_field(config, field):
    with pytest.raises(TrainConfigError) as caught:
        TrainConfig.from_dict({"init_text": INIT, **config})
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ('{"min_lr_ratio": null}', "min_lr_ratio"),
        ('{"weight_decay": "abc"}', "weight_decay"),
        ('{"max_grad_norm": "x"}', "max_grad_norm"),
        ('{"weight_decay": NaN}', "weight_decay"),
        ('{"max_grad_norm": Infinity}', "max_grad_norm"),
    ],
)
def test_bad_config_in_a_json_body_is_refused(train_client, config, field):
    body = f'{{"name": "s", "init": "{INIT}", "examples": {json.dumps(SENTIMENT)}, "config": {config}}}'
    error = assert_refused(post_json(train_client, "/train", body), field)
    assert error["code"] == "invalid_training_config" and error["field"] == field
    assert train_client.get("/train").json()["jobs"] == []


def test_bad_config_in_a_form_is_refused(train_client):
    answer = train_client.post(
        "/train",
        files={"file": ("t.jsonl", jsonl(SENTIMENT))},
        data={"name": "s", "init": INIT, "config": '{"min_lr_ratio": null}'},
    )
    assert assert_refused(answer, "min_lr_ratio")["field"] == "min_lr_ratio"


def test_a_form_config_that_is_not_json_is_refused(train_client):
    for config, needle in (("[" * 3000, "nested too deeply"), ("{oops", "not valid JSON"), ("[1]", "JSON object")):
        answer = train_client.post(
            "/train", files={"file": ("t.jsonl", jsonl(SENTIMENT))}, data={"name": "s", "init": INIT, "config": config}
        )
        assert assert_refused(answer, needle)["code"] == "invalid_train_request"


def test_lone_surrogate_in_init_is_refused(train_client):
    body = f'{{"name": "s", "init": {LONE_SURROGATE}, "examples": {json.dumps(SENTIMENT)}}}'
    assert assert_refused(post_json(train_client, "/train", body), "init_text")["field"] == "init_text"


# --- /train: the JSON body itself --------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        ('{"name": "s", "init": "caf\u00e9"}'.encode("latin-1"), "UTF-8"),
        (b"[" * 50_000, "nested too deeply"),
        (b'["a list"]', "'examples'"),
        (b'{"name": "s", "init": "x", "examples": "not a list"}', "'examples'"),
        (b'{"name": "s", "init": "x", "examples": [], "eval_examples": {"a": 1}}', "'eval_examples'"),
        (b'{"name": 7, "init": "x", "examples": []}', "'name'"),
    ],
    ids=["not-json", "empty", "latin1", "deep", "list", "examples-not-list", "eval-not-list", "name-not-text"],
)
def test_malformed_json_body_is_refused(train_client, body, needle):
    error = assert_refused(post_json(train_client, "/train", body), needle)
    assert error["code"] == "invalid_train_request"


@pytest.mark.parametrize(
    ("examples", "needle"),
    [
        ('[{"input": "a", "output": "b"}, 5]', "examples[1]"),
        ('[{"input": "a", "output": "b"}, ["input", "output"]]', "examples[1]"),
        ('[{"input": "a", "output": "b"}, {"input": 5, "output": "b"}]', "field 'input' must be a string"),
        (f'[{{"input": "a", "output": "b"}}, {{"input": {LONE_SURROGATE}, "output": "b"}}]', "not valid Unicode"),
    ],
)
def test_bad_examples_in_a_json_body_are_refused(train_client, examples, needle):
    body = f'{{"name": "s", "init": "{INIT}", "examples": {examples}}}'
    assert_refused(post_json(train_client, "/train", body), needle)
    assert train_client.get("/train").json()["jobs"] == []


def test_bad_eval_examples_are_refused_by_index(train_client):
    body = json.dumps({"name": "s", "init": INIT, "examples": SENTIMENT, "eval_examples": [SENTIMENT[0], "text"]})
    assert_refused(post_json(train_client, "/train", body), "eval_examples[1]")


@pytest.mark.parametrize("init", ["7", '["a"]', "{}"])
def test_init_that_is_not_text_is_refused(train_client, init):
    body = f'{{"name": "s", "init": {init}, "examples": {json.dumps(SENTIMENT)}}}'
    assert_refused(post_json(train_client, "/train", body), "init")


# --- /generate ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (f'{{"input": {LONE_SURROGATE}}}', "body.input"),
        (f'{{"messages": [{{"role": "user", "content": {LONE_SURROGATE}}}]}}', "body.messages.0.content"),
        (f'{{"input": "hi", "stop": [{LONE_SURROGATE}]}}', "body.stop"),
        (f'{{"input": "hi", "stop": {LONE_SURROGATE}}}', "body.stop"),
    ],
)
def test_lone_surrogates_in_generate_text_are_refused(app_client, body, needle):
    with app_client() as client:
        error = assert_refused(post_json(client, "/generate", body), needle)
    assert "Unicode" in error["message"] and error["code"] == "invalid_request"


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"temperature": 1e-38}, "temperature"),
        ({"temperature": 0.001}, "temperature"),
        ({"temperature": 5.5}, "temperature"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -1}, "seed"),
        ({"stop": ["x" * 257]}, "stop"),
        ({"stop": "x" * 257}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["a"] * 9}, "stop"),
        ({"input": "x" * 100_001}, "body.input"),
        ({"input": None, "messages": [{"role": "user", "content": "x" * 100_001}]}, "body.messages.0.content"),
        ({"input": None, "messages": [{"role": "user", "content": "hi"}] * 257}, "body.messages"),
    ],
)
def test_out_of_range_generate_fields_are_refused(app_client, fields, needle):
    body = {"input": "hi", "max_new_tokens": 2, **fields}
    body = {key: value for key, value in body.items() if value is not None}
    with app_client() as client:
        error = assert_refused(post_json(client, "/generate", json.dumps(body)), needle)
    assert error["code"] == "invalid_request"


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 0},
        {"temperature": 0.01, "seed": 2**64 - 1},
        {"temperature": 5, "top_p": 1e-9, "seed": 0},
        {"stop": ["x" * 256]},
        {"temperature": 1, "top_p": 1e-46},
        {"temperature": 1, "top_p": 1e-46, "stream": True},
    ],
)
def test_generate_edge_values_are_served(app_client, fields):
    with app_client() as client:
        answer = post_json(client, "/generate", json.dumps({"input": "hi", "max_new_tokens": 2, **fields}))
    assert answer.status_code == 200, answer.text
    if fields.get("stream"):  # the stream ends with its final event, not an error
        assert "event: done" in answer.text and "event: error" not in answer.text
