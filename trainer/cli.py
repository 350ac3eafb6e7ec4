"""`softprompt train` / `python -m trainer`: train a soft prompt from JSONL and publish it."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from core.settings import CommonSettings
from trainer.config import TrainConfig, TrainConfigError
from trainer.data import DataError, load_examples, split_examples

logger = logging.getLogger(__name__)

# CLI flag -> TrainConfig field, for every optional setting (None means "config default").
_CONFIG_FLAGS = {
    "steps": int,
    "lr": float,
    "min_cosine": float,
    "projection": str,
    "batch_size": int,
    "grad_accum": int,
    "warmup_steps": int,
    "eval_fraction": float,
    "eval_every": int,
    "patience": int,
    "seed": int,
    "task": str,
    "max_new_tokens": int,
    "threads": int,
    "weight_decay": float,
    "max_input_tokens": int,
    "max_eval_examples": int,
}
_HELP = {
    "steps": "optimizer steps (default 200)",
    "lr": "AdamW learning rate for the prompt vectors (default 3e-3; soft prompts want ~1e-3..1e-2)",
    "min_cosine": "trust region: minimum cosine of each vector to its initial token embedding (default 0.95)",
    "projection": "how a step that leaves the trust region is brought back: nearest (default: the closest "
    "point inside, projected gradient descent) or keep_norm (rotated back at its length)",
    "batch_size": "examples per micro-batch (default 8)",
    "grad_accum": "micro-batches per optimizer step (default 1)",
    "warmup_steps": "linear warm-up steps before cosine decay (default 10)",
    "eval_fraction": "validation share carved from --data when it has no 'split' fields (default 0.1)",
    "eval_every": "evaluate on validation every N steps (default 25)",
    "patience": "early stop after N evaluations without improvement (default: off)",
    "seed": "seed for the split, batch order and init (default 0)",
    "task": "auto | classification | generation (default auto: few distinct outputs -> classification)",
    "max_new_tokens": "generation-task evaluation length (default: the longest target and 4 more)",
    "threads": "torch threads for the run (default: torch's choice)",
    "weight_decay": "AdamW weight decay (default 0)",
    "max_input_tokens": "inputs longer than this keep their last N tokens (default 512)",
    "max_eval_examples": "cap on validation examples per evaluation (default: all)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `softprompt train` (also used by `python -m trainer`)."""
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help='training JSONL: {"input": ..., "output": ...[, "split": "train"|"validation"]} per line',
    )
    parser.add_argument(
        "--init",
        required=True,
        help='init text whose token embeddings start the prompt, e.g. "Please reason step by step."',
    )
    parser.add_argument("--name", required=True, help="prompt name in the store; publishes NAME-vN")
    parser.add_argument(
        "--eval",
        type=Path,
        default=None,
        help="held-out JSONL (e.g. a test split): metric before and after is measured on it and stored",
    )
    for flag, kind in _CONFIG_FLAGS.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=kind, default=None, help=_HELP[flag])
    parser.add_argument("--store", default=None, help="store root (default $SOFTPROMPT_STORE or ./prompt-store)")
    parser.add_argument("--model", default=None, help="model spec (default $SOFTPROMPT_MODEL or the embedded SmolLM2)")
    parser.add_argument(
        "--runs-dir", type=Path, default=Path("softprompt-runs"), help="where curves are written (a folder per run)"
    )
    parser.add_argument("--parent", default=None, help="record this version as the parent (e.g. sentiment-v1)")
    parser.add_argument("--dry-run", action="store_true", help="train and report, but do not publish")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def build_config(args: argparse.Namespace) -> TrainConfig:
    overrides = {k: getattr(args, k) for k in _CONFIG_FLAGS if getattr(args, k, None) is not None}
    return TrainConfig(init_text=args.init, **overrides)


def run(args: argparse.Namespace) -> int:
    """Train, evaluate, write curves and publish; returns a process exit code."""
    try:
        config = build_config(args)
        examples = load_examples(args.data)
        held_out = load_examples(args.eval) if args.eval else None
        train, val = split_examples(examples, config.eval_fraction, config.seed)
    except (TrainConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from trainer.distributed import process_group

    with process_group() as ranks:  # under torchrun: this process's rank; else rank 0 of 1
        return _run_on_rank(args, config, train, val, held_out, ranks)


def _run_on_rank(args, config, train, val, held_out, ranks) -> int:
    from prompt_store import PromptStoreError, open_store

    settings = CommonSettings()
    if config.batch_size < ranks.world:
        print(
            f"error: batch_size {config.batch_size} is smaller than the {ranks.world} processes sharing each batch",
            file=sys.stderr,
        )
        return 2
    if not ranks.is_main:  # rank 0 alone logs the run's progress
        logging.getLogger("trainer").setLevel(logging.WARNING)
    store, opened = None, True
    try:  # opened first: a wrong or unreachable store stops the run before the training, not after
        store = open_store(args.store or settings.store) if ranks.is_main and not args.dry_run else None
    except PromptStoreError as error:
        print(f"error ({error.code}): {error}", file=sys.stderr)
        opened = False
    if not ranks.decide(opened):  # every rank stops, not only rank 0
        return 1
    try:
        return _train_and_publish(args, config, train, val, held_out, store, ranks, settings)
    finally:
        if store is not None:
            store.close()


def _train_and_publish(args, config, train, val, held_out, store, ranks, settings) -> int:
    from safetensors.torch import save_file

    from core.modeling import load_frozen_model
    from prompt_store import PromptStoreError

    frozen = load_frozen_model(
        args.model or settings.model, device=ranks.device if ranks.device.type == "cuda" else None
    )
    try:
        result = _train_with_progress(frozen, train, val, config, show=not args.no_progress and ranks.is_main)
    except KeyboardInterrupt:
        print("interrupted: nothing was published", file=sys.stderr)
        return 130
    if not ranks.is_main:  # rank 0 evaluates, writes the curves and publishes
        return 0
    if held_out is not None:
        result.metrics.update(evaluate_held_out(frozen, result, held_out, config, source=str(args.eval)))
    from trainer.curves import write_curves

    run_dir = args.runs_dir / f"{args.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    curves = write_curves(result.history, run_dir)
    summary = {k: v for k, v in result.metrics.items() if k not in ("nearest_tokens",)}
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    logger.info("wrote %s", run_dir / "metrics.json")
    _report(result.metrics)
    if args.dry_run:
        print("dry run: not published")
        return 0
    from trainer.publish import publish_result

    saved = run_dir / "prompt_embeddings.safetensors"  # kept whatever happens to the publish
    save_file({"prompt_embeddings": result.embeddings.contiguous()}, str(saved))
    try:
        version = publish_result(
            store, args.name, frozen, result, parent=args.parent, extra={"curves": str(curves["json"].resolve())}
        )
    except PromptStoreError as error:
        print(
            f"error ({error.code}): {error}\nthe trained prompt is saved in {saved}; publish it later with "
            f"softprompt prompts import or POST /prompts",
            file=sys.stderr,
        )
        return 1
    print(f"published {version.id} to {store.location}")
    return 0


def _train_with_progress(frozen, train, val, config: TrainConfig, *, show: bool):
    from tqdm import tqdm

    from trainer.loop import train_prompt

    state = {"val": None}
    with tqdm(total=config.steps, desc="train", unit="step", disable=not show, file=sys.stderr) as bar:

        def callback(progress):
            if progress.val_metric is not None:
                state["val"] = progress.val_metric
            postfix = {"loss": f"{progress.loss:.3f}"}
            if state["val"] is not None:
                postfix["val"] = f"{state['val']:.3f}"
            bar.set_postfix(postfix)
            bar.update(1)

        return train_prompt(frozen, train, val, config, callback=callback)


def evaluate_held_out(frozen, result, examples, config: TrainConfig, *, source: str) -> dict:
    """Metric on a held-out file for the init text, the trained prompt and its hard prompt."""
    from trainer.batches import Encoder
    from trainer.evaluate import Task, evaluate
    from trainer.interpret import hard_prompt

    task = Task(result.metrics["task"], tuple(result.metrics["labels"]))
    encoder = Encoder(frozen, use_chat_template=config.use_chat_template, max_input_tokens=config.max_input_tokens)

    fitted = result.config or config  # the trainer fitted max_new_tokens to the targets when none was given

    def metric(vectors):
        return evaluate(
            frozen,
            encoder,
            vectors,
            examples,
            task,
            batch_size=config.eval_batch_size,
            max_new_tokens=fitted.max_new_tokens,
        )["metric"]

    logger.info("evaluating %d held-out examples from %s", len(examples), source)
    return {
        "test_file": source,
        "test_examples": len(examples),
        "test_before": metric(result.init_embeddings),
        "test_after": metric(result.embeddings),
        "test_hard_prompt": metric(hard_prompt(frozen, result.embeddings)[0]),
    }


def _report(metrics: dict) -> None:
    name = metrics["metric_name"]
    lines = [
        f"validation {name}: {metrics['val_before']:.4f} (init text) -> {metrics['val_after']:.4f} (best step "
        f"{metrics['best_step']})"
    ]
    if "test_after" in metrics:
        lines.append(
            f"held-out {name}: {metrics['test_before']:.4f} -> {metrics['test_after']:.4f} (hard prompt "
            f"{metrics['test_hard_prompt']:.4f}, n={metrics['test_examples']})"
        )
    lines.append(f"cosine to init: mean {metrics['cosine_mean']:.4f}, min {metrics['cosine_min']:.4f}")
    lines.append(f"hard prompt: {metrics['hard_prompt_text']!r}")
    print("\n".join(lines))
