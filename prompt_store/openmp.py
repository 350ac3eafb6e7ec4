"""How torch's OpenMP threads wait, set in this one place before torch loads.

Every entry point (the server, the trainer, the store CLI, the tests) imports prompt_store
first, and libgomp reads its environment once, when torch loads, so this is where the policy
is set. A setting already in the environment wins.

The choice comes from `bench/latency_bench.py` (batch-1 decoding on the default model, 2 CPUs,
two runs on 2026-12-02; docs/server.md, "Threads and waiting"). Sleeping at once
(OMP_WAIT_POLICY=PASSIVE) makes each of the hundreds of parallel regions of a decode step pay a
wake-up: the server decoded at 42-77 ms/token. Spinning 30,000 iterations first: 31 ms, and
36-38 ms beside a training job. Spinning for ever was no faster and burns a core whenever the
server is idle; libgomp's own 300,000 was slower beside a training job (38.9 and 47.4 ms).
The spin is bounded, so idle threads still sleep. Training workers started by the server are told not to
spin at all (server/jobs/manager.py): they run beside serving, and the serving engine leaves
them their threads.
"""

import os

SPIN_COUNT = "30000"


def set_wait_policy() -> None:
    os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
