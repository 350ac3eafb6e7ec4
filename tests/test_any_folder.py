"""A server works wherever it is started (issue 22): real `softprompt serve` and `softprompt worker`
processes, started from folders of their own with the default settings (relative store and jobs
folders, a relative model path), train a prompt through HTTP and serve it; and the built wheel,
installed without `-e` into a fresh virtual environment, does the same."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from devtools.local_servers import REPO, stop_at_exit, wait_ready
from devtools.postgres import free_port
from tests.jobs_helpers import SENTIMENT, save_tiny_model, wait_until

pytestmark = pytest.mark.processes

TRAIN = {
    "name": "senti",
    "init": "Classify the sentiment.",
    "steps": 2,
    "examples": SENTIMENT[:5],
    "eval_examples": SENTIMENT[5:],
    "config": {"batch_size": 2, "eval_every": 2, "warmup_steps": 1},
}


def default_environment(**settings: str) -> dict:
    """This process's environment without any SOFTPROMPT_* setting: only `settings` are given."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SOFTPROMPT_")}
    env.pop("PYTHONPATH", None)
    return {
        **env,
        "SOFTPROMPT_CACHE_DIR": os.environ.get("SOFTPROMPT_CACHE_DIR", str(Path.home() / ".cache/softprompt")),
        **settings,
    }


def serve(stack: ExitStack, scripts: Path, folder: Path, *extra: str, env: dict | None = None) -> str:
    """`softprompt serve --model model` started in `folder` (the model folder inside it); its base URL."""
    port = free_port()
    log = folder / "server.log"
    process = subprocess.Popen(
        [str(scripts / "softprompt"), "serve", "--model", "model", "--port", str(port), *extra],
        cwd=folder,
        env=env or default_environment(),
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    stop_at_exit(stack, process)
    base = f"http://127.0.0.1:{port}"
    wait_ready(base, process, log, timeout=300)
    return base


def train_and_serve(base: str, timeout: float = 300) -> dict:
    """Submit the training job over HTTP, wait for its end, then generate with the published prompt."""
    submitted = httpx.post(f"{base}/train", json=TRAIN, timeout=30)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    job = wait_until(
        lambda: (
            (j := httpx.get(f"{base}/train/{job_id}", timeout=30).json())["state"]
            in ("succeeded", "failed", "cancelled")
            and j
        ),
        timeout=timeout,
        interval=0.5,
    )
    assert job["state"] == "succeeded", job
    served = httpx.post(
        f"{base}/generate", params={"prompt": "senti"}, json={"input": "Great fun.", "max_new_tokens": 2}, timeout=30
    )
    assert served.status_code == 200 and served.json()["prompt"] == job["version"], served.text
    return job


def new_folder(tmp_path: Path, name: str, frozen) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    save_tiny_model(frozen, folder / "model")
    return folder


def test_a_server_started_in_its_own_folder_trains_with_the_default_folder_store(frozen, tmp_path):
    project = new_folder(tmp_path, "project", frozen)
    with ExitStack() as stack:
        base = serve(stack, Path(sys.executable).parent, project)
        job = train_and_serve(base)
    assert (project / "prompt-store" / "prompts" / "senti" / "v1").is_dir()
    assert (project / "prompt-store" / "jobs" / job["id"] / "worker.log").is_file()
    assert not (REPO / "prompt-store" / "jobs" / job["id"]).exists()


def test_a_replica_and_a_worker_in_folders_of_their_own_share_a_database_store(frozen, tmp_path, database_url):
    replica, worker_home = new_folder(tmp_path, "replica", frozen), new_folder(tmp_path, "worker", frozen)
    scripts = Path(sys.executable).parent
    with ExitStack() as stack:
        base = serve(
            stack, scripts, replica, "--store", database_url, env=default_environment(SOFTPROMPT_WORKER_JOBS="none")
        )
        log = worker_home / "worker.log"
        worker = subprocess.Popen(
            [str(scripts / "softprompt"), "worker", "--store", database_url, "--model", "model"],
            cwd=worker_home,
            env=default_environment(),
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
        )
        stop_at_exit(stack, worker)
        job = train_and_serve(base)
    assert (worker_home / "softprompt-jobs" / job["id"] / "worker.log").is_file()
    assert job["worker"] and not (replica / "softprompt-jobs" / job["id"]).exists()


@pytest.fixture(scope="module")
def wheel_scripts(tmp_path_factory) -> Path:
    """A fresh virtual environment with the project's built wheel installed (no `-e`); its other
    packages (torch, transformers, ...) are this environment's, reached through a .pth file."""
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(folder / "dist"),
            str(REPO),
        ],
        check=True,
        cwd=folder,
    )
    [wheel] = (folder / "dist").glob("softprompt_server-*.whl")
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "outer-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", str(wheel)],
        check=True,
    )
    return venv / "bin"


def test_the_installed_wheel_trains_from_any_folder(frozen, tmp_path, wheel_scripts):
    project = new_folder(tmp_path, "project", frozen)
    where = subprocess.run(
        [
            str(wheel_scripts / "python"),
            "-c",
            "import server, prompt_store; print(server.__file__); print(prompt_store.__file__)",
        ],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
    )
    assert all(str(wheel_scripts.parent) in line for line in where.stdout.splitlines()), where.stdout
    with ExitStack() as stack:
        base = serve(stack, wheel_scripts, project)
        started = time.monotonic()
        job = train_and_serve(base)
    assert job["version"] == "senti-v1" and time.monotonic() - started < 300
    assert (project / "prompt-store" / "jobs" / job["id"] / "worker.log").is_file()
