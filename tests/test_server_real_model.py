"""End to end on the embedded SmolLM2-135M through HTTP (slow: marked real_model)."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from core.layout import ChatLayout
from core.modeling import load_frozen_model
from prompt_store import open_store
from server.app import create_app
from server.engine import Engine
from server.settings import Settings
from tests.engine_helpers import make_job

pytestmark = pytest.mark.real_model

INSTRUCTION = "Answer with a single number."
QUESTION = "What is 12 plus 7?"


def _text_prompt(frozen, text: str) -> torch.Tensor:
    ids = frozen.tokenizer(text, add_special_tokens=False).input_ids
    return frozen.token_embeddings(ids).detach().float().cpu()  # [P, D]


def test_http_generate_with_a_text_initialised_prompt_matches_hf_generate(real_model, tmp_path):
    # A soft prompt made of the instruction's own token embeddings must act like the text. The
    # reference is HF generate on a copy no engine has touched (engines fuse projections in place).
    plain = load_frozen_model("default")
    layout = ChatLayout(plain.tokenizer).for_input(QUESTION)
    text_ids = plain.tokenizer(INSTRUCTION, add_special_tokens=False).input_ids
    ids = torch.tensor([list(layout.head_ids) + text_ids + list(layout.tail_ids)])
    with torch.no_grad():
        out = plain.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=plain.tokenizer.pad_token_id,
        )
    expected = plain.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    del plain, out

    store = open_store(tmp_path / "store")
    store.publish(
        "adder",
        _text_prompt(real_model, INSTRUCTION),
        fingerprint=real_model.fingerprint,
        base_model=real_model.base_model,
        init_text=INSTRUCTION,
    )
    settings = Settings(store=tmp_path / "store", store_poll_seconds=0.2, api_key=None)
    with TestClient(create_app(settings, frozen=real_model)) as client:
        soft = client.post("/generate", params={"prompt": "adder"}, json={"input": QUESTION, "max_new_tokens": 12})
        bare = client.post("/generate", json={"input": QUESTION, "max_new_tokens": 12})
        stats = client.get("/stats").json()
    assert soft.status_code == 200, soft.text
    assert soft.json()["prompt"] == "adder-v1" and bare.json()["prompt"] is None
    assert stats["model_loads"] == 1 and stats["engine"]["prefix_cache"]["hits"] >= 2
    assert soft.json()["text"] == expected
    assert soft.json()["text"].strip() and bare.json()["text"].strip()


def test_real_model_cached_prefix_equals_uncached(real_model):
    soft = _text_prompt(real_model, INSTRUCTION)
    results = []
    for use_cache in (True, False):
        engine = Engine(real_model, use_prefix_cache=use_cache)
        engine.start()
        try:
            job, sink = make_job(real_model.tokenizer, QUESTION, soft, key=("adder", 1, "x"), max_new_tokens=12)
            engine.submit(job)
            results.append(sink.result(120)[0].token_ids)
        finally:
            engine.stop()
    assert results[0] == results[1]


def test_real_model_eval_job_scores_what_generate_serves(real_model, tmp_path):
    """POST /eval on the resident model: a version made of a text's embeddings and that text as a
    text reference answer alike, and each answer is the one /generate gives."""
    from tests.jobs_helpers import wait_until
    from trainer.data import load_examples

    problems = load_examples("examples/data/arithmetic.test.jsonl")[:12]
    store = open_store(tmp_path / "store")
    store.publish(
        "adder",
        _text_prompt(real_model, INSTRUCTION),
        fingerprint=real_model.fingerprint,
        base_model=real_model.base_model,
        init_text=INSTRUCTION,
        training_config={"task": "generation", "max_new_tokens": 8},
    )
    lines = "".join(f'{{"input": "{p.input}", "output": "{p.output}"}}\n' for p in problems).encode()
    settings = Settings(store=tmp_path / "store", store_poll_seconds=0.2, api_key=None)
    with TestClient(create_app(settings, frozen=real_model)) as client:
        job = client.post(
            "/eval",
            files={"file": ("problems.jsonl", lines, "application/jsonl")},
            data={"prompt": ["adder"], "text": [INSTRUCTION], "bare": "true"},
        ).json()
        done = wait_until(
            lambda: (b := client.get(f"/eval/{job['id']}").json())["state"] in ("succeeded", "failed") and b,
            timeout=300,
        )
        assert done["state"] == "succeeded", done["error"]
        table = done["table"]
        assert table["task"] == "generation" and table["max_new_tokens"] == 8
        for row in table["examples"]:
            assert row["predicted"]["adder"] == row["predicted"][f"text: {INSTRUCTION}"]
            served = client.post(
                "/generate", params={"prompt": "adder"}, json={"input": row["input"], "max_new_tokens": 8}
            )
            assert row["predicted"]["adder"] == served.json()["text"]
        scores = {r["reference"]: r["score"] for r in table["results"]}
        assert scores["adder"] == scores[f"text: {INSTRUCTION}"]
        assert client.get("/prompts/adder").json()["evaluations"][0]["data"]["name"] == "problems.jsonl"


def test_llamacpp_engine_on_the_default_gguf_reads_a_texts_embeddings_as_the_text(real_model, tmp_path):
    """On the llama.cpp engine (the GGUF's own 4-bit weights) a soft prompt made of the instruction's
    token embeddings gives the tokens of the instruction fed as tokens; and the server serves it."""
    from core.modeling import resolve_spec
    from server.engine.llamacpp_backend import LlamaCppBackend
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import GenerationRequest
    from tests.engine_helpers import Collector, require_llamacpp

    require_llamacpp()
    resolved = resolve_spec("default")
    gguf = resolved.folder / resolved.gguf_file
    engine = Engine(real_model, backend=LlamaCppBackend(real_model, gguf, max_rows=4, kv_tokens=8192))
    engine.start()
    try:
        as_soft, soft_sink = make_job(
            real_model.tokenizer,
            QUESTION,
            _text_prompt(real_model, INSTRUCTION),
            key=("adder", 1, "x"),
            max_new_tokens=20,
        )
        layout = ChatLayout(real_model.tokenizer).for_input(QUESTION)
        text_ids = real_model.tokenizer(INSTRUCTION, add_special_tokens=False).input_ids
        text_sink = Collector()
        as_text = GenerationRequest(
            prompt_key=None,
            soft=None,
            head_ids=tuple(layout.head_ids) + tuple(text_ids),
            tail_ids=tuple(layout.tail_ids),
            params=SamplingParams(max_new_tokens=20),
            sink=text_sink,
        )
        engine.submit(as_soft), engine.submit(as_text)
        soft_done, text_done = soft_sink.result(120)[0], text_sink.result(120)[0]
    finally:
        engine.stop()
    assert soft_done.text.strip() and soft_done.token_ids == text_done.token_ids

    with open_store(tmp_path / "store") as store:
        store.publish(
            "adder",
            _text_prompt(real_model, INSTRUCTION),
            fingerprint=real_model.fingerprint,
            base_model=real_model.base_model,
        )
    settings = Settings(store=tmp_path / "store", model="default", engine="llamacpp", api_key=None)
    with TestClient(create_app(settings, frozen=real_model)) as client:
        served = client.post("/generate", params={"prompt": "adder"}, json={"input": QUESTION, "max_new_tokens": 20})
        stats = client.get("/stats").json()
    assert served.status_code == 200, served.text
    assert stats["engine"]["backend"] == "llamacpp"
    assert served.json()["text"] == soft_done.text
