"""Start the pieces of a multi-replica deployment on loopback: `softprompt serve` processes
and an nginx load balancer in front of them (PostgreSQL: devtools/postgres.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from devtools.postgres import INSTALL_HINT, PostgresCluster, find_bindir

REPO = Path(__file__).resolve().parents[1]

NGINX_CONF = """\
{user}pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{}}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    upstream softprompt {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 60m;
        location / {{
            proxy_pass http://softprompt;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
            add_header X-Served-By $upstream_addr always;
        }}
    }}
}}
"""


def start_database(stack: ExitStack) -> tuple[PostgresCluster, str]:
    """A throwaway PostgreSQL server from the machine's binaries and a fresh database on it (its URL),
    both removed when `stack` closes."""
    bindir = find_bindir()
    if bindir is None:
        raise SystemExit(INSTALL_HINT)
    cluster = PostgresCluster(bindir).init()
    stack.callback(cluster.destroy)
    cluster.start()
    return cluster, cluster.create_database()


def stop_at_exit(stack: ExitStack, process: subprocess.Popen, timeout: float = 30) -> subprocess.Popen:
    """Terminate `process` and wait for it when `stack` closes."""
    stack.callback(process.wait, timeout)
    stack.callback(process.terminate)
    return process


def start_server(
    store: str,
    workdir: Path,
    port: int,
    *,
    model: str = "default",
    poll_seconds: float = 1.0,
    threads: int = 1,
    timeout: float = 600,
    env: dict | None = None,
) -> subprocess.Popen:
    """`softprompt serve` on 127.0.0.1:`port` against `store`; returns once /ready answers 200.
    `env`: further SOFTPROMPT_* settings (e.g. SOFTPROMPT_WORKER_JOBS=none)."""
    env = {
        **os.environ,
        "SOFTPROMPT_JOBS_DIR": str(workdir / "jobs"),
        "SOFTPROMPT_STORE_POLL_SECONDS": str(poll_seconds),
        "SOFTPROMPT_THREADS": str(threads),
        **(env or {}),
    }
    env.pop("SOFTPROMPT_API_KEY", None)  # admin routes answer on loopback without a key
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "server.log", "wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "serve",
            "--store",
            store,
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", process, workdir / "server.log", timeout)
    except BaseException:
        process.kill()
        raise
    return process


def start_worker(
    store: str,
    workdir: Path,
    *,
    model: str = "default",
    threads: int = 1,
    concurrency: int = 1,
    env: dict | None = None,
) -> subprocess.Popen:
    """`softprompt worker` against the database `store`, logging to <workdir>/worker.log; returns once it
    has started claiming (its log says so)."""
    env = {**os.environ, "SOFTPROMPT_JOBS_DIR": str(workdir / "jobs"), **(env or {})}
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "worker.log"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "worker",
            "--store",
            store,
            "--model",
            model,
            "--threads",
            str(threads),
            "--concurrency",
            str(concurrency),
        ],
        env=env,
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    deadline = time.monotonic() + 120
    while b"job worker" not in (log_path.read_bytes() if log_path.exists() else b""):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"the worker did not start; see {log_path}")
        time.sleep(0.1)
    return process


def wait_ready(base: str, process: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server for {base} exited; see {log}")
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server for {base} did not get ready in {timeout:.0f} s; see {log}")


def start_nginx(upstream_ports: list[int], port: int, folder: Path) -> subprocess.Popen:
    """nginx on 127.0.0.1:`port`, balancing over the given loopback ports."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        raise SystemExit("nginx was not found: install it (Debian/Ubuntu: apt-get install nginx).")
    folder.mkdir(parents=True, exist_ok=True)
    servers = "\n".join(f"        server 127.0.0.1:{p};" for p in upstream_ports)
    conf = folder / "nginx.conf"
    # Started as root, nginx's workers would run as `nobody`, who cannot write request bodies into
    # this private folder: keep them as root then.
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf.write_text(NGINX_CONF.format(prefix=folder, servers=servers, port=port, user=user))
    process = subprocess.Popen(
        [nginx, "-p", str(folder), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=open(folder / "stderr.log", "wb"),
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            errors = (folder / "error.log").read_text() if (folder / "error.log").exists() else ""
            raise SystemExit(f"nginx exited: {(folder / 'stderr.log').read_text()}{errors}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            return process
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit("nginx did not start")
