"""Two server processes on one store: how soon does B serve what was published through A?

    .venv/bin/python bench/replica_bench.py [--rounds 20] [--model default]

Starts a throwaway PostgreSQL server (the machine's binaries, tests/postgres_cluster.py) and
two `softprompt serve` processes on the default model. Each round uploads a new version of
`bench` through A (`POST /prompts`), then measures on B, from the moment the version was
committed (the row's timestamp; for a folder, the version folder's time), one of (in separate
rounds, `--rounds` of each):
- first-generate: when B answered the first `POST /generate?prompt=bench` that used the new
  version (B resolves each request against the store, so this is the first request sent); the
  same request sent again right after, with the version warm, is timed beside it (warm-generate:
  what any request costs, so first minus warm is what being new costs). It is also timed from
  A's answer to the upload: A answers once the version is committed and warm on A;
- pre-warmed: when B's store watcher had the version loaded and its prefix computed (B's
  `/stats` `warmed_at`), which PostgreSQL's NOTIFY triggers as the publish commits.
The same two measurements run side by side on a folder store shared by the two processes (one
machine only; its watcher polls every `SOFTPROMPT_STORE_POLL_SECONDS`, 1 s by default).
Medians and the ratio are printed; `--out` writes them as JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import torch
from safetensors.torch import save

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from devtools.local_servers import start_database, start_server, stop_at_exit  # noqa: E402
from devtools.postgres import free_port  # noqa: E402


def safetensors_bytes(hidden: int, seed: int) -> bytes:
    torch.manual_seed(seed)
    return save({"prompt_embeddings": torch.randn(8, hidden) * 0.02})


def published_at(store: str, version: str) -> float:
    """When the version was committed (Unix time): the row's timestamp in the database, or the
    version folder's modification time (its files are complete and it is renamed into place)."""
    name, _, number = version.rpartition("-v")
    if store.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(store) as conn:
            return conn.execute(
                "SELECT extract(epoch FROM created_at)::float8 FROM prompt_versions WHERE name = %s AND version = %s",
                (name, int(number)),
            ).fetchone()[0]
    return (Path(store) / "prompts" / name / f"v{number}").stat().st_mtime


def measure(store: str, a: str, b: str, rounds: int, hidden: int, seed0: int) -> dict:
    """`rounds` publishes timed to B's first generate, then `rounds` timed to B's pre-warm (apart:
    a request on B loads the version itself, and the watcher then has nothing left to warm)."""
    first_generate, after_answer, warm_generate, prewarmed = [], [], [], []
    generate = {"params": {"prompt": "bench"}, "json": {"input": "Hi", "max_new_tokens": 1}}
    with httpx.Client(timeout=60) as client:
        for i in range(2 * rounds):
            files = {
                "file": ("p.safetensors", io.BytesIO(safetensors_bytes(hidden, seed0 + i)), "application/octet-stream")
            }
            uploaded = client.post(f"{a}/prompts", data={"name": "bench"}, files=files)
            uploaded.raise_for_status()
            answered = time.time()  # A has published it (and made it warm on A)
            version = uploaded.json()["id"]
            committed = published_at(store, version)
            if i < rounds:
                while True:  # the first request B answers with the new version
                    answer = client.post(f"{b}/generate", **generate)
                    answer.raise_for_status()
                    if answer.json()["prompt"] == version:
                        first_generate.append(time.time() - committed)
                        after_answer.append(time.time() - answered)
                        break
                started = time.time()  # the same request once B has the version warm: what it costs anyway
                client.post(f"{b}/generate", **generate).raise_for_status()
                warm_generate.append(time.time() - started)
            else:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    warmed_at = client.get(f"{b}/stats").json()["watcher"]["warmed_at"]
                    if version in warmed_at:
                        prewarmed.append(warmed_at[version] - committed)
                        break
                    time.sleep(0.005)
                else:
                    raise SystemExit(f"B never pre-warmed {version}")
            time.sleep(0.3)  # let B settle before the next publish
    return {
        name: [round(1000 * s, 1) for s in values]
        for name, values in (
            ("first_generate_ms", first_generate),
            ("first_generate_after_publish_answer_ms", after_answer),
            ("warm_generate_ms", warm_generate),
            ("prewarmed_ms", prewarmed),
        )
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--model", default="default")
    parser.add_argument("--poll-seconds", type=float, default=1.0, help="both stores' fallback/poll interval")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    results = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        _, url = start_database(stack)
        stores = {"postgresql": url, "folder": str(Path(tmp) / "store")}
        for backend, store in stores.items():
            servers = []
            for name in ("a", "b"):
                port = free_port()
                process = stop_at_exit(
                    stack,
                    start_server(
                        store, Path(tmp) / backend / name, port, model=args.model, poll_seconds=args.poll_seconds
                    ),
                )
                servers.append((process, f"http://127.0.0.1:{port}"))
            (_, a), (_, b) = servers
            hidden = httpx.get(f"{a}/stats").json()["model"]["hidden_size"]
            results[backend] = measure(store, a, b, args.rounds, hidden, seed0=100 * len(results))
            for process, _ in servers:
                process.terminate()
                process.wait(30)

    labels = {
        "first_generate_ms": "B's first generate with it, from the commit",
        "first_generate_after_publish_answer_ms": "B's first generate with it, from A's 201",
        "warm_generate_ms": "the same generate on B once warm (its cost)",
        "prewarmed_ms": "pre-warmed on B, from the commit",
    }
    lines = [
        f"publish through server A (POST /prompts) -> server B, {args.rounds} publishes each, median (min-max) ms:"
    ]
    for backend, res in results.items():
        for key, label in labels.items():
            values = res[key]
            res[key.replace("_ms", "_median_ms")] = statistics.median(values)
            lines.append(
                f"  {backend:<10} {label:<46} {statistics.median(values):7.1f}  ({min(values):.1f}-{max(values):.1f})"
            )
    ratio = results["folder"]["prewarmed_median_ms"] / results["postgresql"]["prewarmed_median_ms"]
    lines.append(
        f"  pre-warmed on B: PostgreSQL NOTIFY is {ratio:.1f}x sooner than the folder store's {args.poll_seconds:g} "
        "s poll"
    )
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps({"rounds": args.rounds, "poll_seconds": args.poll_seconds, **results}, indent=2))
        args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
