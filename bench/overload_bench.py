"""Overload: many more clients than the server has batch and queue places.

    .venv/bin/python bench/overload_bench.py                    # 160 clients, 30 s, embedded model
    .venv/bin/python bench/overload_bench.py --clients 40 --seconds 10

Starts `softprompt serve` on a temporary store, then runs `--clients` concurrent clients for
`--seconds`; each sends `/generate` requests back to back (a short greedy completion), and on
503 waits about `--retry-ms` (jittered 0.5-1.5x) before trying again (0: at once, the hostile case). Reports
the status histogram, p50/p99 latency of the 200s and of the 503s, and the server's RSS
before and after (and its peak, from /proc). Targets (issue 12): a 503 answers in under 50 ms,
and RSS ends within 20 % of where it started.

The clients run in `--client-procs` processes of their own, each an asyncio loop over bare
keep-alive HTTP/1.1 connections (see Connection: the load generator shares the CPUs with the
server and must cost far less per request than the server does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from bench.serve_bench import QUERIES, free_port, host_line, start_server, wait_ready  # noqa: E402


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Connection:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol to post a JSON body.

    The load generator shares the 2 CPUs with the server, so it must cost far less per request
    than the server does, or the latencies it reports are its own: httpx spends about a
    millisecond of Python per request, this a few tens of microseconds."""

    def __init__(self, host: str, port: int, path: str, body: bytes, key: str | None = None):
        self.host, self.port, self.path, self.key = host, port, path, key
        self.request = self.request_for(body)
        self.reader = self.writer = None

    def request_for(self, body: bytes) -> bytes:
        """The bytes of a POST of `body` on this connection."""
        auth = f"Authorization: Bearer {self.key}\r\n" if self.key else ""
        return (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"{auth}Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    async def post(self) -> str:
        """Send the request, read the whole answer; return its status code."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(self.request)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionResetError("the server closed the connection")
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status_line.split()[1].decode()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _clients(port: int, clients: int, seconds: float, max_new_tokens: int, retry_ms: float, offset: int) -> list:
    """Run `clients` loops until the deadline; return (status or error name, seconds, at) per request."""
    results: list[tuple[str, float, float]] = []
    begin = time.monotonic()
    deadline = begin + seconds

    async def loop(i: int):
        jitter = random.Random(offset + i)
        body = json.dumps({"input": QUERIES[(offset + i) % len(QUERIES)], "max_new_tokens": max_new_tokens}).encode()
        connection = Connection("127.0.0.1", port, "/generate", body)
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                outcome = await asyncio.wait_for(connection.post(), timeout=120)
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                outcome = type(exc).__name__
                connection.close()
            results.append((outcome, time.perf_counter() - started, time.monotonic() - begin))
            if outcome == "503" and retry_ms:  # with jitter, as clients back off, not in lockstep
                await asyncio.sleep(jitter.uniform(0.5, 1.5) * retry_ms / 1e3)
        connection.close()

    await asyncio.gather(*(loop(i) for i in range(clients)))
    return results


def _client_proc(args: tuple) -> list:
    return asyncio.run(_clients(*args))


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model spec (default: embedded SmolLM2-135M)")
    parser.add_argument("--clients", type=int, default=160)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--retry-ms", type=float, default=0.0, help="pause after a 503 before the next try (0: none)")
    parser.add_argument("--client-procs", type=int, default=2, help="client processes the clients are split over")
    parser.add_argument("--max-queue", type=int, default=64, help="the server's SOFTPROMPT_MAX_QUEUE")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="overload-bench-"))
    port = free_port()
    env = {
        **os.environ,
        "SOFTPROMPT_STORE": str(workdir / "store"),
        "SOFTPROMPT_MODEL": args.model,
        "SOFTPROMPT_DEVICE": "cpu",
        "SOFTPROMPT_MAX_QUEUE": str(args.max_queue),
    }
    server = start_server(env, port)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(server, base)
        for _ in range(3):  # warm-up: first requests allocate what every later one reuses
            httpx.post(
                f"{base}/generate", json={"input": QUERIES[0], "max_new_tokens": args.max_new_tokens}, timeout=60
            )
        rss_before = rss_mb(server.pid)
        print(host_line())
        print(
            f"model {args.model}; {args.clients} clients in {args.client_procs} processes for {args.seconds:.0f} s, "
            f"{args.max_new_tokens} new tokens each, retry after 503: {args.retry_ms:.0f} ms; server queue "
            f"{args.max_queue}; RSS before {rss_before:.0f} MB",
            flush=True,
        )
        shares = [
            args.clients // args.client_procs + (i < args.clients % args.client_procs) for i in range(args.client_procs)
        ]
        offsets = [sum(shares[:i]) for i in range(len(shares))]
        jobs = [(port, n, args.seconds, args.max_new_tokens, args.retry_ms, off) for n, off in zip(shares, offsets)]
        with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
            results = [r for part in pool.map(_client_proc, jobs) for r in part]
        time.sleep(1.0)
        rss_after, rss_peak = rss_mb(server.pid), rss_mb(server.pid, "VmHWM")
        stats = httpx.get(f"{base}/stats").json()
    finally:
        server.terminate()
        server.wait(30)

    histogram = Counter(r[0] for r in results)
    print("status histogram: " + ", ".join(f"{k}: {v}" for k, v in sorted(histogram.items())))
    rows = []
    for status in ("200", "503"):
        times = sorted(r[1] * 1e3 for r in results if r[0] == status)
        rows.append(
            (
                f"{status}s: p50 / p99 ms",
                f"{_percentile(times, 50):.1f} / {_percentile(times, 99):.1f}",
                f"n={len(times)}" + ("  (target p50 and p99 < 50 ms)" if status == "503" else ""),
            )
        )
    # every client starts at the same instant: the first second is one burst of `clients` requests
    steady = sorted(r[1] * 1e3 for r in results if r[0] == "503" and r[2] - r[1] >= 1.0)
    rows.append(
        (
            "503s sent after the first second: p50 / p99 ms",
            f"{_percentile(steady, 50):.1f} / {_percentile(steady, 99):.1f}",
            f"n={len(steady)}",
        )
    )
    growth = rss_after / rss_before - 1
    rows.append(
        (
            "server RSS before / after / peak MB",
            f"{rss_before:.0f} / {rss_after:.0f} / {rss_peak:.0f}",
            f"{growth:+.1%} (target within 20 %)",
        )
    )
    rows.append(
        ("5xx other than 503", str(sum(v for k, v in histogram.items() if k.startswith("5") and k != "503")), "")
    )
    rows.append(
        (
            "engine: finished / failed, largest batch",
            f"{stats['engine']['requests_finished']} / {stats['engine']['requests_failed']}, "
            f"{stats['engine']['max_batch_size_seen']}",
            "",
        )
    )
    slow = sorted((r for r in results if r[0] == "503"), key=lambda r: -r[1])[:10]
    print("slowest 503s (ms, at s): " + ", ".join(f"{r[1] * 1e3:.0f}@{r[2]:.1f}" for r in slow))
    width = max(len(r[0]) for r in rows)
    for label, value, note in rows:
        print(f"{label:<{width}}  {value:>20}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
