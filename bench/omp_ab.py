"""Paired A/B of how torch's OpenMP threads wait between parallel regions: asleep at once
(`GOMP_SPINCOUNT=0`) or spinning for a while first (`GOMP_SPINCOUNT=300000`, GNU libgomp's
own default of about 3 ms). Each step starts after a pause, so this measures steps taken one
at a time; bench/latency_bench.py measures continuous batch-1 decoding, which chose the
server's default (30,000, prompt_store/openmp.py).

    .venv/bin/python bench/omp_ab.py [--rows 16] [--steps 40]   # one decode step
    .venv/bin/python bench/omp_ab.py --busy                      # beside a busy neighbour
    .venv/bin/python bench/omp_ab.py --http 6                     # 16-request bursts over HTTP

The policy is read once, when torch loads, so each variant runs in its own process: the
same engine with the same prefilled rows as bench/decode_ab.py. The processes take decode
steps in turn (A B, B A, ...) so the VM's drift hits all of them alike, with a 20 ms pause
before each step so the previous process's spinning threads are asleep again. It prints each
variant's median step time and the median of its per-step speed ratios against sleeping.

`--busy` adds a busy neighbour: one thread of back-to-back matmuls, as a training worker
started by `/train` runs. It adds a third variant, sleeping on 1 thread: what the engine
switches to while a job holds a core (`Engine(reserved_threads=)`). `--rows 1` measures a
batch-1 step. `--http N` instead starts `softprompt serve` once per policy on one store and
sends each N bursts of bench/serve_bench.py's 16 requests (64 tokens), alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name: (GOMP_SPINCOUNT, torch threads)
    "sleep, 2 threads": ("0", 2),
    "spin, 2 threads": ("300000", 2),
}
BUSY_VARIANT = {"sleep, 1 thread": ("0", 1)}


def child(rows: int, threads: int, max_new_tokens: int) -> None:
    """Hold an engine with `rows` rows; on each 'step' line take one decode step, answer its ms."""
    sys.path.insert(0, str(ROOT))
    import torch

    from bench.decode_ab import fill_rows
    from core.modeling import load_frozen_model
    from server.engine import Engine
    from server.engine.rewrites import prepare_for_serving

    torch.set_num_threads(threads)
    frozen = load_frozen_model(os.environ.get("SOFTPROMPT_MODEL", "default"), device="cpu")
    prepare_for_serving(frozen.model, max_batch_size=rows)  # as the server serves it
    engine = Engine(frozen, max_batch_size=rows)
    with torch.inference_mode():
        fill_rows(engine, rows, max_new_tokens=max_new_tokens)
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() != "step":
                break
            started = time.perf_counter()
            engine._decode_step()
            print(json.dumps((time.perf_counter() - started) * 1e3), flush=True)


def busy_neighbour() -> None:
    """One thread of back-to-back matmuls until killed (a stand-in for a training worker)."""
    import torch

    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    while True:
        a = (a @ a).clamp_(-1, 1)


def http_bursts(bursts: int) -> dict[str, list[float]]:
    """Seconds per 16-request burst of one server per policy (2 threads each), alternating."""
    sys.path.insert(0, str(ROOT))
    import asyncio
    import tempfile

    from bench.serve_bench import PROMPT_LENGTHS, PROMPT_TEXTS, QUERIES, free_port, publish_text, text_ids
    from bench.serve_clients import served
    from core.modeling import load_frozen_model
    from prompt_store import open_store

    frozen = load_frozen_model(os.environ.get("SOFTPROMPT_MODEL", "default"), device="cpu")
    store_root = Path(tempfile.mkdtemp(prefix="omp-ab-")) / "store"
    store, names = open_store(store_root), list(PROMPT_TEXTS)
    ids = {name: text_ids(frozen, text, PROMPT_LENGTHS[name]) for name, text in PROMPT_TEXTS.items()}
    for name in names:
        publish_text(store, frozen, name, ids[name])
    del frozen
    requests = [(QUERIES[i], names[i % 4], ids[names[i % 4]]) for i in range(16)]
    servers = {}
    try:
        for name, (spin, threads) in VARIANTS.items():
            port = free_port()
            env = {
                **os.environ,
                "OMP_WAIT_POLICY": "PASSIVE",
                "GOMP_SPINCOUNT": spin,
                "SOFTPROMPT_THREADS": str(threads),
                "SOFTPROMPT_STORE": str(store_root),
                "SOFTPROMPT_DEVICE": "cpu",
            }
            servers[name] = (
                subprocess.Popen(
                    [sys.executable, "-m", "server", "serve", "--port", str(port), "--log-level", "warning"],
                    env=env,
                    cwd=ROOT,
                ),
                f"http://127.0.0.1:{port}",
            )
            deadline = time.time() + 300
            while not _ready(servers[name][1]):
                if time.time() > deadline:
                    raise SystemExit(f"server for {name!r} did not become ready")
                time.sleep(0.3)
        times: dict[str, list[float]] = {name: [] for name in servers}
        order = list(servers)
        for burst in range(bursts):
            for name in order if burst % 2 == 0 else order[::-1]:
                time.sleep(0.5)
                times[name].append(asyncio.run(served(servers[name][1], requests, 64, True))["wall_s"])
        return times
    finally:
        for proc, _ in servers.values():
            proc.kill()
            proc.wait()


def _ready(base: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{base}/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def report(times: dict[str, list[float]], unit: str) -> None:
    names = list(times)
    base = names[0]
    for name in names:
        paired = statistics.median(b / t for b, t in zip(times[base], times[name]))
        print(f"{name:18s} {statistics.median(times[name]):8.2f} {unit}   speed vs {base!r}: {paired:.3f}x")


def spawn(args: list[str], spin: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": spin}
    return subprocess.Popen(
        [sys.executable, __file__, *args], env=env, cwd=ROOT, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16, help="rows in the decode batch")
    parser.add_argument("--steps", type=int, default=40, help="decode steps per variant (alternating)")
    parser.add_argument("--busy", action="store_true", help="run beside a 1-thread busy neighbour")
    parser.add_argument("--http", type=int, default=0, metavar="N", help="N bursts per policy through the HTTP server")
    parser.add_argument("--child", nargs=2, type=int, metavar=("ROWS", "THREADS"), help=argparse.SUPPRESS)
    parser.add_argument("--neighbour", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, max_new_tokens=args.steps + 30)
        return 0
    if args.neighbour:
        busy_neighbour()
        return 0

    if args.http:
        times = http_bursts(args.http)
        print(f"{args.http} bursts per policy of 16 concurrent requests x 64 tokens over HTTP, alternating")
        report(times, "s/burst")
        return 0

    variants = {**VARIANTS, **(BUSY_VARIANT if args.busy else {})}
    procs = {}
    for name, (spin, threads) in variants.items():  # one at a time: loading is the heavy part
        procs[name] = spawn(["--child", str(args.rows), str(threads), "--steps", str(args.steps)], spin)
        if procs[name].stdout.readline().strip() != "ready":
            raise SystemExit(f"variant {name!r} failed to start")
    neighbour = spawn(["--neighbour"], "0") if args.busy else None
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        time.sleep(1.0 if neighbour else 0.0)
        names = list(variants)
        for step in range(args.steps):
            order = names if step % 2 == 0 else names[::-1]
            for name in order:
                time.sleep(0.02)
                procs[name].stdin.write("step\n")
                procs[name].stdin.flush()
                times[name].append(json.loads(procs[name].stdout.readline()))
    finally:
        for proc in [*procs.values(), neighbour]:
            if proc is not None:
                proc.kill()
                proc.wait()

    print(
        f"{args.rows} rows, {args.steps} decode steps per variant, alternating; "
        f"busy neighbour: {'1 thread of matmuls' if args.busy else 'none'}"
    )
    report(times, "ms/step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
