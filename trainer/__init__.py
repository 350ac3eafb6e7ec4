"""EmbedGrad: optimise the token embeddings of a text prompt through a frozen model."""

import os

# Torch spin-waits between parallel regions by default; on a small shared machine a busy
# neighbour then makes it many times slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
