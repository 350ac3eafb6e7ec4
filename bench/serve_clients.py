"""The client side of bench/serve_bench.py: one burst of /generate requests, the same through the
`openai` SDK, time to first token, and the first request on a just-published version."""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx

from bench.serve_bench import LONG_TEXT, QUERIES, publish_text, text_ids
from prompt_store import PromptStore


def same_texts(these: list[str], those: list[str]) -> int:
    return sum(a == b for a, b in zip(these, those))


def pooled(rounds: list[dict]) -> dict:
    """All rounds as one measurement: total tokens over total time; the first round's texts."""
    tokens, wall = sum(r["tokens"] for r in rounds), sum(r["wall_s"] for r in rounds)
    pooled = {
        "wall_s": wall,
        "tokens": tokens,
        "tok_s": tokens / wall,
        "texts": rounds[0]["texts"],
        "rounds_tok_s": [r["tok_s"] for r in rounds],
    }
    if "max_batch" in rounds[0]:
        pooled.update(
            max_batch=max(r["max_batch"] for r in rounds),
            prefill_batches=max(r["prefill_batches"] for r in rounds),
            decode_steps=sum(r["decode_steps"] for r in rounds),
        )
    return pooled


async def served(base: str, requests, max_new_tokens: int, fixed_length: bool, *, one_client: bool = False) -> dict:
    """The requests sent at once (or, with `one_client`, one after another by a single client)."""
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:

        async def one(query, prompt):
            r = await client.post(
                "/generate",
                params={"prompt": prompt},
                json={"input": query, "max_new_tokens": max_new_tokens, "ignore_eos": fixed_length},
            )
            r.raise_for_status()
            return r.json()

        await asyncio.gather(*(one(q, p) for q, p, _ in requests[:4]))  # warm-up, not counted
        before = (await client.get("/stats")).json()["engine"]
        started = time.perf_counter()
        if one_client:
            results = [await one(q, p) for q, p, _ in requests]
        else:
            results = await asyncio.gather(*(one(q, p) for q, p, _ in requests))
        wall = time.perf_counter() - started
        after = (await client.get("/stats")).json()["engine"]
    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    return {
        "wall_s": wall,
        "tokens": tokens,
        "tok_s": tokens / wall,
        "texts": [r["text"] for r in results],
        "max_batch": max(r["batch"]["max"] for r in results),
        "prefill_batches": after["prefill_batches"] - before["prefill_batches"],
        "decode_steps": after["decode_steps"] - before["decode_steps"],
        "ttft_ms_median": statistics.median(r["timings"]["ttft_ms"] for r in results),
    }


async def served_openai(base: str, requests, max_new_tokens: int, fixed_length: bool) -> dict:
    """The same requests through the `openai` SDK: streamed chat completions, `model` = the prompt."""
    import openai

    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", timeout=600, max_retries=0) as client:

        async def one(query, prompt):
            stream = await client.chat.completions.create(
                model=prompt,
                messages=[{"role": "user", "content": query}],
                max_tokens=max_new_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": fixed_length},
            )
            text, usage = [], None
            async for chunk in stream:
                if chunk.choices:
                    text.append(chunk.choices[0].delta.content or "")
                usage = chunk.usage or usage
            return "".join(text), usage.completion_tokens

        await asyncio.gather(*(one(q, p) for q, p, _ in requests[:4]))  # warm-up, not counted
        started = time.perf_counter()
        results = await asyncio.gather(*(one(q, p) for q, p, _ in requests))
        wall = time.perf_counter() - started
    tokens = sum(n for _, n in results)
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "texts": [text for text, _ in results]}


async def ttft(base: str, prompts: list[str | None], query: str, repeats: int) -> list[dict]:
    """Client-side time to the first streamed token, and the server's own ttft_ms, for each of
    `prompts`; requests alternate between them so the VM's drift hits every prompt alike."""
    client_ms = {i: [] for i in range(len(prompts))}
    server_ms = {i: [] for i in range(len(prompts))}
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        for _ in range(repeats):
            for i, prompt in enumerate(prompts):
                params = {"stream": "true", **({"prompt": prompt} if prompt else {})}
                started = time.perf_counter()
                first = None
                async with client.stream(
                    "POST", "/generate", params=params, json={"input": query, "max_new_tokens": 4}
                ) as r:
                    event = None
                    async for line in r.aiter_lines():
                        if line.startswith("event:"):
                            event = line[6:].strip()
                        elif line.startswith("data:") and event == "token" and first is None:
                            first = (time.perf_counter() - started) * 1e3
                        elif line.startswith("data:") and event == "done":
                            server_ms[i].append(json.loads(line[5:])["timings"]["ttft_ms"])
                client_ms[i].append(first if first is not None else float("nan"))
    return [
        {"client_ms": statistics.median(client_ms[i]), "server_ms": statistics.median(server_ms[i])}
        for i in range(len(prompts))
    ]


async def swap(base: str, store: PromptStore, frozen, rounds: int, wait_for_watcher: bool) -> dict:
    """Publish a new version (as the trainer does: straight into the store), then time requests."""
    body = {"input": QUERIES[2], "max_new_tokens": 1}  # latency = resolve + prefill: the part a swap can slow
    firsts, warms, ready_ms = [], [], []
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        for i in range(rounds):
            ids = text_ids(frozen, LONG_TEXT[i * 7 :] + LONG_TEXT, 100)
            published = time.perf_counter()
            version = publish_text(store, frozen, "swap", ids)
            if wait_for_watcher:
                while str(version.id) not in (await client.get("/stats")).json()["watcher"]["warmed"]:
                    await asyncio.sleep(0.01)
                ready_ms.append((time.perf_counter() - published) * 1e3)
            timed = []
            for _ in range(3):  # first request on the new version, then two warm ones
                started = time.perf_counter()
                r = await client.post("/generate", params={"prompt": "swap"}, json=body)
                timed.append((time.perf_counter() - started) * 1e3)
                assert r.json()["prompt"] == str(version.id), r.text
            firsts.append(timed[0])
            warms.append(statistics.median(timed[1:]))
    out = {"first_ms": statistics.median(firsts), "warm_ms": statistics.median(warms)}
    out["extra_ms"] = out["first_ms"] - out["warm_ms"]
    if ready_ms:
        out["publish_to_warm_ms"] = statistics.median(ready_ms)
    return out
