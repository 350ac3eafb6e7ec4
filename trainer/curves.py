"""Training curves per run: curve.csv, curve.json and curve.png (train loss, validation metric)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

COLUMNS = ("step", "split", "loss", "lr", "grad_norm", "projected_rows", "val_metric", "val_loss", "elapsed_seconds")


def write_curves(history: list[dict], folder: Path) -> dict[str, Path]:
    """Write the history rows of a run into `folder`; returns {"csv", "json", "png"} paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"csv": folder / "curve.csv", "json": folder / "curve.json", "png": folder / "curve.png"}
    columns = list(COLUMNS) + sorted({k for row in history for k in row} - set(COLUMNS))
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    paths["json"].write_text(json.dumps(history, indent=2))
    plot_curves(history, paths["png"])
    for path in paths.values():
        logger.info("wrote %s", path)
    return paths


def plot_curves(history: list[dict], target: str | Path | BinaryIO) -> None:
    """Draw train loss, validation loss and validation metric as a PNG into a path or file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if r.get("loss") is not None]
    val = [(r["step"], r["val_metric"]) for r in history if r.get("val_metric") is not None]
    val_loss = [(r["step"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        left.plot(*zip(*train), label="train loss (per target token)", alpha=0.8)
    if val_loss:
        left.plot(*zip(*val_loss), "o-", label="validation loss (gold label)")
    left.set_xlabel("step")
    left.set_ylabel("cross-entropy")
    left.legend()
    if val:
        right.plot(*zip(*val), "o-", color="tab:green")
    right.set_xlabel("step")
    right.set_ylabel("validation metric")
    right.set_ylim(0, 1)
    figure.tight_layout()
    figure.savefig(target, dpi=100, format="png")
    plt.close(figure)
