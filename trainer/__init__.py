"""EmbedGrad: optimise the token embeddings of a text prompt through a frozen model."""

import prompt_store  # noqa: F401  (first: it sets how torch's threads wait, before torch loads)
