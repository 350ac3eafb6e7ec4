"""`softprompt prompts ...` on both store backends: list, show, alias, export, import, delete."""

from __future__ import annotations

import json

import torch

from prompt_store import ModelFingerprint, open_store
from prompt_store.cli import main

FP = ModelFingerprint(hidden_size=8, vocab_size=100, embedding_sha256="abc")


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_prompts_commands_manage_a_store(store_location, tmp_path, capsys):
    with open_store(store_location) as store:
        for seed in (1, 2):
            torch.manual_seed(seed)
            store.publish("math", torch.randn(3, 8), fingerprint=FP, base_model="tiny", init_text="Add.")
        store.record_evaluation("math-v2", {"metric": "exact_match", "score": 0.5})
    at = ["--store", store_location]
    assert run(capsys, *at, "list")[1] == "math: v1, v2 (latest math-v2)\n"
    code, out, _ = run(capsys, *at, "show", "math")
    shown = json.loads(out)
    assert code == 0 and shown["id"] == "math-v2" and shown["evaluations"] == [{"metric": "exact_match", "score": 0.5}]
    assert run(capsys, *at, "alias", "prod", "math-v1")[1] == "prod -> math-v1\n"
    assert "prod -> math-v1" in run(capsys, *at, "list")[1]
    assert run(capsys, *at, "export", "prod", str(tmp_path / "out"))[0] == 0
    assert run(capsys, *at, "import", str(tmp_path / "out"), "--name", "copy")[1].endswith("as copy-v1\n")
    code, _, err = run(capsys, *at, "delete", "math-v1")
    assert code == 1 and "alias_in_use" in err
    assert run(capsys, *at, "delete", "math-v1", "--force")[1] == "deleted math-v1\n"
    code, _, err = run(capsys, *at, "show", "math-v1")
    assert code == 1 and "prompt_not_found" in err
    with open_store(store_location) as store:
        assert torch.equal(store.load("copy").embeddings, _first())
        assert store.aliases() == {} and [str(v.id) for v in store.versions("math")] == ["math-v2"]


def _first() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 8)


def test_migrate_copies_a_folder_store_into_postgres_and_verifies_it(folder_store, database_url, capsys):
    for seed in (1, 2, 3):
        torch.manual_seed(seed)
        folder_store.publish("math", torch.randn(3, 8), fingerprint=FP, base_model="tiny", init_text="Add.")
    folder_store.publish("senti", torch.randn(2, 8), fingerprint=FP, base_model="tiny")
    folder_store.publish("gone", torch.randn(2, 8), fingerprint=FP, base_model="tiny")
    folder_store.delete("math-v2")
    folder_store.delete("gone")  # only a tombstone is left of this name
    folder_store.set_alias("prod", "math-v3")
    folder_store.record_evaluation("math-v3", {"metric": "exact_match", "score": 0.25})

    code, out, err = run(capsys, "migrate", "--from", str(folder_store.root), "--to", database_url, "--no-progress")
    assert code == 0, err
    assert "3 versions of 3 names, 2 tombstones, 1 aliases, 1 evaluations" in out and "verified" in out
    with open_store(database_url) as copied:
        assert copied.names() == ["math", "senti"] and copied.aliases() == {"prod": "math-v3"}
        for version in folder_store.versions("math") + folder_store.versions("senti"):
            assert copied.resolve(str(version.id)).meta == version.meta
            assert torch.equal(copied.load(str(version.id)).embeddings, folder_store.load(version).embeddings)
        assert copied.evaluations("prod") == [{"metric": "exact_match", "score": 0.25}]
        assert str(copied.publish("math", torch.randn(3, 8), fingerprint=FP, base_model="tiny").id) == "math-v4"
        assert str(copied.publish("gone", torch.randn(3, 8), fingerprint=FP, base_model="tiny").id) == "gone-v2"

    code, _, err = run(capsys, "migrate", "--from", str(folder_store.root), "--to", database_url, "--no-progress")
    assert code == 1 and "name_conflict" in err  # a second copy never overwrites
    assert run(capsys, "migrate", "--from", str(folder_store.root / "nope"), "--to", database_url)[0] == 2
