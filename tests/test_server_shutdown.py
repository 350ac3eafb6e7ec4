"""A real `softprompt serve` process stops within seconds of SIGTERM, whatever its requests are doing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from core.modeling import from_loaded
from tests.jobs_helpers import save_tiny_model, wait_until
from tests.tiny import tiny_llama

pytestmark = pytest.mark.processes

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _long_context_model(tokenizer, folder: Path) -> str:
    """The tiny model with room for thousands of new tokens, so a stream outlasts the test."""
    save_tiny_model(from_loaded(tiny_llama(len(tokenizer)), tokenizer, base_model="tiny"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 8192
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_sigterm_with_long_requests_in_flight_stops_within_seconds(tokenizer, tmp_path):
    port = _free_port()
    env = {
        **os.environ,
        "SOFTPROMPT_MAX_NEW_TOKENS_LIMIT": "8000",
        "SOFTPROMPT_SHUTDOWN_TIMEOUT_S": "2",
        "SOFTPROMPT_PACKED_WEIGHTS": "false",
        "SOFTPROMPT_THREADS": "1",
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server",
            "serve",
            "--model",
            _long_context_model(tokenizer, tmp_path / "model"),
            "--store",
            str(tmp_path / "store"),
            "--port",
            str(port),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _ready(base), timeout=120)
        outcomes: list[str] = []

        def request(stream: bool):
            body = {"input": "tell a long story", "max_new_tokens": 8000, "ignore_eos": True, "stream": stream}
            try:
                with httpx.stream("POST", f"{base}/generate", json=body, timeout=60) as answer:
                    for _ in answer.iter_lines():
                        pass
                outcomes.append("closed")
            except httpx.HTTPError as exc:
                outcomes.append(type(exc).__name__)

        threads = [threading.Thread(target=request, args=(stream,)) for stream in (True, True, False, False)]
        for thread in threads:
            thread.start()
        wait_until(lambda: httpx.get(f"{base}/stats").json()["engine"]["running"] == 4, timeout=60)
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=15)
        stopped_after = time.monotonic() - started
        for thread in threads:
            thread.join(timeout=15)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert stopped_after < 8, f"took {stopped_after:.1f} s to stop"
    assert len(outcomes) == 4  # every client was let go, none left hanging


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
