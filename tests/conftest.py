from __future__ import annotations

import prompt_store  # noqa: F401  (first: it sets how torch's threads wait, before torch loads)
import pytest

from tests.tiny import tiny_llama, tiny_tokenizer  # noqa: E402
from trainer.modeling import FrozenModel, from_loaded, load_frozen_model  # noqa: E402


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
def real_model() -> FrozenModel:
    """The embedded default model (SmolLM2-135M-Instruct), loaded once for the session."""
    return load_frozen_model("default")


@pytest.fixture
def store(tmp_path):
    from prompt_store import PromptStore

    return PromptStore(tmp_path / "store")
