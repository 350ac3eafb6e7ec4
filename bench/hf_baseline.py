"""Plain transformers on bench/serve_bench.py's requests: one by one, and as one static batch.

Run as a child process per OpenMP wait policy (libgomp reads the policy once, when torch
loads), so serve_bench can measure the baseline at its best setting on the host:

    run_baseline(model, "spin 30k", requests, 64, True, static=True, threads=None)

The child reads its job as JSON on stdin and answers JSON on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.layout import ChatLayout  # noqa: E402
from core.modeling import load_frozen_model  # noqa: E402


def baseline(frozen, requests, max_new_tokens: int, fixed_length: bool) -> dict:
    """The same requests one by one with plain HF generate; the prompt is its text tokens."""
    layout = ChatLayout(frozen.tokenizer)
    pad = frozen.tokenizer.pad_token_id
    texts, tokens = [], 0

    def run(query, ids):
        lay = layout.for_input(query)
        input_ids = torch.tensor([list(lay.head_ids) + ids + list(lay.tail_ids)])
        with torch.inference_mode():
            out = frozen.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                min_new_tokens=max_new_tokens if fixed_length else None,
            )
        new = out[0, input_ids.shape[1] :]
        return frozen.tokenizer.decode(new, skip_special_tokens=True), int(new.shape[0])

    run(requests[0][0], requests[0][2])  # warm-up, not counted
    started = time.perf_counter()
    for query, _, ids in requests:
        text, n = run(query, ids)
        texts.append(text)
        tokens += n
    wall = time.perf_counter() - started
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "texts": texts}


def static_batch(frozen, requests, max_new_tokens: int, fixed_length: bool) -> dict:
    """The same requests as ONE left-padded HF generate batch (what a static batcher would do)."""
    layout = ChatLayout(frozen.tokenizer)
    rows = [list(layout.for_input(q).head_ids) + ids + list(layout.for_input(q).tail_ids) for q, _, ids in requests]
    width, pad = max(map(len, rows)), frozen.tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # [16, T]
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    started = time.perf_counter()
    with torch.inference_mode():
        out = frozen.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            min_new_tokens=max_new_tokens if fixed_length else None,
        )
    wall = time.perf_counter() - started
    new = out[:, width:]
    tokens = int((new != pad).sum()) if not fixed_length else new.numel()
    return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "texts": []}


# The wait policies plain transformers is measured under, each in a process of its own (libgomp
# reads them once, when torch loads); the baseline is the best of them on this host.
BASELINE_POLICIES = {  # the spin count explicit: it overrides the policy's (and prompt_store's default)
    "passive": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"},
    "spin 30k": {"GOMP_SPINCOUNT": "30000"},
    "spin 300k (libgomp default)": {"GOMP_SPINCOUNT": "300000"},
    "active": {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "infinite"},
}


def run_baseline(
    model: str, policy: str, requests, max_new_tokens: int, fixed_length: bool, *, static: bool, threads: int | None
) -> dict:
    """`baseline` (and `static_batch`) in a child process under one wait policy."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(BASELINE_POLICIES[policy])
    job = json.dumps(
        {
            "model": model,
            "requests": requests,
            "max_new_tokens": max_new_tokens,
            "fixed": fixed_length,
            "static": static,
            "threads": threads,
        }
    )
    out = subprocess.run(
        [sys.executable, __file__],
        input=job,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    job = json.loads(sys.stdin.read())
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    frozen = load_frozen_model(job["model"], device="cpu")
    requests = [tuple(r) for r in job["requests"]]
    result = {"one_by_one": baseline(frozen, requests, job["max_new_tokens"], job["fixed"])}
    if job["static"]:
        result["static"] = static_batch(frozen, requests, job["max_new_tokens"], job["fixed"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
