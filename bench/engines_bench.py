"""The two engines behind the same HTTP server, against plain transformers at its best, in one run.

    .venv/bin/python bench/engines_bench.py [--engines torch llamacpp] [--rounds 2]

It publishes serve_bench's 4 prompt versions (20-100 vectors, text-token embeddings) into a
temporary store and starts one `softprompt serve` per engine (SOFTPROMPT_ENGINE) on it. Each
round, in turn: plain transformers `generate` on the same 16 requests one by one (the prompt as
its text tokens, same tokens) and as one static left-padded batch of 16, in a child process under
the OpenMP wait policy a probe found best on this host; then every engine, served to ONE client
sending the 16 requests one after another, and to 16 concurrent clients. Every request
generates exactly `--max-new-tokens` tokens, greedy. Ratios pool the rounds (total tokens over
total time), so the host's drift hits every side alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.hf_baseline import BASELINE_POLICIES, run_baseline  # noqa: E402
from bench.serve_bench import (  # noqa: E402
    PROMPT_LENGTHS,
    PROMPT_TEXTS,
    QUERIES,
    free_port,
    host_line,
    publish_text,
    start_server,
    text_ids,
    wait_ready,
)
from bench.serve_clients import pooled, same_texts, served  # noqa: E402
from core.modeling import load_frozen_model  # noqa: E402
from prompt_store import open_store  # noqa: E402

TARGETS = {"llamacpp": (3.0, 1.2)}  # issue 25: one client vs HF one by one; 16 clients vs one static batch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--engines", nargs="+", default=["torch", "llamacpp"], choices=["torch", "llamacpp"])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="threads for every side (default: each one's own)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    frozen = load_frozen_model(args.model, device="cpu")
    workdir = Path(tempfile.mkdtemp(prefix="engines-bench-"))
    store = open_store(workdir / "store")
    prompt_ids = {name: text_ids(frozen, text, PROMPT_LENGTHS[name]) for name, text in PROMPT_TEXTS.items()}
    for name, ids in prompt_ids.items():
        publish_text(store, frozen, name, ids)
    names = list(PROMPT_TEXTS)
    requests = [(QUERIES[i % len(QUERIES)], names[i % 4], prompt_ids[names[i % 4]]) for i in range(args.clients)]
    del frozen

    servers, bases = {}, {}
    try:
        for engine in args.engines:
            port = free_port()
            env = {
                **os.environ,
                "SOFTPROMPT_STORE": str(workdir / "store"),
                "SOFTPROMPT_MODEL": args.model,
                "SOFTPROMPT_DEVICE": "cpu",
                "SOFTPROMPT_ENGINE": engine,
                "SOFTPROMPT_MAX_BATCH_SIZE": str(max(16, args.clients)),
            }
            env.pop("SOFTPROMPT_API_KEY", None)
            if args.threads:
                env["SOFTPROMPT_THREADS"] = str(args.threads)
            servers[engine], bases[engine] = start_server(env, port), f"http://127.0.0.1:{port}"
        for engine in args.engines:
            wait_ready(servers[engine], bases[engine])
        print(host_line())
        print(
            f"model {args.model}; {args.clients} requests x {args.max_new_tokens} new tokens (exactly), greedy, over "
            f"4 prompt versions; engines {', '.join(args.engines)}; threads {args.threads or 'default'}",
            flush=True,
        )
        probe = {
            policy: run_baseline(args.model, policy, requests[:4], args.max_new_tokens, True, static=False,
                                 threads=args.threads)["one_by_one"]["tok_s"]
            for policy in BASELINE_POLICIES
        }  # fmt: skip
        best = max(probe, key=probe.get)
        print("HF wait policies, 4 requests one by one (tok/s): " + ", ".join(f"{p} {t:.1f}" for p, t in probe.items()))
        hf, static = [], []
        one = {engine: [] for engine in args.engines}
        many = {engine: [] for engine in args.engines}
        for round_no in range(1, args.rounds + 1):
            measured = run_baseline(
                args.model, best, requests, args.max_new_tokens, True, static=True, threads=args.threads
            )
            hf.append(measured["one_by_one"])
            static.append(measured["static"])
            line = (
                f"round {round_no}: HF one by one {hf[-1]['tok_s']:.1f} tok/s, static batch {static[-1]['tok_s']:.1f}"
            )
            order = args.engines if round_no % 2 else args.engines[::-1]  # alternate which engine goes first
            for engine in order:
                base = bases[engine]
                one[engine].append(asyncio.run(served(base, requests, args.max_new_tokens, True, one_client=True)))
                many[engine].append(asyncio.run(served(base, requests, args.max_new_tokens, True)))
                single, burst = one[engine][-1]["tok_s"], many[engine][-1]["tok_s"]
                line += f"; {engine}: 1 client {single:.1f}, {args.clients} clients {burst:.1f}"
            print(line, flush=True)
    finally:
        for server in servers.values():
            server.terminate()
        for server in servers.values():
            server.wait(30)

    hf_res, static_res = pooled(hf), pooled(static)
    results = {"hf_one_by_one": hf_res, "hf_static": static_res, "policy": best, "engines": {}}
    print(f"\n{'':<34}{'tok/s':>8}  ratio")
    print(f"{'HF generate one by one (' + best + ')':<34}{hf_res['tok_s']:>8.1f}")
    print(f"{'HF one static batch of ' + str(args.clients):<34}{static_res['tok_s']:>8.1f}")
    for engine in args.engines:
        o, m = pooled(one[engine]), pooled(many[engine])
        single_target, batch_target = TARGETS.get(engine, (None, None))
        r1, r16 = o["tok_s"] / hf_res["tok_s"], m["tok_s"] / static_res["tok_s"]
        t1 = f" (target >= {single_target}x)" if single_target else ""
        t16 = f" (target >= {batch_target}x)" if batch_target else ""
        print(
            f"{engine + ' engine, 1 client':<34}{o['tok_s']:>8.1f}  {r1:.2f}x HF one by one{t1}; "
            f"{same_texts(o['texts'], hf_res['texts'])}/{len(requests)} texts identical to HF's"
        )
        print(
            f"{engine + f' engine, {args.clients} clients':<34}{m['tok_s']:>8.1f}  {r16:.2f}x the static batch{t16}, "
            f"{m['tok_s'] / hf_res['tok_s']:.2f}x HF one by one; max batch {m['max_batch']}"
        )
        results["engines"][engine] = {"one_client": o, "clients": m, "one_vs_hf": r1, "clients_vs_static": r16}
    if args.json:
        for part in [hf_res, static_res] + [v for e in results["engines"].values() for v in e.values()]:
            if isinstance(part, dict):
                part.pop("texts", None)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
