"""A job's own process: one training (or engine-less evaluation) job, so a crash or OOM cannot
take its worker down.

    python -m jobs.process <job folder> --model M --threads T [--device D] [--lease W|A|S] [--processes N]

The folder holds what was submitted (request.json, train.jsonl, eval.jsonl); the flags carry
the machine's model, device and threads, and, for a shared queue, the lease to check before
publishing. It reports to its worker as JSON lines on stdout:
{"event": "started" | "progress" | "succeeded" | "failed" | "cancelled", ...}. A file named
`cancel` in the folder stops it after the current step; nothing is published.

With `--processes N` (N > 1) this process launches N ranks of itself through torchrun
(trainer/distributed.py: each rank trains on its shard of every batch); rank 0 alone reports,
writes the curves and publishes. Every process here dies with its parent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import sys
import traceback
from dataclasses import replace
from pathlib import Path

# The worker starts this process with OMP_NUM_THREADS (the job's threads) and a wait policy that
# never spins beside the serving engine (launch.py); the trainer's loop sets the same count.
from core.modeling import load_frozen_model
from core.settings import CommonSettings
from jobs.files import CANCEL_FLAG, EVAL_DATA, REQUEST, RESULT, TRAIN_DATA
from jobs.launch import PARENT_PID, Lease, process_arguments
from prompt_store import open_store
from trainer.config import TrainConfig
from trainer.curves import write_curves
from trainer.data import load_examples, split_examples
from trainer.distributed import process_group
from trainer.loop import TrainingCancelled, TrainProgress, train_prompt
from trainer.publish import publish_result

logger = logging.getLogger("jobs.process")

PR_SET_PDEATHSIG = 1


def emit(event: str, **fields) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the thread that started it ends (Linux), and
    exit now if that already happened: an orphaned trainer must never go on to publish."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    expected = os.environ.get(PARENT_PID)
    if expected and os.getppid() != int(expected):
        raise SystemExit(f"the process that started this worker ({expected}) is gone; not running the job")


def run_job(folder: Path, args: argparse.Namespace) -> int:
    request = json.loads((folder / REQUEST).read_text())
    if request.get("kind") == "eval":
        return _evaluate(folder, request, args)
    with process_group() as ranks:  # under torchrun: this rank; otherwise rank 0 of 1
        report = emit if ranks.is_main else (lambda event, **fields: None)
        return _train(folder, request, args, ranks, report)


def _train(folder: Path, request: dict, args, ranks, report) -> int:
    config = replace(TrainConfig.from_dict(request["config"]), threads=args.threads)
    examples = load_examples(folder / TRAIN_DATA)
    if (folder / EVAL_DATA).exists():
        train, val = examples, load_examples(folder / EVAL_DATA)
    else:
        train, val = split_examples(examples, config.eval_fraction, config.seed)
    device = ranks.device if ranks.device.type == "cuda" else args.device
    frozen = load_frozen_model(args.model, device=device)
    _check_model(frozen, request.get("fingerprint"))
    report("started", num_train_examples=len(train), num_eval_examples=len(val))

    def on_progress(progress: TrainProgress) -> None:
        report(
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
        report("cancelled")
        return 0
    if not ranks.is_main:
        return 0
    write_curves(result.history, folder)
    url = CommonSettings().store  # the worker passes SOFTPROMPT_STORE
    _check_lease(url, folder, args.lease)
    with open_store(url) as store:
        version = publish_result(store, request["name"], frozen, result)
    report("succeeded", version=str(version.id), metrics=_jsonable(result.metrics))
    return 0


def _evaluate(folder: Path, request: dict, args) -> int:
    """An evaluation job on a worker with no serving engine: the server's comparison, scored like
    `softprompt eval` (trainer/compare.py), its table written to result.json for the worker to keep."""
    import torch

    from jobs.evaluation import CHUNK_SIZE, MAX_EVAL_NEW_TOKENS, score_eval_job, summary
    from trainer.batches import Encoder
    from trainer.compare import model_scorer

    torch.set_num_threads(args.threads)
    frozen = load_frozen_model(args.model, device=args.device)
    _check_model(frozen, request.get("fingerprint"))
    url = CommonSettings().store  # the worker passes SOFTPROMPT_STORE

    def keep(table: dict) -> None:  # an attempt that lost its lease records and keeps nothing
        _check_lease(url, folder, args.lease)
        (folder / RESULT).write_text(json.dumps(table))

    with open_store(url) as store:
        table = score_eval_job(
            folder,
            frozen,
            store,
            emit,
            (folder / CANCEL_FLAG).exists,
            limit=MAX_EVAL_NEW_TOKENS,
            chunk_size=CHUNK_SIZE,
            scorer=lambda task, max_new_tokens: model_scorer(
                frozen, Encoder(frozen), task, max_new_tokens=max_new_tokens, batch_size=CHUNK_SIZE
            ),
            before_recording=keep,
        )
    if table is not None:
        emit("succeeded", metrics=summary(table))
    return 0


def _check_lease(url: str, folder: Path, lease: Lease | None) -> None:
    """A job from a shared queue publishes only while its worker still holds the lease (with a
    heartbeat to spare): once the lease is gone the job may be running elsewhere."""
    if lease is None:  # a job of a local queue: its worker alone runs it
        return
    from jobs.postgres_queue import lease_held

    job_id = folder.name.split(".")[0]  # <id> or <id>.<attempt>
    if not lease_held(url, job_id, lease.worker, lease.attempt, margin_seconds=lease.margin_seconds):
        raise RuntimeError(
            "the job's lease was lost before publishing (its worker stopped renewing it); nothing was published"
        )


def _check_model(frozen, wanted: dict | None) -> None:
    """A job records the model of the server it was submitted to; a worker holding another model
    would publish a prompt that server cannot serve."""
    if wanted and frozen.fingerprint.to_dict() != wanted:
        raise RuntimeError(
            f"this worker's model ({frozen.base_model}, {frozen.fingerprint.to_dict()}) is not the model the "
            f"job was submitted for ({wanted}); start the worker with the servers' SOFTPROMPT_MODEL"
        )


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _launch_ranks(folder: Path, args) -> int:
    """Run the job on `args.processes` ranks through torchrun, in this process (which its ranks die with)."""
    from torch.distributed.run import main as torchrun

    os.environ[PARENT_PID] = str(os.getpid())
    ranks = [
        "--standalone",
        f"--nproc-per-node={args.processes}",
        "-m",
        "jobs.process",
        str(folder),
        *process_arguments(args.model, args.device, args.threads, args.lease),
    ]
    try:
        torchrun(ranks)
    except Exception as exc:  # a rank failed: torchrun raises ChildFailedError after stopping the others
        logger.error("the job's ranks failed: %s", exc)
        emit(
            "failed", error=f"one of the job's {args.processes} processes failed (see worker.log): {type(exc).__name__}"
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m jobs.process")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", required=True, help="the model spec this machine serves")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--device", default=None)
    parser.add_argument("--lease", type=Lease.parse, default=None, help="worker|attempt|margin seconds (shared queues)")
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args(argv)
    die_with_parent()
    if args.processes > 1:
        return _launch_ranks(args.folder, args)
    try:
        return run_job(args.folder, args)
    except Exception as exc:  # report every failure to the worker, then exit non-zero
        traceback.print_exc()
        emit("failed", error=f"{type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
