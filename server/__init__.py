"""FastAPI service: one frozen model, per-request soft prompts from the store."""

import prompt_store  # noqa: F401  (first: it sets how torch's threads wait, before torch loads)
