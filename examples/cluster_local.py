"""The distributed deployment on one machine: PostgreSQL, two serving replicas, one worker.

    .venv/bin/python examples/cluster_local.py [--model default] [--steps 6]

Starts a throwaway PostgreSQL server (the machine's binaries), two `softprompt serve`
replicas with their embedded worker off (SOFTPROMPT_WORKER_JOBS=none: they only serve) and
one `softprompt worker`, all on the same model and database URL. Then it trains a sentiment
prompt end to end: the job is submitted to replica A, followed on replica B (Server-Sent
Events), run by the worker, published into the shared store, and served by replica B
afterwards. Everything is stopped and removed at the end. Prints what happened and when.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from devtools.local_servers import start_database, start_server, start_worker, stop_at_exit  # noqa: E402
from devtools.postgres import free_port  # noqa: E402

DATA = REPO / "examples" / "data" / "sentiment.train.jsonl"
INIT = "Classify the sentiment of this review as positive or negative."


def follow(client: httpx.Client, url: str, started: float) -> dict:
    """Print the job's progress events as they arrive; return its final record."""
    last, name = None, None
    with client.stream("GET", url, timeout=None) as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                last = json.loads(line.split(":", 1)[1])
                loss = f"{last['loss']:.3f}" if last["loss"] is not None else "-"
                print(
                    f"  [{time.monotonic() - started:6.1f} s] {name:8s} {last['state']:9s} step "
                    f"{last['step']}/{last['total']}"
                    f"  loss {loss}  worker {last.get('worker') or '-'}"
                )
                if name == "end":
                    break
    return last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="default", help="model spec for the replicas and the worker (default: SmolLM2)"
    )
    parser.add_argument("--steps", type=int, default=6, help="training steps (a few: this shows the plumbing)")
    parser.add_argument("--examples", type=int, default=64, help="training examples sent")
    args = parser.parse_args(argv)
    rows = DATA.read_text().split("\n")[: args.examples]  # line feeds only: reviews hold U+2028
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        cluster, url = start_database(stack)
        print(f"PostgreSQL on 127.0.0.1:{cluster.port}: store and job queue {url}")
        bases = {}
        for name in ("a", "b"):
            port = free_port()
            stop_at_exit(
                stack,
                start_server(url, Path(tmp) / name, port, model=args.model, env={"SOFTPROMPT_WORKER_JOBS": "none"}),
            )
            bases[name] = f"http://127.0.0.1:{port}"
            print(f"replica {name} serving on {bases[name]} (embedded worker off)")
        worker = stop_at_exit(stack, start_worker(url, Path(tmp) / "worker", model=args.model, threads=1), timeout=60)
        print(f"worker pid {worker.pid} waiting for jobs (log {Path(tmp) / 'worker' / 'worker.log'})")

        with httpx.Client(timeout=120) as client:
            started = time.monotonic()
            body = {
                "name": "sentiment",
                "init": INIT,
                "steps": args.steps,
                "examples": [json.loads(r) for r in rows],
                "config": {"batch_size": 4, "eval_every": args.steps, "max_eval_examples": 16},
            }
            answer = client.post(f"{bases['a']}/train", json=body)
            answer.raise_for_status()
            job_id = answer.json()["id"]
            print(
                f"\nPOST {bases['a']}/train -> {answer.status_code}, job {job_id} ({len(rows)} examples, "
                f"{args.steps} steps)"
            )
            print(f"following it on replica b: GET {bases['b']}/train/{job_id}/events")
            final = follow(client, f"{bases['b']}/train/{job_id}/events", started)
            if final["state"] != "succeeded":
                print(f"the job ended {final['state']}: {final['error']}")
                return 1
            version = final["version"]
            print(f"\npublished {version} ({time.monotonic() - started:.1f} s after the upload)")
            review = "A moving, beautifully acted film that stays with you."
            for name in ("b", "a"):
                answer = client.post(
                    f"{bases[name]}/generate",
                    params={"prompt": "sentiment"},
                    json={"input": review, "max_new_tokens": 4},
                )
                answer.raise_for_status()
                print(
                    f"POST {bases[name]}/generate?prompt=sentiment -> {answer.json()['prompt']}: "
                    f"{answer.json()['text']!r}"
                )
            models = [m["id"] for m in client.get(f"{bases['b']}/v1/models").json()["data"]]
            print(f"GET {bases['b']}/v1/models -> {', '.join(models)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
