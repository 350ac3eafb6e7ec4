"""Starting a training job's worker process (server/jobs/worker.py), on one or several processes.

The worker gets its threads and a wait policy that never spins beside the serving engine
(bench/omp_ab.py), and the store's location through its environment (a database URL carries a
password, so it is never written into the job's files). It dies with the thread that started
it (PR_SET_PDEATHSIG, worker.py), so a server or worker killed with SIGKILL leaves no trainer
behind that could still publish.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PARENT_PID = "SOFTPROMPT_PARENT_PID"  # the worker exits at once if its parent is already gone


def launch_worker(folder: Path, *, threads: int, store: str, processes: int = 1) -> subprocess.Popen:
    """Start `python -m server.jobs.worker <folder>` with `processes` ranks (torchrun when more than one);
    its events arrive on the returned process's stdout, its log in <folder>/worker.log."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE",
           "GOMP_SPINCOUNT": "0", "SOFTPROMPT_STORE": store, PARENT_PID: str(os.getpid())}
    command = [sys.executable, "-m", "server.jobs.worker", str(folder)]
    if processes > 1:
        command += ["--processes", str(processes)]
    with open(folder / "worker.log", "ab") as log:
        # a session of its own: a Ctrl-C meant for the parent reaches the job only through the parent,
        # which then records it as interrupted rather than failed
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=env, cwd=PROJECT_ROOT, start_new_session=True)
    logger.info("job %s: worker pid %d started on %d process(es) (log %s)", folder.name, proc.pid, processes,
                folder / "worker.log")
    return proc
