"""How torch's OpenMP threads wait, set in this one place before torch loads.

Every entry point (the server, the trainer, the store CLI, the tests) imports one of our
packages, and so `core`, before torch, and libgomp reads its environment once, when torch loads,
so this is where the policy is set. A setting already in the environment wins.

Threads spin a bounded 30,000 iterations before they sleep: sleeping at once makes each of the
hundreds of parallel regions of a decode step pay a wake-up, spinning for ever burns a busy
neighbour's core. The measurements behind the number (`bench/latency_bench.py`) are in
docs/server.md, "Threads and waiting". Training processes started by a job worker are told not
to spin at all (jobs/launch.py): they run beside serving, and the serving engine leaves them
their threads.
"""

import os

SPIN_COUNT = "30000"


def set_wait_policy() -> None:
    os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
