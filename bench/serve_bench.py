"""Serving benchmark: the HTTP server (continuous batching, prefix cache) vs plain HF generate.

    .venv/bin/python bench/serve_bench.py

One command reproduces everything: it loads the model (for the baseline and to make prompts),
publishes 4 prompt versions made of text-token embeddings into a temporary store, starts
`softprompt serve` as a subprocess on that store, and measures in the same run:

1. throughput: 16 concurrent clients over 4 prompt versions (fixed inputs, greedy, exactly
   64 new tokens: `ignore_eos` on the server, `min_new_tokens` for HF; `--natural-eos` stops
   at EOS instead) vs the same 16 requests one by one with `model.generate(input_ids=...)`
   where the prompt is the text whose embeddings make the soft prompt (same tokens), in
   `--rounds` alternating rounds (baseline, then burst) pooled into one ratio;
2. TTFT (streamed, first SSE token) with a 100-vector prompt vs no prompt, requests alternating;
3. hot swap: first request on a just-published version vs the same request once warm;
4. with `--openai`, each round also sends the same 16 requests as streamed chat completions
   through the `openai` SDK (`model` = the prompt, vLLM's `ignore_eos` for exactly 64 tokens),
   before or after the /generate burst in alternate rounds, and compares the two throughputs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import torch  # noqa: E402

from bench.hf_baseline import BASELINE_POLICIES, run_baseline  # noqa: E402
from core.modeling import load_frozen_model  # noqa: E402
from prompt_store import PromptStore, open_store  # noqa: E402

PROMPT_LENGTHS = {"sentiment": 20, "math": 40, "summary": 60, "style": 100}  # vectors per version
PROMPT_TEXTS = {  # tokenized, repeated or cut to PROMPT_LENGTHS
    "sentiment": "Decide whether the following review is positive or negative, then answer with one word and a short "
    "reason.",
    "math": "You are a careful math tutor. Solve the problem step by step, show each intermediate result, "
    "check the arithmetic twice, and finish with a line that starts with 'Answer:' followed by the number.",
    "summary": "Summarise the user's text in one sentence for a busy reader.",
    "style": "Rewrite the answer in the voice of a friendly pirate captain who loves the sea, ships, treasure maps, "
    "and long stories about storms, but keep every fact correct and keep the answer under five sentences. "
    "Use nautical words where they fit and end with a cheerful farewell.",
}
QUERIES = [
    "The film was long but the acting carried it.",
    "What is 17 times 23?",
    "Explain why the sky is blue.",
    "Tell me about your favourite book.",
    "I loved the soundtrack and the ending.",
    "How many legs do three spiders have?",
    "Describe a rainy day in a city.",
    "Write a note to a neighbour about a lost cat.",
    "The service was slow and the food was cold.",
    "What is the square root of 144?",
    "Why do leaves change colour?",
    "Give me advice for a job interview.",
    "An average movie with a great cast.",
    "If a train travels 60 km in 45 minutes, how fast is it?",
    "Summarise the plot of Cinderella.",
    "Recommend a weekend hobby.",
]
LONG_TEXT = (
    "Think about the question carefully, consider what the user really wants to know, recall the relevant "
    "facts, arrange them in a clear order, avoid jargon, give one concrete example, mention a common mistake "
    "people make about this topic, and end with a short summary sentence that a child could understand. "
    "Be warm and patient."
)


def host_line() -> str:
    """The CPU this ran on: the same command gives other absolute times, and other ratios, on other hosts."""
    names = (
        [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        if Path("/proc/cpuinfo").exists()
        else []
    )
    return f"host: {names[0] if names else 'unknown CPU'}, {os.cpu_count()} logical CPUs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict, port: int, *, input_cache: bool = False) -> subprocess.Popen:
    """`softprompt serve` on 127.0.0.1:`port` in a process of its own, with `env` (SOFTPROMPT_*).

    The benches send the same inputs round after round and compare with baselines that prefill
    every one, so the input cache (repeated inputs skip their prefill) is off unless asked for."""
    if not input_cache:
        env = {**env, "SOFTPROMPT_INPUT_CACHE_MB": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )


def wait_ready(server: subprocess.Popen, base: str, timeout: float = 300) -> None:
    """Poll /ready until it answers 200; exit if the server dies or takes longer than `timeout`."""
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.time() > deadline or server.poll() is not None:
            raise SystemExit("server did not become ready")
        time.sleep(0.2)


def text_ids(frozen, text: str, length: int | None = None) -> list[int]:
    ids = frozen.tokenizer(text, add_special_tokens=False).input_ids
    if length is not None:
        while len(ids) < length:
            ids = ids + ids
        ids = ids[:length]
    return ids


def text_prompts(frozen) -> dict[str, torch.Tensor]:
    """The bench's 4 prompts as soft-prompt tensors: token embeddings of PROMPT_TEXTS, [P, D] each."""
    with torch.no_grad():
        return {
            name: frozen.token_embeddings(text_ids(frozen, text, PROMPT_LENGTHS[name])).float()
            for name, text in PROMPT_TEXTS.items()
        }


def publish_text(store: PromptStore, frozen, name: str, ids: list[int]):
    with torch.no_grad():
        vectors = frozen.token_embeddings(ids).detach().float().cpu()  # [P, D]
    return store.publish(
        name,
        vectors,
        fingerprint=frozen.fingerprint,
        base_model=frozen.base_model,
        init_text=frozen.tokenizer.decode(ids),
    )


def main() -> int:
    from bench.serve_clients import pooled, same_texts, served, served_openai, swap, ttft

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model spec (default: embedded SmolLM2-135M)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (one request each)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (server and baseline)")
    parser.add_argument("--poll", type=float, default=0.2, help="server's store poll interval, seconds")
    parser.add_argument("--repeats", type=int, default=31, help="TTFT requests per prompt, alternating (median)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="throughput rounds, each the one-by-one baseline then the concurrent burst; the ratio pools them",
    )
    parser.add_argument("--swap-rounds", type=int, default=5)
    parser.add_argument(
        "--natural-eos",
        action="store_true",
        help="stop at end-of-sequence (rows end at different steps) instead of exactly max_new_tokens",
    )
    parser.add_argument(
        "--openai",
        action="store_true",
        help="each round also drives the same concurrent requests through the openai SDK (streamed chat "
        "completions) and compares their throughput with /generate's",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    frozen = load_frozen_model(args.model, device="cpu")
    workdir = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    store = open_store(workdir / "store")
    prompt_ids = {name: text_ids(frozen, text, PROMPT_LENGTHS[name]) for name, text in PROMPT_TEXTS.items()}
    versions = {name: str(publish_text(store, frozen, name, ids).id) for name, ids in prompt_ids.items()}
    long_ids = text_ids(frozen, LONG_TEXT, 100)
    publish_text(store, frozen, "long", long_ids)
    names = list(PROMPT_TEXTS)
    requests = [(QUERIES[i % len(QUERIES)], names[i % 4], prompt_ids[names[i % 4]]) for i in range(args.clients)]

    port = free_port()
    env = {
        **os.environ,
        "SOFTPROMPT_STORE": str(workdir / "store"),
        "SOFTPROMPT_MODEL": args.model,
        "SOFTPROMPT_STORE_POLL_SECONDS": str(args.poll),
        "SOFTPROMPT_DEVICE": "cpu",
        "SOFTPROMPT_MAX_BATCH_SIZE": str(max(16, args.clients)),
    }
    env.pop("SOFTPROMPT_API_KEY", None)
    if args.threads:
        env["SOFTPROMPT_THREADS"] = str(args.threads)
    server = start_server(env, port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(server, base)
        print(host_line())
        print(
            f"model: {frozen.base_model}; torch threads {torch.get_num_threads()}; server GOMP_SPINCOUNT "
            f"{os.environ.get('GOMP_SPINCOUNT')}, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
            f"{args.clients} requests x {args.max_new_tokens} new tokens "
            f"({'stop at EOS' if args.natural_eos else 'exactly, EOS ignored'}) over {versions}",
            flush=True,
        )
        fixed = not args.natural_eos
        plain = [(q, name, ids) for q, name, ids in requests]
        probe = {
            policy: run_baseline(
                args.model, policy, plain[:4], args.max_new_tokens, fixed, static=False, threads=args.threads
            )["one_by_one"]["tok_s"]
            for policy in BASELINE_POLICIES
        }
        best = max(probe, key=probe.get)
        print(
            "baseline wait policies, 4 requests one by one (tok/s): "
            + ", ".join(f"{p} {t:.1f}" for p, t in probe.items())
            + f"; best: {best}",
            flush=True,
        )
        base_rounds, static_rounds, serve_rounds, openai_rounds = [], [], [], []
        for round_no in range(1, args.rounds + 1):  # alternating, so the VM's drift hits both sides
            measured = run_baseline(
                args.model, best, plain, args.max_new_tokens, fixed, static=True, threads=args.threads
            )
            base_rounds.append(measured["one_by_one"])
            static_rounds.append(measured["static"])
            openai_first = args.openai and round_no % 2 == 0  # alternate which API goes first, as the drift goes
            if openai_first:
                openai_rounds.append(asyncio.run(served_openai(base, requests, args.max_new_tokens, fixed)))
            serve_rounds.append(asyncio.run(served(base, requests, args.max_new_tokens, fixed)))
            b, v = base_rounds[-1], serve_rounds[-1]
            print(
                f"round {round_no}: one by one {b['tokens']} tokens in {b['wall_s']:.1f} s, server {args.clients} "
                "concurrent "
                f"{v['tokens']} tokens in {v['wall_s']:.1f} s ({v['wall_s'] / max(1, v['decode_steps']) * 1e3:.0f} "
                "ms per "
                f"decode step incl. prefill): {v['tok_s'] / b['tok_s']:.2f}x; one static HF batch of {args.clients} "
                f"{static_rounds[-1]['tok_s']:.1f} tok/s: server {v['tok_s'] / static_rounds[-1]['tok_s']:.2f}x",
                flush=True,
            )
            if args.openai:
                if not openai_first:
                    openai_rounds.append(asyncio.run(served_openai(base, requests, args.max_new_tokens, fixed)))
                o = openai_rounds[-1]
                print(
                    f"round {round_no}: openai SDK, {args.clients} concurrent streams: {o['tokens']} tokens in "
                    f"{o['wall_s']:.1f} s: {o['tok_s'] / v['tok_s']:.3f}x of /generate",
                    flush=True,
                )
        base_res, serve_res = pooled(base_rounds), pooled(serve_rounds)
        query = QUERIES[0]
        asyncio.run(ttft(base, [None, "long"], query, 1))  # warm-up
        t_none, t_long = asyncio.run(ttft(base, [None, "long"], query, args.repeats))
        swap_res = asyncio.run(swap(base, store, frozen, args.swap_rounds, wait_for_watcher=True))
        swap_cold = asyncio.run(swap(base, store, frozen, args.swap_rounds, wait_for_watcher=False))
        stats = httpx.get(f"{base}/stats").json()
    finally:
        server.terminate()
        server.wait(30)

    same = sum(a == b for a, b in zip(base_res["texts"], serve_res["texts"]))
    round_ratios = ", ".join(f"{v['tok_s'] / b['tok_s']:.2f}x" for b, v in zip(base_rounds, serve_rounds))
    rows = [
        (
            f"aggregate tok/s, HF generate one by one ({best})",
            f"{base_res['tok_s']:.1f}",
            "the best wait policy of the probe",
        ),
        (f"aggregate tok/s, one static HF batch of {args.clients}", f"{pooled(static_rounds)['tok_s']:.1f}", ""),
        (
            f"aggregate tok/s, server {args.clients} concurrent",
            f"{serve_res['tok_s']:.1f}",
            f"max batch {serve_res['max_batch']}, {serve_res['prefill_batches']} prefill batches",
        ),
        (
            "server / static HF batch (target >= 1.2x)",
            f"{serve_res['tok_s'] / pooled(static_rounds)['tok_s']:.2f}x",
            "rounds " + ", ".join(f"{v['tok_s'] / st['tok_s']:.2f}x" for st, v in zip(static_rounds, serve_rounds)),
        ),
        (
            "throughput ratio (target >= 7x)",
            f"{serve_res['tok_s'] / base_res['tok_s']:.2f}x",
            f"rounds {round_ratios}; {same}/{len(requests)} texts identical to the baseline",
        ),
        *(
            [
                (
                    "aggregate tok/s, openai SDK streams",
                    f"{pooled(openai_rounds)['tok_s']:.1f}",
                    f"{pooled(openai_rounds)['tok_s'] / serve_res['tok_s']:.3f}x of /generate (target within 10 %); "
                    f"{same_texts(pooled(openai_rounds)['texts'], serve_res['texts'])}/{len(requests)} texts "
                    "identical to /generate's",
                )
            ]
            if openai_rounds
            else []
        ),
        ("TTFT no prompt (client / server ms)", f"{t_none['client_ms']:.0f} / {t_none['server_ms']:.0f}", ""),
        ("TTFT 100-vector prompt (client / server ms)", f"{t_long['client_ms']:.0f} / {t_long['server_ms']:.0f}", ""),
        (
            "TTFT ratio prompt / none (target <= 1.1x)",
            f"{t_long['client_ms'] / t_none['client_ms']:.3f}x",
            f"server-side {t_long['server_ms'] / t_none['server_ms']:.3f}x",
        ),
        (
            "swap: first request on new version (ms)",
            f"{swap_res['first_ms']:.0f}",
            f"published -> pre-warmed in {swap_res['publish_to_warm_ms']:.0f} ms (poll {args.poll} s)",
        ),
        ("swap: warm request (ms)", f"{swap_res['warm_ms']:.0f}", ""),
        ("swap: extra latency (target <= +100 ms)", f"{swap_res['extra_ms']:+.0f}", ""),
        (
            "swap without waiting for the watcher: extra (ms)",
            f"{swap_cold['extra_ms']:+.0f}",
            "prefix computed on demand",
        ),
        ("model loads in the server", str(stats["model_loads"]), ""),
        (
            "server model rewrites",
            f"{stats['model']['rewrites']['attention']}",
            f"{stats['model']['rewrites']['fused_projection_groups']} fused projection groups, "
            f"{stats['model']['rewrites']['packed_weights_bytes'] / 2**20:.0f} MB packed weights (the baseline is "
            "plain transformers)",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    for label, value, note in rows:
        print(f"{label:<{width}}  {value:>12}  {note}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "baseline": {k: v for k, v in base_res.items() if k != "texts"},
                    "server": {k: v for k, v in serve_res.items() if k != "texts"},
                    "ttft_none": t_none,
                    "ttft_long": t_long,
                    "swap": swap_res,
                    "swap_no_wait": swap_cold,
                    "stats": stats,
                    "wait_policy": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
