from __future__ import annotations

import os

import pytest

import prompt_store  # noqa: F401  (first: it sets how torch's threads wait, before torch loads)
from core.modeling import FrozenModel, from_loaded, load_frozen_model  # noqa: E402
from tests.tiny import tiny_llama, tiny_tokenizer  # noqa: E402

POSTGRES_FIXTURES = {"postgres", "own_postgres", "database_url"}


def pytest_collection_modifyitems(items):
    """Mark every test that uses a PostgreSQL server `postgres`: through a fixture, or as the
    PostgreSQL run of a test parametrized over both store backends."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if POSTGRES_FIXTURES & set(item.fixturenames) or (
            callspec and callspec.params.get("store_location") == "postgres"
        ):
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def frozen(tokenizer) -> FrozenModel:
    """A tiny random Llama wrapped like the served model (shared: never mutate it; engines built on
    it fuse and pack its projections and switch its attention to `softprompt_sdpa` in place,
    which keeps its weights and, to rounding, its outputs)."""
    return from_loaded(tiny_llama(len(tokenizer)), tokenizer, base_model="tiny-llama")


@pytest.fixture(scope="session")
def untied_gguf_path(tokenizer, tmp_path_factory) -> str:
    """tests.engine_helpers.untied_llama's weights as a GGUF, for the llama.cpp backend."""
    from tests.engine_helpers import untied_gguf

    return untied_gguf(tokenizer, tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="session")
def real_model() -> FrozenModel:
    """The embedded default model (SmolLM2-135M-Instruct), loaded once for the session."""
    return load_frozen_model("default")


def _started_postgres():
    """A PostgreSQL server from the machine's binaries, stopped and removed afterwards. Without
    the binaries the test is skipped with the line to install them (on CI it fails)."""
    from devtools.postgres import INSTALL_HINT, PostgresCluster, find_bindir

    bindir = find_bindir()
    if bindir is None:
        if os.environ.get("CI"):
            pytest.fail(INSTALL_HINT)
        pytest.skip(INSTALL_HINT)
    cluster = PostgresCluster(bindir).init()
    cluster.start()
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL server for the session."""
    yield from _started_postgres()


@pytest.fixture
def own_postgres():
    """A server of its own, for a test that stops and restarts it."""
    yield from _started_postgres()


@pytest.fixture
def database_url(postgres):
    """A fresh, empty database on the session's server."""
    url = postgres.create_database()
    yield url
    postgres.drop_database(url)


@pytest.fixture(params=["folder", "postgres"])
def store_location(request, tmp_path) -> str:
    """Where a store lives: each test using it runs once per backend."""
    if request.param == "folder":
        return str(tmp_path / "store")
    return request.getfixturevalue("database_url")


@pytest.fixture
def store(store_location):
    from prompt_store import open_store

    with open_store(store_location) as opened:
        yield opened


@pytest.fixture
def folder_store(tmp_path):
    from prompt_store import open_store

    return open_store(tmp_path / "store")
