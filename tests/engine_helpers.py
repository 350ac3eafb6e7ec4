"""Helpers for engine tests (requests built from text: devtools/engine_requests.py)."""

from __future__ import annotations

import torch

from devtools.engine_requests import Collector, make_job  # noqa: F401  (re-exported for the tests)


def generated_ids(done_and_pieces) -> list[int]:
    return [p.token_id for p in done_and_pieces[1]]


def untied_llama(vocab_size: int, *, seed: int = 0):
    """A tiny random Llama whose output head is NOT tied to its embeddings.

    With tied embeddings a random 2-layer model mostly predicts its last input token again,
    so every comparison passes trivially; an untied head makes greedy tokens vary with context.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1.0)
        model.lm_head.weight.normal_(0, 0.5)
        # strong attention, so tokens far back (the soft prompt) change the next-token choice
        for layer in model.model.layers:
            for proj in (
                layer.self_attn.q_proj,
                layer.self_attn.k_proj,
                layer.self_attn.v_proj,
                layer.self_attn.o_proj,
            ):
                proj.weight.normal_(0, 0.3)
    return model.eval()


def wait_all(sinks, timeout: float = 60.0):
    return [sink.result(timeout) for sink in sinks]


def submit_together(engine, tokenizer, cases, **params):
    """Submit (text, prompt key, soft prompt) cases while the engine is paused, so they are all
    admitted in one batch; their DoneEvents in order."""
    engine.pause()
    sinks = []
    for text, key, soft in cases:
        job, sink = make_job(tokenizer, text, soft, key=key, **params)
        engine.submit(job)
        sinks.append(sink)
    engine.resume()
    return [done for done, _ in wait_all(sinks)]


MIXED_TEXTS = ["What is two plus three?", "The movie was great fun", "Classify", "a bad movie"]


def mixed_batch_tokens(tokenizer, *, together: bool, **rewrites):
    """Greedy tokens of 4 requests (3 soft prompts of different lengths and the bare model) on a
    fresh `untied_llama` engine, its model rewritten as the server does (`rewrites` turns some
    off, e.g. packed_weights=False): all in one batch, or one by one.
    Returns (token ids per request, the stopped engine)."""
    from core.modeling import from_loaded
    from server.engine import Engine
    from server.engine.rewrites import prepare_for_serving

    torch.manual_seed(7)
    softs = [torch.randn(3, 64), torch.randn(9, 64), None, torch.randn(5, 64)]
    frozen = from_loaded(untied_llama(len(tokenizer)), tokenizer, base_model="tiny-untied")
    prepare_for_serving(frozen.model, max_batch_size=4, **rewrites)
    engine = Engine(frozen, max_batch_size=4)
    engine.start()
    try:
        jobs = [
            make_job(tokenizer, text, soft, key=None if soft is None else ("p", i, "c"), max_new_tokens=12)
            for i, (text, soft) in enumerate(zip(MIXED_TEXTS, softs))
        ]
        if not together:
            out = []
            for job, sink in jobs:
                engine.submit(job)
                out.append(sink.result()[0].token_ids)
            return out, engine
        engine.pause()
        for job, _ in jobs:
            engine.submit(job)
        engine.resume()
        return [done.token_ids for done, _ in wait_all([sink for _, sink in jobs])], engine
    finally:
        engine.stop()


# ---------------------------------------------------------------- both backends
BACKENDS = ("torch", "llamacpp")


def require_llamacpp() -> None:
    """Skip a llama.cpp test where llama-cpp-python is not installed, unless it is required:
    `make test` installs it and sets SOFTPROMPT_REQUIRE_LLAMACPP=1 (CI sets CI), so there it fails."""
    import importlib.util
    import os

    import pytest

    if importlib.util.find_spec("llama_cpp") is None:
        if os.environ.get("SOFTPROMPT_REQUIRE_LLAMACPP") == "1" or os.environ.get("CI"):
            pytest.fail("llama-cpp-python is not installed (make install-llamacpp)")
        pytest.skip("llama-cpp-python is not installed (make install-llamacpp)")


def untied_gguf(tokenizer, folder) -> str:
    """`untied_llama(len(tokenizer))`'s weights as an f32 GGUF in `folder` (llama.cpp runs the same model)."""
    from pathlib import Path

    from tests.tiny_gguf import write_llama_gguf

    path = Path(folder) / "tiny-untied.gguf"
    if not path.exists():
        write_llama_gguf(untied_llama(len(tokenizer)), tokenizer, path)
    return str(path)


def make_engine(backend: str, frozen, gguf: str | None = None, **kwargs):
    """An Engine on `frozen` with the named backend (llamacpp runs `gguf`, the same weights).

    kwargs are Engine's; use_prefix_cache applies to both backends."""
    from server.engine import Engine

    if backend == "torch":
        return Engine(frozen, **kwargs)
    require_llamacpp()
    from server.engine.llamacpp_backend import LlamaCppBackend

    for torch_only in ("growing_cache", "prefix_cache"):
        kwargs.pop(torch_only, None)
    rows = kwargs.get("max_batch_size", 16)
    chosen = LlamaCppBackend(
        frozen,
        gguf,
        max_rows=rows,
        kv_tokens=kwargs.pop("kv_tokens", 4096),
        prefix_slots=kwargs.pop("prefix_slots", 4),
        use_prefix_cache=kwargs.get("use_prefix_cache", True),
        threads=kwargs.get("threads"),
    )
    return Engine(frozen, backend=chosen, **kwargs)
