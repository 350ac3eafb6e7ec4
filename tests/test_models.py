"""Named models (trainer/models.py): a model shipped in parts is joined, checked by size and SHA-256
before it exists under its name, and a part that changed is refused with the command to reinstall."""

from __future__ import annotations

import hashlib

import pytest

from core.models import ALIASES, MODELS, ModelSpecError, NamedModel, named_model
from core.settings import MODEL_NAMES


def _parts(tmp_path, monkeypatch, contents: list[bytes]) -> NamedModel:
    """Packages `part_pkg_N` on sys.path holding `data/part.bin`, and a model made of them."""
    for n, data in enumerate(contents):
        package = tmp_path / "site" / f"part_pkg_{n}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / "part.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("SOFTPROMPT_CACHE_DIR", str(tmp_path / "cache"))
    whole = b"".join(contents)
    return NamedModel(
        name="toy",
        model_id="toy (parts)",
        gguf_file="toy.gguf",
        parts=tuple((f"part_pkg_{n}", "data/part.bin") for n in range(len(contents))),
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
        install="make toy",
    )


def test_parts_are_joined_in_order_into_the_cache_once(tmp_path, monkeypatch):
    model = _parts(tmp_path, monkeypatch, [b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7])
    path = model.ensure()
    assert path == tmp_path / "cache" / "gguf" / "toy.gguf"
    assert path.read_bytes() == b"GGUF" + b"a" * 100 + b"b" * 50 + b"c" * 7
    stamp = path.stat().st_mtime_ns
    assert model.ensure() == path and path.stat().st_mtime_ns == stamp  # not joined again


def test_a_changed_part_is_refused_and_nothing_is_left_under_the_name(tmp_path, monkeypatch):
    model = _parts(tmp_path, monkeypatch, [b"GGUF" + b"a" * 100, b"b" * 50])
    (tmp_path / "site" / "part_pkg_1" / "data" / "part.bin").write_bytes(b"B" * 50)  # same size, other bytes
    with pytest.raises(ModelSpecError, match="make toy"):
        model.ensure()
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_a_model_whose_packages_are_missing_says_how_to_install_it():
    model = NamedModel(
        name="absent",
        model_id="absent",
        gguf_file="absent.gguf",
        parts=(("no_such_package_x", "f"),),
        size=1,
        sha256="0",
        install="make absent",
    )
    with pytest.raises(ModelSpecError, match="make absent"):
        model.ensure()


def test_every_model_name_is_known_to_the_settings_so_it_is_never_taken_for_a_path():
    assert set(MODEL_NAMES) == set(MODELS) | set(ALIASES)
    assert named_model("SmolLM2") is MODELS["default"] and named_model("qwen2.5-coder-0.5b").size == 491_400_064
