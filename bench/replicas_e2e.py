"""Two replicas behind nginx on one PostgreSQL store, end to end on loopback.

    .venv/bin/python bench/replicas_e2e.py [--model default]

Starts a throwaway PostgreSQL server (the machine's binaries), two `softprompt serve`
replicas on the default model and nginx in front of them, then, through the load balancer:
publishes `math-v1`, generates with it (nginx's X-Served-By header says which replica
answered), publishes `math-v2` and points the alias `prod` at `math-v1`; and asks each replica
directly what it serves. Everything is stopped and removed at the end.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import httpx
import torch
from safetensors.torch import save

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from devtools.local_servers import start_database, start_nginx, start_server, stop_at_exit  # noqa: E402
from devtools.postgres import free_port  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    args = parser.parse_args(argv)
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        cluster, url = start_database(stack)
        print(f"PostgreSQL {cluster.bindir.parent.name} on 127.0.0.1:{cluster.port}, store {url}")
        ports = {}
        for name in ("a", "b"):
            ports[name] = free_port()
            stop_at_exit(stack, start_server(url, Path(tmp) / name, ports[name], model=args.model))
            print(f"replica {name} ready on 127.0.0.1:{ports[name]}")
        lb_port = free_port()
        stop_at_exit(stack, start_nginx(list(ports.values()), lb_port, Path(tmp) / "nginx"), timeout=10)
        lb = f"http://127.0.0.1:{lb_port}"
        print(f"nginx on {lb} -> {', '.join(f'127.0.0.1:{p}' for p in ports.values())}")
        replica_of = {f"127.0.0.1:{p}": name for name, p in ports.items()}

        with httpx.Client(timeout=120) as client:
            hidden = client.get(f"{lb}/stats").json()["model"]["hidden_size"]

            def publish(seed: int) -> str:
                torch.manual_seed(seed)
                data = save({"prompt_embeddings": torch.randn(8, hidden) * 0.02})
                answer = client.post(
                    f"{lb}/prompts",
                    data={"name": "math"},
                    files={"file": ("math.safetensors", io.BytesIO(data), "application/octet-stream")},
                )
                answer.raise_for_status()
                print(
                    f"\nPOST {lb}/prompts (name=math) -> {answer.status_code} {answer.json()['id']} "
                    f"(through replica {replica_of[answer.headers['x-served-by']]})"
                )
                return answer.json()["id"]

            def generate(base: str, prompt: str) -> tuple[str, str]:
                answer = client.post(
                    f"{base}/generate",
                    params={"prompt": prompt},
                    json={"input": "What is 12 + 30?", "max_new_tokens": 8},
                )
                answer.raise_for_status()
                served_by = replica_of.get(answer.headers.get("x-served-by", ""), "direct")
                return answer.json()["prompt"], served_by

            publish(1)
            for _ in range(4):
                version, served_by = generate(lb, "math")
                print(f"  POST {lb}/generate?prompt=math -> {version} (replica {served_by})")
            publish(2)
            for name, port in ports.items():
                version, _ = generate(f"http://127.0.0.1:{port}", "math")
                print(f"  replica {name} directly: /generate?prompt=math -> {version}")
            moved = client.put(f"{lb}/aliases/prod", json={"target": "math-v1"})
            moved.raise_for_status()
            print(f"\nPUT {lb}/aliases/prod -> math-v1 (through replica {replica_of[moved.headers['x-served-by']]})")
            listings = []
            for name, port in ports.items():
                base = f"http://127.0.0.1:{port}"
                version, _ = generate(base, "prod")
                listing = client.get(f"{base}/prompts").json()
                listings.append(listing)
                versions = [v["id"] for p in listing["prompts"] for v in p["versions"]]
                print(
                    f"  replica {name} directly: /generate?prompt=prod -> {version}; GET /prompts: {versions}, "
                    f"aliases {listing['aliases']}"
                )
            agree = all(listing == listings[0] for listing in listings)
            print(f"\nboth replicas list the same prompts and aliases: {agree}")
            return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
