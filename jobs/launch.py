"""Starting a job's process (jobs/process.py), on one or several processes.

The worker gets its threads and a wait policy that never spins beside the serving engine
(bench/omp_ab.py), and the store's location and the model cache through its environment (a
database URL carries a password, so it is never written into the job's files). It runs in its
job's folder, wherever the server was started and however softprompt was installed: every path
it is given is absolute (prompt_store/settings.py). It dies with the thread that started
it (PR_SET_PDEATHSIG, worker.py), so a server or worker killed with SIGKILL leaves no trainer
behind that could still publish.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from core.modeling import cache_root
from core.settings import absolute, absolute_model_spec, is_database_url

logger = logging.getLogger(__name__)

# Where the `server` package lives. Run from a source checkout without installing it, the
# child finds it only through PYTHONPATH; an installed package (wheel or editable) needs nothing.
SOURCE_ROOT = Path(__file__).resolve().parents[2]
PARENT_PID = "SOFTPROMPT_PARENT_PID"  # the worker exits at once if its parent is already gone


class Lease(NamedTuple):
    """What a job's process checks before it publishes: this worker still holds this attempt, with a margin."""

    worker: str
    attempt: int
    margin_seconds: float

    def argument(self) -> str:
        return f"{self.worker}|{self.attempt}|{self.margin_seconds}"

    @classmethod
    def parse(cls, text: str) -> Lease:
        worker, attempt, margin = text.rsplit("|", 2)
        return cls(worker, int(attempt), float(margin))


def launch_process(
    folder: Path,
    *,
    threads: int,
    store: str,
    model: str,
    device: str | None = None,
    processes: int = 1,
    lease: Lease | None = None,
) -> subprocess.Popen:
    """Start `python -m jobs.process <folder>` with this machine's model, device and threads, on
    `processes` ranks (torchrun when more than one); its events arrive on the returned process's
    stdout, its log in <folder>/worker.log."""
    folder = Path(absolute(folder))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "OMP_WAIT_POLICY": "PASSIVE",
        "GOMP_SPINCOUNT": "0",
        "SOFTPROMPT_STORE": absolute_store(store),
        "SOFTPROMPT_CACHE_DIR": str(cache_root()),
        PARENT_PID: str(os.getpid()),
    }
    if (SOURCE_ROOT / "pyproject.toml").is_file():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "jobs.process", str(folder), *process_arguments(model, device, threads, lease)]
    if processes > 1:
        command += ["--processes", str(processes)]
    with open(folder / "worker.log", "ab") as log:
        # a session of its own: a Ctrl-C meant for the parent reaches the job only through the parent,
        # which then records it as interrupted rather than failed
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=log, env=env, cwd=folder, start_new_session=True
        )
    logger.info(
        "job %s: worker pid %d started on %d process(es) (log %s)",
        folder.name,
        proc.pid,
        processes,
        folder / "worker.log",
    )
    return proc


def process_arguments(model: str, device: str | None, threads: int, lease: Lease | None) -> list[str]:
    """The command-line flags of jobs/process.py that carry this machine's settings (the ranks get them too)."""
    arguments = ["--model", absolute_model_spec(model), "--threads", str(threads)]
    if device:
        arguments += ["--device", device]
    if lease is not None:
        arguments += ["--lease", lease.argument()]
    return arguments


def absolute_store(store: str) -> str:
    return store if is_database_url(store) else absolute(store)
