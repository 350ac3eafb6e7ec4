"""The training worker: one job, in its own process, so a crash or OOM cannot take the server down.

    python -m server.jobs.worker <job folder>

Reads request.json and the uploaded JSONL from the job folder, runs the trainer's loop with
its progress callback, publishes the result and writes curves. It reports to the server as
JSON lines on stdout: {"event": "progress" | "succeeded" | "failed" | "cancelled", ...}.
A file named `cancel` in the job folder stops it after the current step; nothing is published.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path

# The server starts this process with OMP_NUM_THREADS (the job's threads) and a wait policy that
# never spins beside the serving engine (manager.py); the trainer's loop sets the same count.

from prompt_store import open_store
from prompt_store.settings import CommonSettings
from trainer.config import TrainConfig
from trainer.curves import write_curves
from trainer.data import load_examples, split_examples
from trainer.loop import TrainingCancelled, TrainProgress, train_prompt
from trainer.modeling import load_frozen_model
from trainer.publish import publish_result

from .job_files import CANCEL_FLAG, EVAL_DATA, REQUEST, TRAIN_DATA

logger = logging.getLogger("server.jobs.worker")


def emit(event: str, **fields) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def run_job(folder: Path) -> int:
    request = json.loads((folder / REQUEST).read_text())
    config = TrainConfig.from_dict(request["config"])
    examples = load_examples(folder / TRAIN_DATA)
    if (folder / EVAL_DATA).exists():
        train, val = examples, load_examples(folder / EVAL_DATA)
    else:
        train, val = split_examples(examples, config.eval_fraction, config.seed)
    frozen = load_frozen_model(request["model"], device=request.get("device"))
    emit("started", num_train_examples=len(train), num_eval_examples=len(val))

    def on_progress(progress: TrainProgress) -> None:
        emit(
            "progress",
            step=progress.step,
            total=progress.total,
            loss=progress.loss,
            val_metric=progress.val_metric,
            eta_seconds=progress.eta_seconds,
            elapsed_seconds=progress.elapsed_seconds,
        )

    try:
        result = train_prompt(
            frozen, train, val, config, callback=on_progress, should_stop=(folder / CANCEL_FLAG).exists
        )
    except TrainingCancelled:
        emit("cancelled")
        return 0
    write_curves(result.history, folder)
    with open_store(request.get("store") or CommonSettings().store) as store:  # the server passes SOFTPROMPT_STORE
        version = publish_result(store, request["name"], frozen, result)
    emit("succeeded", version=str(version.id), metrics=_jsonable(result.metrics))
    return 0


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    folder = Path((argv or sys.argv[1:])[0])
    try:
        return run_job(folder)
    except Exception as exc:  # report every failure to the server, then exit non-zero
        traceback.print_exc()
        emit("failed", error=f"{type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
