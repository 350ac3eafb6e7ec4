"""How torch's OpenMP threads wait, set in this one place before torch loads.

Every entry point (the server, the trainer, the store CLI, the tests) imports prompt_store
first, and libgomp reads its environment once, when torch loads, so this is where the policy
is set. A setting already in the environment wins.

The choice, from `bench/latency_bench.py` (batch-1 ms per token on the default model, 2 CPUs,
2026-12-02): sleeping between parallel regions (OMP_WAIT_POLICY=PASSIVE) made every one of the
hundreds of regions of a decode step pay a wake-up, 77 ms/token in the server; spinning for
30,000 iterations first gave 31 ms/token (spinning for 300,000, libgomp's default, 25 ms, but
38.9 beside a training job against 35.6). The spin is bounded, so idle threads still sleep: a
server with nothing to do burns no CPU. Training workers started by the server are told not
to spin at all (server/jobs/manager.py): they run beside serving, and the serving engine
leaves them their threads.
"""

import os

SPIN_COUNT = "30000"


def set_wait_policy() -> None:
    os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
