"""The OpenAI-compatible API through the real `openai` SDK, against a running server (uvicorn in a
thread, the tiny untied model): models, chat and text completions, streams, errors, client keys."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from prompt_store import open_store
from server.app import create_app
from tests.http_helpers import make_settings, mixing, publish  # noqa: F401

CLIENT_KEY, ADMIN_KEY = "client-key", "admin-key"
HI = [{"role": "user", "content": "What is two plus three?"}]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    return tmp_path_factory.mktemp("openai") / "store"


@pytest.fixture(scope="module")
def base_url(mixing, store_root):
    settings = make_settings(
        store_root.parent,
        max_new_tokens_limit=32,
        max_batch_size=8,
        max_queue=32,
        client_keys=f"other-key, {CLIENT_KEY}",
        api_key=ADMIN_KEY,
    )
    publish(settings.store, mixing, "math", vectors=4, seed=0)
    publish(settings.store, mixing, "math", vectors=6, seed=1)
    open_store(settings.store).set_alias("math-prod", "math-v1")
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings, frozen=mixing), host="127.0.0.1", port=_free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(15)


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=CLIENT_KEY, max_retries=0)


def _generate(base_url: str, prompt: str | None, **body) -> dict:
    answer = httpx.post(
        f"{base_url}/generate",
        params={"prompt": prompt} if prompt else None,
        json=body,
        headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_models_lists_the_base_model_names_versions_and_aliases(client):
    models = {m.id: m for m in client.models.list()}
    assert list(models)[0] == "tiny-untied" and models["tiny-untied"].root == "tiny-untied"
    assert {"math", "math-v1", "math-v2", "math-prod"} <= set(models)
    assert models["math-v2"].parent == "math" and models["math-prod"].parent == "math-v1"
    assert models["math"].parent == "tiny-untied" and all(m.root == "tiny-untied" for m in models.values())
    assert all(m.owned_by and m.created > 0 for m in models.values())


def test_versions_published_or_deleted_show_up_without_a_restart(client, mixing, store_root):
    version = publish(store_root, mixing, "fresh")
    assert {"fresh", "fresh-v1"} <= {m.id for m in client.models.list()}
    open_store(store_root).delete(str(version.id))
    assert not {"fresh", "fresh-v1"} & {m.id for m in client.models.list()}


def test_chat_greedy_text_equals_generate_streamed_or_not(client, base_url):
    reference = _generate(base_url, "math", messages=HI, max_new_tokens=12)
    whole = client.chat.completions.create(model="math", messages=HI, max_tokens=12, temperature=0)
    pieces = [
        chunk
        for chunk in client.chat.completions.create(
            model="math", messages=HI, max_tokens=12, temperature=0, stream=True
        )
    ]
    streamed = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert whole.choices[0].message.content == reference["text"] == streamed
    assert whole.model == "math-v2" and whole.choices[0].finish_reason == reference["finish_reason"]
    assert pieces[0].choices[0].delta.role == "assistant" and pieces[-1].choices[0].finish_reason
    assert whole.usage.prompt_tokens == reference["usage"]["prompt_tokens"]
    assert whole.usage.completion_tokens == reference["usage"]["completion_tokens"]


def test_n_choices_stop_and_seeded_sampling(client):
    greedy = client.chat.completions.create(model="math-prod", messages=HI, max_tokens=8, temperature=0, n=2)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    text = greedy.choices[0].message.content
    stop = text[2:4] if len(text) >= 4 else text[-1:]
    stopped = client.chat.completions.create(model="math-prod", messages=HI, max_tokens=8, temperature=0, stop=[stop])
    assert stopped.choices[0].message.content == text[: text.find(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    sampled = [
        client.chat.completions.create(model="math", messages=HI, max_tokens=8, temperature=1.0, seed=42)
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    other_seed = client.chat.completions.create(model="math", messages=HI, max_tokens=8, temperature=1.0, seed=43)
    assert sampled[0] == sampled[1]
    assert other_seed.choices[0].message.content != sampled[0] or len(sampled[0]) == 0


def test_completions_with_a_list_of_prompts_equal_generate_per_prompt(client, base_url):
    prompts = ["What is two plus three?", "The movie was great fun"]
    answer = client.completions.create(model="math", prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(prompts):
        reference = _generate(base_url, "math", input=prompt, max_new_tokens=6)["text"]
        assert answer.choices[2 * i].text == answer.choices[2 * i + 1].text == reference
    single = _generate(base_url, "math", input=prompts[0], max_new_tokens=6)
    assert (
        answer.usage.prompt_tokens
        == single["usage"]["prompt_tokens"]
        + _generate(base_url, "math", input=prompts[1], max_new_tokens=6)["usage"]["prompt_tokens"]
    )


def test_the_base_model_id_means_no_soft_prompt(client, base_url):
    answer = client.chat.completions.create(model="tiny-untied", messages=HI, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content == _generate(base_url, None, messages=HI, max_new_tokens=8)["text"]
    assert answer.model == "tiny-untied" and answer.usage.soft_prompt_tokens == 0


def test_logprobs_and_usage_in_the_last_stream_chunk(client):
    answer = client.chat.completions.create(
        model="math", messages=HI, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens == 5
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)
    assert content[0].token == content[0].top_logprobs[0].token  # greedy picks the most likely token
    chunks = list(
        client.chat.completions.create(
            model="math", messages=HI, max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])
    legacy = client.completions.create(model="math", prompt="hi", max_tokens=4, temperature=0, logprobs=2)
    assert len(legacy.choices[0].logprobs.tokens) == 4 and len(legacy.choices[0].logprobs.top_logprobs[0]) == 2


def test_async_client_streams(base_url):
    async def run() -> str:
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=CLIENT_KEY, max_retries=0) as client:
            stream = await client.chat.completions.create(
                model="math", messages=HI, max_tokens=10, temperature=0, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    assert asyncio.run(run()) == _generate(base_url, "math", messages=HI, max_new_tokens=10)["text"]


def test_sdk_errors_are_the_right_classes(client, base_url):
    with pytest.raises(openai.NotFoundError, match="maths") as missing:
        client.chat.completions.create(model="maths", messages=HI)
    assert "math" in str(missing.value)  # close matches
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.chat.completions.create(model="math", messages=HI, logit_bias={"5": 10})
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(
            model="math", messages=HI, tools=[{"type": "function", "function": {"name": "f"}}]
        )
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="math", messages=HI, temperature=7)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="math", prompt="the movie was great " * 80, max_tokens=8)
    harmless = client.chat.completions.create(model="math", messages=HI, max_tokens=2, user="someone")
    assert harmless.choices[0].message.content is not None
    for key in ("wrong-key", ""):
        wrong = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    admin = openai.OpenAI(base_url=f"{base_url}/v1", api_key=ADMIN_KEY, max_retries=0)
    assert admin.models.list().data  # the admin key works on client routes too
    assert httpx.post(f"{base_url}/generate", json={"input": "hi"}).status_code == 401
    assert httpx.get(f"{base_url}/health").status_code == httpx.get(f"{base_url}/metrics").status_code == 200
