"""FastAPI service: one frozen model, per-request soft prompts from the store."""

import os

# Before torch is imported anywhere: without it torch spin-waits, and on a small shared
# machine a busy neighbour makes it many times slower (measured in the field notes).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
