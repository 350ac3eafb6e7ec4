"""Hostile PEFT zip uploads to POST /prompts: each is refused with a 4xx JSON error, never a 500."""

from __future__ import annotations

import io
import json
import struct
import zipfile

import pytest
import torch
from safetensors.torch import save

from tests.http_helpers import app_client, mixing  # noqa: F401

CONFIG_NAME = "adapter/adapter_config.json"
WEIGHTS_NAME = "adapter/adapter_model.safetensors"
GOOD_CONFIG = json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM"}).encode()

# Byte offsets of fields in a zip's local file header and central directory header.
LOCAL = {"flags": 6, "method": 8, "crc": 14, "file_size": 22}
CENTRAL = {"flags": 8, "method": 10, "crc": 16, "file_size": 24}


def _weights() -> bytes:
    return save({"prompt_embeddings": torch.randn(3, 64)})


def _zip(config: bytes = GOOD_CONFIG, compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        archive.writestr(CONFIG_NAME, config)
        archive.writestr(WEIGHTS_NAME, _weights())
    return buffer.getvalue()


def _patch(data: bytes, member: str, field: str, fmt: str, value: int) -> bytes:
    """Overwrite one header field of `member` in both its local and its central header."""
    out = bytearray(data)
    name = member.encode()
    local = data.find(name) - 30
    central = data.rfind(name) - 46
    assert out[local : local + 4] == b"PK\x03\x04" and out[central : central + 4] == b"PK\x01\x02"
    struct.pack_into(fmt, out, local + LOCAL[field], value)
    struct.pack_into(fmt, out, central + CENTRAL[field], value)
    return bytes(out)


def _field(data: bytes, member: str, field: str, fmt: str) -> int:
    return struct.unpack_from(fmt, data, data.rfind(member.encode()) - 46 + CENTRAL[field])[0]


def _post(client, data: bytes):
    return client.post("/prompts", data={"name": "hostile"}, files={"file": ("adapter.zip", data)})


def _assert_refused(answer, needle: str) -> None:
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_adapter"
    assert needle in error["message"], error["message"]


def test_a_hand_built_zip_is_accepted(app_client):
    with app_client() as client:
        answer = _post(client, _zip())
    assert answer.status_code == 201, answer.text


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        (b"[1, 2, 3]", "must be a JSON object"),
        (b'"PROMPT_TUNING"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
        ('{"peft_type": "PROMPT_TUNING", "note": "caf\u00e9"}'.encode("latin-1"), "UTF-8"),
        (b"[" * 100_000, "not valid JSON (nested too deeply)"),
        (b'{"peft_type": "PROMPT_TUNING", "prompt_tuning_init_text": ["a"]}', "prompt_tuning_init_text"),
        (b'{"peft_type": "PROMPT_TUNING", "prompt_tuning_init_text": "\\ud800"}', "prompt_tuning_init_text"),
        (b'{"peft_type": "PROMPT_TUNING", "base_model_name_or_path": 7}', "base_model_name_or_path"),
    ],
    ids=["list", "string", "null", "latin1", "deep", "init-not-text", "init-surrogate", "base-model-not-text"],
)
def test_bad_adapter_config_is_refused(app_client, config, needle):
    with app_client() as client:
        answer = _post(client, _zip(config))
        assert client.get("/prompts").json()["prompts"] == []
    _assert_refused(answer, needle)


def test_a_zip_whose_weights_are_refused_is_named_by_the_upload_not_a_temp_folder(app_client):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(CONFIG_NAME, GOOD_CONFIG)
        archive.writestr(WEIGHTS_NAME, b"not a tensor")
    with app_client() as client:
        answer = _post(client, buffer.getvalue())
    _assert_refused(answer, "adapter.zip:adapter/adapter_model.safetensors: not a readable safetensors file")
    assert "/tmp" not in answer.json()["error"]["message"]


def test_encrypted_member_is_refused(app_client):
    data = _patch(_zip(), WEIGHTS_NAME, "flags", "<H", 0x1)
    with app_client() as client:
        _assert_refused(_post(client, data), "encrypted")


def test_unknown_compression_method_is_refused(app_client):
    data = _patch(_zip(), WEIGHTS_NAME, "method", "<H", 99)
    with app_client() as client:
        _assert_refused(_post(client, data), "compression method 99")


def test_bad_crc_is_refused(app_client):
    data = _zip()
    data = _patch(data, CONFIG_NAME, "crc", "<I", _field(data, CONFIG_NAME, "crc", "<I") ^ 0xFFFF)
    with app_client() as client:
        _assert_refused(_post(client, data), "CRC")


def test_member_larger_than_declared_is_refused(app_client):
    """Zip-bomb style: the member inflates to more than the size its headers declare."""
    data = _zip(compression=zipfile.ZIP_DEFLATED)
    data = _patch(data, WEIGHTS_NAME, "file_size", "<I", 16)
    with app_client() as client:
        _assert_refused(_post(client, data), WEIGHTS_NAME)


def test_member_smaller_than_declared_is_refused(app_client):
    data = _zip(compression=zipfile.ZIP_DEFLATED)
    data = _patch(data, CONFIG_NAME, "file_size", "<I", len(GOOD_CONFIG) + 10)
    with app_client() as client:
        _assert_refused(_post(client, data), CONFIG_NAME)


def test_corrupt_deflate_stream_is_refused(app_client):
    data = bytearray(_zip(compression=zipfile.ZIP_DEFLATED))
    start = data.find(WEIGHTS_NAME.encode()) + len(WEIGHTS_NAME)
    data[start : start + 8] = b"\xff" * 8  # the deflate stream's first bytes
    with app_client() as client:
        _assert_refused(_post(client, bytes(data)), WEIGHTS_NAME)


def test_undecodable_member_name_is_refused(app_client):
    data = _zip()
    data = _patch(data, WEIGHTS_NAME, "flags", "<H", 0x800)  # names are UTF-8 ...
    data = data.replace(b"model.safetensors", b"model.safe\xfftensor")  # ... but this one is not
    with app_client() as client:
        _assert_refused(_post(client, data), "zip")


def test_overlong_member_name_is_ignored(app_client):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(CONFIG_NAME, GOOD_CONFIG)
        archive.writestr(WEIGHTS_NAME, _weights())
        archive.writestr("adapter/" + "x" * 400, b"extra file the adapter does not need")
    with app_client() as client:
        answer = _post(client, buffer.getvalue())
    assert answer.status_code == 201, answer.text
