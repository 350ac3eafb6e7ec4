"""A server whose boot fails exits non-zero with the reason (issue 23): an orchestrator restarts it
and a person reads why, instead of a process answering /ready 503 for ever."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from devtools.postgres import free_port
from tests.jobs_helpers import save_tiny_model

pytestmark = pytest.mark.processes


@pytest.mark.parametrize(
    "model, reason, engine",
    [
        ("missing-model-folder", "Cannot load model spec", "torch"),
        ("broken-model", "SafetensorError", "torch"),
        ("hf-model", "SOFTPROMPT_ENGINE=llamacpp runs a GGUF file", "llamacpp"),  # nothing for llama.cpp to run
    ],
)
def test_a_model_that_cannot_load_stops_the_server_with_its_reason(frozen, tmp_path, model, reason, engine):
    if model in ("broken-model", "hf-model"):
        save_tiny_model(frozen, tmp_path / model)
    if model == "broken-model":  # a real model folder whose weights file was cut short
        weights = tmp_path / model / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    started = time.monotonic()
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "softprompt"),
            "serve",
            "--model",
            model,
            "--store",
            "store",
            "--port",
            str(free_port()),
            "--engine",
            engine,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    said = done.stderr[done.stderr.index("softprompt serve: the server could not start:") :]
    assert reason in said, said
    assert time.monotonic() - started < 60
