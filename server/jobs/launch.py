"""Starting a training job's worker process (server/jobs/worker.py), on one or several processes.

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

from prompt_store.settings import absolute, is_database_url
from trainer.modeling import cache_root

logger = logging.getLogger(__name__)

# Where the `server` package lives. Run from a source checkout without installing it, the
# child finds it only through PYTHONPATH; an installed package (wheel or editable) needs nothing.
SOURCE_ROOT = Path(__file__).resolve().parents[2]
PARENT_PID = "SOFTPROMPT_PARENT_PID"  # the worker exits at once if its parent is already gone


def launch_worker(folder: Path, *, threads: int, store: str, processes: int = 1) -> subprocess.Popen:
    """Start `python -m server.jobs.worker <folder>` with `processes` ranks (torchrun when more than one);
    its events arrive on the returned process's stdout, its log in <folder>/worker.log."""
    folder = Path(absolute(folder))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE",
           "GOMP_SPINCOUNT": "0", "SOFTPROMPT_STORE": absolute_store(store), "SOFTPROMPT_CACHE_DIR": str(cache_root()),
           PARENT_PID: str(os.getpid())}
    if (SOURCE_ROOT / "pyproject.toml").is_file():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "server.jobs.worker", str(folder)]
    if processes > 1:
        command += ["--processes", str(processes)]
    with open(folder / "worker.log", "ab") as log:
        # a session of its own: a Ctrl-C meant for the parent reaches the job only through the parent,
        # which then records it as interrupted rather than failed
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=env, cwd=folder, start_new_session=True)
    logger.info("job %s: worker pid %d started on %d process(es) (log %s)", folder.name, proc.pid, processes,
                folder / "worker.log")
    return proc


def absolute_store(store: str) -> str:
    return store if is_database_url(store) else absolute(store)
