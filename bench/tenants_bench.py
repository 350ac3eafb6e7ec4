"""Two tenants, one flooding: does the polite one still get served, and does the flood hurt itself?

    .venv/bin/python bench/tenants_bench.py                    # the default model, ~4 minutes

Starts `softprompt serve` with two client keys (`polite`, `flood`) twice, side by side in one
run: without the tenancy rules (SOFTPROMPT_SCHEDULING=fifo, no refusal delay, no limits: one
shared first-come queue, refusals answered at once) and with them (the defaults: keys served in
turn, a fair share of the queue per key, slow refusals for a key refused over 20 times a second,
and a per-key concurrency limit). On each it measures, `--seconds` each, short greedy requests
(8 new tokens):

1. `polite` alone: 4 clients that back off 0.5 s after a refusal;
2. the same 4 beside 120 keep-alive `flood` connections that retry at once;
3. one key: 160 clients that retry at once; 4. the same 160 backing off 0.5 s.

It prints completed requests (goodput) per group, the ratios the issue asks for (polite under
flood / polite alone; flood retrying at once / flood backing off), every status seen, and the
server's RSS. Clients speak bare HTTP (bench/overload_bench.py's Connection); each group runs in
client processes of its own (a group of more than 8 clients in two), so the polite clients never
wait behind flood connections in one event loop. Answers after the window count apart, as late.
The server runs its defaults, the input cache included: each client repeats its one question,
as a client retrying a refused request does; `--distinct` makes every request a new question.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from bench.overload_bench import Connection, rss_mb  # noqa: E402
from bench.serve_bench import QUERIES, free_port, host_line, start_server, wait_ready  # noqa: E402

KEYS = {"polite": "bench-polite-key", "flood": "bench-flood-key"}
WITHOUT = {"SOFTPROMPT_SCHEDULING": "fifo", "SOFTPROMPT_REFUSAL_DELAY_MS": "0"}
WITH = {"SOFTPROMPT_KEY_LIMITS": json.dumps({"default": {"concurrent": 48}})}


async def _group(
    port: int, key: str, clients: int, seconds: float, backoff_s: float, offset: int, distinct: bool = False
) -> Counter:
    """`clients` loops of one key until the deadline; outcome -> count. An answer that arrives after
    the deadline counts as "<status> late" (a flood has many requests queued at the end). With
    `distinct`, every request asks something no request asked before (no input is repeated)."""
    outcomes: Counter = Counter()
    deadline = time.monotonic() + seconds

    async def loop(i: int):
        jitter = random.Random(offset + i)
        query = QUERIES[(offset + i) % len(QUERIES)]
        connection = Connection("127.0.0.1", port, "/generate", _body(query), key=KEYS[key])
        sent = 0
        while time.monotonic() < deadline:
            if distinct:
                sent += 1
                connection.request = connection.request_for(_body(f"{query} (request {offset + i}.{sent})"))
            try:
                outcome = await asyncio.wait_for(connection.post(), timeout=120)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                outcome = type(exc).__name__
                connection.close()
            outcomes[outcome if time.monotonic() <= deadline else f"{outcome} late"] += 1
            if outcome in ("429", "503") and backoff_s:
                await asyncio.sleep(jitter.uniform(0.5, 1.5) * backoff_s)
        connection.close()

    await asyncio.gather(*(loop(i) for i in range(clients)))
    return outcomes


def _body(query: str) -> bytes:
    return json.dumps({"input": query, "max_new_tokens": 8}).encode()


def _client_process(port: int, part: tuple, seconds: float, distinct: bool, start, results, index: int) -> None:
    """One client process: one part of one group, started when every client process is ready."""
    key, clients, backoff, offset = part
    start.wait()  # this module (httpx, torch through bench.serve_bench) is imported in every process
    before = _cpu_seconds("self")
    outcomes = asyncio.run(_group(port, key, clients, seconds, backoff, offset, distinct))
    results.put((index, outcomes, _cpu_seconds("self") - before))


def _cpu_seconds(pid: int | str) -> float:
    """CPU time (user + system) a process has used, seconds (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scenario(port: int, groups: list[tuple[str, int, float]], seconds: float, distinct: bool = False) -> list[Counter]:
    """Each (key, clients, backoff seconds) group in client processes of its own (a large group in
    two), so one tenant's clients never wait on another tenant's in the same event loop; all start
    together once every process has loaded, so no group runs beside another's imports. Outcomes
    per group."""
    parts, owner = [], []
    for g, (key, n, backoff) in enumerate(groups):
        split = 2 if n > 8 else 1
        for half in range(split):
            parts.append((key, n // split + (n % split if half == 0 else 0), backoff, 1000 * g + half * 500))
            owner.append(g)
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(len(parts)), context.Queue()
    processes = [
        context.Process(target=_client_process, args=(port, part, seconds, distinct, start, results, i))
        for i, part in enumerate(parts)
    ]
    for process in processes:
        process.start()
    outcomes, cpu = {}, 0.0
    for _ in processes:
        index, counts, seconds_used = results.get(timeout=seconds + 600)
        outcomes[index] = counts
        cpu += seconds_used
    for process in processes:
        process.join()
    CLIENT_CPU.append(cpu)
    return [sum((outcomes[i] for i, o in enumerate(owner) if o == g), Counter()) for g in range(len(groups))]


CLIENT_CPU: list[float] = []  # the client processes' CPU seconds, one entry per scenario run


def measure(model: str, settings: dict, seconds: float, distinct: bool = False) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="tenants-bench-"))
    port = free_port()
    env = {
        **os.environ,
        "SOFTPROMPT_STORE": str(workdir / "store"),
        "SOFTPROMPT_MODEL": model,
        "SOFTPROMPT_DEVICE": "cpu",
        "SOFTPROMPT_CLIENT_KEYS": ",".join(f"{k}={v}" for k, v in KEYS.items()),
        **settings,
    }
    server = start_server(env, port, input_cache=True)  # the server as deployed, its defaults
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(server, base)
        for _ in range(3):
            httpx.post(
                f"{base}/generate",
                json={"input": QUERIES[0], "max_new_tokens": 8},
                timeout=60,
                headers={"Authorization": f"Bearer {KEYS['polite']}"},
            )
        rss_before = rss_mb(server.pid)
        cpu = {}

        def run(name: str, groups: list) -> list[Counter]:
            """One scenario, and what it cost: server and client CPU seconds, the engine's passes."""
            stats, server_cpu = _engine_counters(base), _cpu_seconds(server.pid)
            out = scenario(port, groups, seconds, distinct)
            after = _engine_counters(base)
            cpu[name] = {
                "server_cpu_s": _cpu_seconds(server.pid) - server_cpu,
                "client_cpu_s": CLIENT_CPU[-1],
                **{k: after[k] - stats[k] for k in ("decode_steps", "prefill_batches", "packed_prefills")},
            }
            return out

        alone = run("alone", [("polite", 4, 0.5)])[0]
        polite, flood = run("polite", [("polite", 4, 0.5), ("flood", 120, 0.0)])
        at_once = run("at_once", [("flood", 160, 0.0)])[0]
        backing_off = run("backing_off", [("flood", 160, 0.5)])[0]
        time.sleep(1)
        rss_after = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    return {
        "alone": alone,
        "polite": polite,
        "flood": flood,
        "at_once": at_once,
        "backing_off": backing_off,
        "rss": (rss_before, rss_after),
        "cost": cpu,
    }


def _engine_counters(base: str) -> dict:
    engine = httpx.get(f"{base}/stats", timeout=30).json()["engine"]
    return {k: engine.get(k, 0) for k in ("decode_steps", "prefill_batches", "packed_prefills")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--limits", default=WITH["SOFTPROMPT_KEY_LIMITS"], help="SOFTPROMPT_KEY_LIMITS with the rules")
    parser.add_argument(
        "--distinct",
        action="store_true",
        help="every request asks something new (by default each client repeats its one question, as a "
        "client retrying a refused request does, and repeated inputs skip their prefill)",
    )
    args = parser.parse_args()
    with_rules = {**WITH, "SOFTPROMPT_KEY_LIMITS": args.limits}
    print(host_line(), flush=True)
    results = {
        name: measure(args.model, settings, args.seconds, args.distinct)
        for name, settings in (("without the rules", WITHOUT), ("with the rules", with_rules))
    }
    rows = []
    for name, r in results.items():
        served = {k: r[k]["200"] for k in ("alone", "polite", "flood", "at_once", "backing_off")}
        errors = sum(
            n
            for c in (r[k] for k in served)
            for status, n in c.items()
            if status.startswith("5") and status.split()[0] != "503"
        )
        rows += [
            f"{name}:",
            f"  polite alone {served['alone']} completed; beside the flood {served['polite']} "
            f"({served['polite'] / max(1, served['alone']):.2f}x, target >= 0.8x); "
            f"the flood completed {served['flood']}",
            f"  one key, 160 clients: retrying at once {served['at_once']}, backing off {served['backing_off']} "
            f"({served['at_once'] / max(1, served['backing_off']):.2f}x, target >= 0.8x)",
            "  statuses: " + "; ".join(f"{k} {dict(sorted(r[k].items()))}" for k in served),
            "  cost (CPU seconds, the host has cores x seconds of them; the engine's passes): "
            + "; ".join(
                f"{k} server {c['server_cpu_s']:.1f} s, clients {c['client_cpu_s']:.1f} s, {c['decode_steps']} steps, "
                f"{c['prefill_batches']} prefill passes ({c['packed_prefills']} packed)"
                for k, c in r["cost"].items()
            ),
            f"  5xx other than 503: {errors}; server RSS {r['rss'][0]:.0f} -> {r['rss'][1]:.0f} MB "
            f"({r['rss'][1] / r['rss'][0] - 1:+.1%}, target within 20 %)",
        ]
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
