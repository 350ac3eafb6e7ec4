from __future__ import annotations

import json
import multiprocessing
import os

import pytest
import torch

from prompt_store import (
    AliasInUseError,
    ChecksumMismatchError,
    IncompatibleModelError,
    InvalidAdapterError,
    InvalidNameError,
    InvalidShapeError,
    ModelFingerprint,
    NameConflictError,
    NonFiniteValuesError,
    PromptNotFoundError,
    open_store,
)

FP = ModelFingerprint(hidden_size=8, vocab_size=100, embedding_sha256="abc")


def publish(store, name="math", vectors=3, **kwargs):
    return store.publish(name, torch.randn(vectors, 8), fingerprint=FP, base_model="tiny", **kwargs)


def test_versions_increase_and_bare_name_resolves_to_newest(store):
    assert str(publish(store).id) == "math-v1"
    assert str(publish(store).id) == "math-v2"
    assert str(store.resolve("math").id) == "math-v2"
    assert str(store.resolve("math-latest").id) == "math-v2"
    assert str(store.resolve("math-v1").id) == "math-v1"


def test_loaded_tensor_equals_published_tensor(store):
    tensor = torch.randn(5, 8)
    store.publish("s", tensor, fingerprint=FP, base_model="tiny", init_text="Be nice.", metrics={"acc": 0.9})
    loaded = store.load("s", expect=FP)
    assert torch.equal(loaded.embeddings, tensor)
    meta = loaded.version.meta
    assert meta["init_text"] == "Be nice." and meta["metrics"] == {"acc": 0.9}
    assert meta["fingerprint"] == FP.to_dict() and meta["num_virtual_tokens"] == 5
    assert meta["created_at"] and meta["tensor_sha256"] == loaded.cache_key[2]


def test_published_version_is_a_peft_adapter_folder(folder_store):
    version = publish(folder_store, vectors=4)
    config = json.loads((version.path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 4 and config["token_dim"] == 8
    from safetensors.torch import load_file

    assert load_file(str(version.path / "adapter_model.safetensors"))["prompt_embeddings"].shape == (4, 8)


def test_exported_version_is_a_peft_adapter_folder(store, tmp_path):
    version = publish(store, vectors=4, init_text="Add.")
    folder = store.export(str(version.id), tmp_path / "out")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 4 and config["token_dim"] == 8
    assert config["prompt_tuning_init_text"] == "Add."
    assert json.loads((folder / "meta.json").read_text()) == version.meta
    from safetensors.torch import load_file

    assert torch.equal(
        load_file(str(folder / "adapter_model.safetensors"))["prompt_embeddings"], store.load(version).embeddings
    )


def test_published_files_are_read_only(folder_store):
    version = publish(folder_store)
    for child in version.path.iterdir():
        assert not os.access(child, os.W_OK) or os.geteuid() == 0
        assert child.stat().st_mode & 0o222 == 0


def test_alias_points_at_fixed_version_and_moves(store):
    publish(store)
    publish(store)
    store.set_alias("math-prod", "math-v1")
    publish(store)
    assert str(store.resolve("math-prod").id) == "math-v1"
    store.set_alias("math-prod", "math")
    assert str(store.resolve("math-prod").id) == "math-v3"
    store.remove_alias("math-prod")
    with pytest.raises(PromptNotFoundError):
        store.resolve("math-prod")


def test_alias_and_prompt_names_cannot_collide(store):
    publish(store)
    with pytest.raises(NameConflictError):
        store.set_alias("math", "math-v1")
    store.set_alias("prod", "math-v1")
    with pytest.raises(NameConflictError):
        publish(store, name="prod")


@pytest.mark.parametrize("bad", ["../etc", "a/b", "Math", "", "x" * 65, "math-v2", "math-latest", "-a", "a b", "a\x00"])
def test_bad_names_are_refused(store, bad):
    with pytest.raises(InvalidNameError):
        publish(store, name=bad)


def test_unknown_prompt_names_close_matches(store):
    publish(store, name="sentiment")
    with pytest.raises(PromptNotFoundError) as info:
        store.resolve("sentimnet")
    assert "sentiment" in info.value.close_matches
    with pytest.raises(PromptNotFoundError):
        store.resolve("sentiment-v9")


def tamper(store, version) -> None:
    """Flip the last byte of the version's stored tensor, behind the store's back."""
    if store.location.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(store.url, autocommit=True) as conn:
            conn.execute(
                "UPDATE prompt_versions SET weights = overlay(weights PLACING "
                "set_byte(substring(weights FROM length(weights) FOR 1), 0, "
                "get_byte(weights, length(weights) - 1) # 255) FROM length(weights) FOR 1) "
                "WHERE name = %s AND version = %s",
                (version.id.name, version.id.version),
            )
        return
    weights = version.path / "adapter_model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


def test_tampered_tensor_fails_checksum(store):
    version = publish(store)
    tamper(store, version)
    with pytest.raises(ChecksumMismatchError):
        store.load("math")


def test_incompatible_model_is_refused(store):
    publish(store)
    with pytest.raises(IncompatibleModelError, match="hidden size"):
        store.load("math", expect=ModelFingerprint(hidden_size=16, vocab_size=100, embedding_sha256="abc"))
    with pytest.raises(IncompatibleModelError, match="input-embedding"):
        store.load("math", expect=ModelFingerprint(hidden_size=8, vocab_size=100, embedding_sha256="other"))
    with pytest.raises(IncompatibleModelError):
        store.publish("wide", torch.randn(2, 16), fingerprint=FP, base_model="tiny")


def test_bad_tensors_are_refused(store):
    with pytest.raises(InvalidShapeError):
        store.publish("x", torch.randn(8), fingerprint=FP, base_model="tiny")
    with pytest.raises(InvalidShapeError):
        store.publish("x", torch.randn(1, 2, 8), fingerprint=FP, base_model="tiny")
    bad = torch.randn(2, 8)
    bad[0, 0] = float("nan")
    with pytest.raises(NonFiniteValuesError):
        store.publish("x", bad, fingerprint=FP, base_model="tiny")
    assert store.names() == []


def test_delete_refuses_aliased_version_unless_forced(store):
    publish(store)
    publish(store)
    store.set_alias("prod", "math-v2")
    with pytest.raises(AliasInUseError):
        store.delete("math-v2")
    store.delete("math-v1")
    store.delete("math-v2", force=True)
    assert store.names() == [] and store.aliases() == {}
    assert str(publish(store).id) == "math-v3", "version numbers are never reused"


def test_a_version_deleted_after_it_was_looked_up_reads_as_not_found_on_both_stores(store):
    # A reader resolves, a deleter removes, the reader loads: the server's pre-warm after an
    # upload races a DELETE exactly so. Not found is an answer; a bare OSError was a 500.
    version = store.resolve(str(publish(store).id))
    store.delete(str(version.id))
    with pytest.raises(PromptNotFoundError):
        store.load(version)


def test_export_then_import_round_trips(store, tmp_path):
    original = publish(store, init_text="Please reason step by step.")
    exported = store.export("math", tmp_path / "out")
    imported = store.import_adapter(exported, "copy", fingerprint=FP)
    assert torch.equal(store.load("copy").embeddings, store.load(str(original.id)).embeddings)
    assert imported.meta["init_text"] == "Please reason step by step."


def test_adapter_imported_without_a_model_loads_on_a_model_of_its_width(store, tmp_path):
    store.publish("orig", torch.randn(3, 8), fingerprint=FP, base_model="tiny")
    store.import_adapter(store.export("orig", tmp_path / "out"), "bare")  # no fingerprint given
    assert store.load("bare", expect=FP).embeddings.shape == (3, 8)
    with pytest.raises(IncompatibleModelError):
        store.load("bare", expect=ModelFingerprint(hidden_size=16, vocab_size=100))


def test_import_refuses_non_prompt_tuning_adapters(store, tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(InvalidAdapterError, match="PROMPT_TUNING"):
        store.import_adapter(folder, "lora")
    with pytest.raises(InvalidAdapterError):
        store.import_adapter(tmp_path / "missing", "lora")


def _publish_many(location: str, count: int, queue) -> None:
    with open_store(location) as store:
        queue.put([str(publish(store).id) for _ in range(count)])


def test_concurrent_publishers_get_distinct_versions(store_location):
    open_store(store_location).close()
    queue = multiprocessing.get_context("spawn").Queue()
    procs = [
        multiprocessing.get_context("spawn").Process(target=_publish_many, args=(store_location, 5, queue))
        for _ in range(3)
    ]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    ids = [i for batch in results for i in batch]
    assert len(ids) == len(set(ids)) == 15
    with open_store(store_location) as store:
        assert [v.id.version for v in store.versions("math")] == list(range(1, 16))
