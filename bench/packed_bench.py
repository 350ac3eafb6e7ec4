"""New requests' prefill in passes of their own, or inside the running rows' decode steps.

    .venv/bin/python bench/packed_bench.py [--clients 4 16] [--seconds 20] [--rounds 2]

Closed-loop clients submit straight to the engine (no HTTP), each request with its own query
(no input cache) under one served soft prompt (its prefix cached), `--new-tokens` each, as the
tenants bench's clients do. With short requests some row starts almost every step, so how new
rows are prefilled decides the throughput: a pass of their own that every running row waits for
(`pack_prefills=False`), or packed into the next decode step (packed.py). Both variants run on
the same engine and model (the server's rewrites), interleaved for `--rounds`; the ratio is
packed over separate requests per second (higher is better), with the mean time to first token.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.serve_bench import QUERIES  # noqa: E402
from core.modeling import load_frozen_model  # noqa: E402
from devtools.engine_requests import make_job  # noqa: E402
from server.engine import Engine  # noqa: E402
from server.engine.rewrites import prepare_for_serving  # noqa: E402


def closed_loop(engine: Engine, soft: torch.Tensor, clients: int, seconds: float, new_tokens: int) -> dict:
    """`clients` threads, each sending its next request when the last one finished."""
    stop_at = time.perf_counter() + seconds
    done, ttft_ms, lock = [0], [], threading.Lock()

    def client(index: int) -> None:
        case = 0
        while time.perf_counter() < stop_at:
            case += 1
            text = f"{QUERIES[(index + case) % len(QUERIES)]} (client {index}, case {case})"
            job, sink = make_job(engine.tokenizer, text, soft, key=("bench", 1, "c"), max_new_tokens=new_tokens)
            engine.submit(job)
            event, _ = sink.result(120)
            with lock:
                if time.perf_counter() <= stop_at:
                    done[0] += 1
                    ttft_ms.append(event.ttft_ms)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"rps": done[0] / seconds, "ttft_ms": statistics.mean(ttft_ms) if ttft_ms else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("SOFTPROMPT_MODEL", "default"))
    parser.add_argument("--clients", nargs="+", type=int, default=[4, 16])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of both variants")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    frozen = load_frozen_model(args.model)
    rows = max(args.clients)
    prepare_for_serving(frozen.model, max_batch_size=rows)
    torch.manual_seed(0)
    soft = frozen.embedding(torch.randint(0, frozen.model.config.vocab_size, (16,))).detach()
    engine = Engine(frozen, max_batch_size=rows, max_queue=4 * rows, threads=args.threads)
    engine.start()
    print(f"{args.model}, {args.threads} threads, {args.new_tokens} new tokens a request, {args.seconds:g} s a run")
    print(
        f"{'clients':>7} {'round':>5} {'separate req/s':>15} {'packed req/s':>13} {'ratio':>6}"
        "   time to first token ms, separate / packed"
    )
    try:
        for clients in args.clients:
            ratios = []
            for round_ in range(args.rounds):
                result = {}
                for pack in (False, True) if round_ % 2 == 0 else (True, False):
                    engine.pack_prefills = pack
                    result[pack] = closed_loop(engine, soft, clients, args.seconds, args.new_tokens)
                ratio = result[True]["rps"] / result[False]["rps"]
                ratios.append(ratio)
                print(
                    f"{clients:>7} {round_ + 1:>5} {result[False]['rps']:>15.2f} {result[True]['rps']:>13.2f} "
                    f"{ratio:>6.2f}   {result[False]['ttft_ms']:.0f} / {result[True]['ttft_ms']:.0f}"
                )
            print(f"{clients:>7} {'mean':>5} {'':>15} {'':>13} {statistics.mean(ratios):>6.2f}")
        print(f"packed prefills: {engine.counters['packed_prefills']} of {engine.counters['prefill_batches']}")
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
