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
