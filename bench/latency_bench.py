"""Batch-1 decode latency: the server alone, the server beside a training job, and plain
transformers `generate` under each OpenMP wait policy, side by side in one run.

    .venv/bin/python bench/latency_bench.py [--tokens 64] [--repeats 3]

The wait policy is read once, when OpenMP starts, so every measurement is a process of its own:
- `generate`: plain `model.generate` (batch 1, greedy, exactly `--tokens` new tokens) in a fresh
  process; ms per token = (time for N tokens - time for 1 token) / (N - 1);
- `server`: `softprompt serve` on the same model; one request at a time of exactly `--tokens`
  tokens; ms per token = the server's own decode_ms / (tokens - 1);
- `server + training`: the same, while a training job started through POST /train runs
  (the engine then serves on the threads the job leaves free).
Each policy is tried on every side, and the table names the best setting of each: the
baseline is plain `generate` at its best, as a user who knows it would run it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.serve_bench import QUERIES, free_port, host_line, start_server, wait_ready  # noqa: E402

POLICIES = {  # name: the environment OpenMP starts with, spin count explicit (it overrides the policy's)
    "passive (sleep)": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"},
    "spin 300k (libgomp's default)": {"GOMP_SPINCOUNT": "300000"},
    "spin 30k (the server's default)": {"GOMP_SPINCOUNT": "30000"},
    "active (spin forever)": {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "infinite"},
}
OMP_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def policy_env(policy: dict) -> dict:
    return {**{k: v for k, v in os.environ.items() if k not in OMP_VARIABLES}, **policy}


def generate_child(model: str, tokens: int, repeats: int) -> None:
    """In a fresh process: ms per decoded token of plain generate, median of `repeats`."""
    import torch

    from core.layout import ChatLayout
    from core.modeling import load_frozen_model

    frozen = load_frozen_model(model, device="cpu")
    layout = ChatLayout(frozen.tokenizer).for_input(QUERIES[0])
    ids = torch.tensor([list(layout.head_ids) + list(layout.tail_ids)])

    def run(n: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            frozen.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=frozen.tokenizer.pad_token_id,
            )
        return time.perf_counter() - started

    run(tokens)  # warm-up
    per_token = [(run(tokens) - run(1)) / (tokens - 1) * 1e3 for _ in range(repeats)]
    print(json.dumps({"ms_per_token": statistics.median(per_token)}))


def measure_generate(model: str, policy: dict, tokens: int, repeats: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--model", model, "--tokens", str(tokens), "--repeats", str(repeats)],
        env=policy_env(policy),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["ms_per_token"]


def measure_server(model: str, policy: dict, tokens: int, repeats: int, training: bool) -> float:
    workdir = Path(tempfile.mkdtemp(prefix="latency-bench-"))
    port = free_port()
    env = {
        **policy_env(policy),
        "SOFTPROMPT_STORE": str(workdir / "store"),
        "SOFTPROMPT_MODEL": model,
        "SOFTPROMPT_DEVICE": "cpu",
        "SOFTPROMPT_TRAIN_THREADS": "1",
    }
    env.pop("SOFTPROMPT_API_KEY", None)
    server = start_server(env, port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(server, base)
        if training:
            _start_training(base)
        body = {"input": QUERIES[0], "max_new_tokens": tokens, "ignore_eos": True}
        httpx.post(f"{base}/generate", json=body, timeout=600).raise_for_status()  # warm-up
        per_token = []
        for _ in range(repeats):
            answer = httpx.post(f"{base}/generate", json=body, timeout=600).json()
            per_token.append(answer["timings"]["decode_ms"] / (answer["usage"]["completion_tokens"] - 1))
        if training:
            assert httpx.get(f"{base}/stats").json()["engine"]["threads"] < _threads(), "the job was not running"
        return statistics.median(per_token)
    finally:
        server.terminate()
        server.wait(60)


def _start_training(base: str) -> None:
    """A long sentiment job through POST /train; returns once it is taking steps."""
    data = (ROOT / "examples/data/sentiment.train.jsonl").read_bytes()
    job = httpx.post(
        f"{base}/train",
        files={"file": ("train.jsonl", data)},
        data={"name": "busy", "init": "Classify the sentiment.", "steps": "100000"},
        timeout=60,
    ).json()
    deadline = time.monotonic() + 300
    while httpx.get(f"{base}/train/{job['id']}").json()["step"] < 1:
        if time.monotonic() > deadline:
            raise SystemExit("the training job did not start")
        time.sleep(0.5)


def _threads() -> int:
    return os.cpu_count() or 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--policies", nargs="*", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        generate_child(args.model, args.tokens, args.repeats)
        return 0
    print(host_line())
    print(
        f"model {args.model}; batch 1, {args.tokens} new tokens, median of {args.repeats}; ms per decoded token",
        flush=True,
    )
    rows = {}
    for name in args.policies:
        policy = POLICIES[name]
        rows[name] = {
            "generate": measure_generate(args.model, policy, args.tokens, args.repeats),
            "server": measure_server(args.model, policy, args.tokens, args.repeats, training=False),
            "server + training": measure_server(args.model, policy, args.tokens, args.repeats, training=True),
        }
        print(f"{name:<30} " + "  ".join(f"{side} {ms:6.1f}" for side, ms in rows[name].items()), flush=True)
    best = {side: min(rows, key=lambda n: rows[n][side]) for side in ("generate", "server", "server + training")}
    base_ms = rows[best["generate"]]["generate"]
    print(f"best generate: {base_ms:.1f} ms/token ({best['generate']})")
    for side in ("server", "server + training"):
        ms = rows[best[side]][side]
        print(f"best {side}: {ms:.1f} ms/token ({best[side]}): {ms / base_ms:.2f}x of generate at its best")
    default = os.environ.get("OMP_WAIT_POLICY", "unset")
    print(f"(this shell's OMP_WAIT_POLICY: {default}; each side ran under the policy of its row)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
