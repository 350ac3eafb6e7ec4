"""`softprompt eval`: score prompt versions, text prompts or no prompt on one labeled file.

    softprompt eval --data examples/data/arithmetic.test.jsonl \\
        --prompt math-v2 --prompt math-v3 --text "Solve the problem. Answer with the number only." --bare

Prints accuracy (exact match for generation tasks) with a 95 % interval for each reference
and McNemar's exact test for each pair, and records each version's score with it in the store
(`softprompt prompts show math-v3` lists them; --no-record skips that).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from core.settings import CommonSettings
from trainer.config import TASKS
from trainer.data import DataError, jsonl_lines, parse_examples

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", required=True, type=Path, help='labeled JSONL: {"input": ..., "output": ...} per line'
    )
    parser.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="REF",
        help="a published version, alias or name (newest); repeat to compare several",
    )
    parser.add_argument(
        "--text",
        action="append",
        default=[],
        metavar="TEXT",
        help="a plain text prompt in the soft prompt's place (e.g. the init text); repeatable",
    )
    parser.add_argument("--bare", action="store_true", help="also score the query with no prompt at all")
    parser.add_argument(
        "--task",
        choices=TASKS,
        default="auto",
        help="auto (default): the task the first prompt was trained for, else from the data",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="generation length (default: the first prompt's training setting, else 16)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="examples per forward pass (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the whole result (per-example outcomes) here"
    )
    parser.add_argument(
        "--no-record", action="store_true", help="do not keep the scores with the versions in the store"
    )
    parser.add_argument("--store", default=None, help="store root (default $SOFTPROMPT_STORE or ./prompt-store)")
    parser.add_argument("--model", default=None, help="model spec (default $SOFTPROMPT_MODEL or the embedded SmolLM2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from prompt_store import PromptStoreError, open_store
    from trainer.compare import ReferenceError, reference_specs

    try:
        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be a positive integer")
        if args.batch_size < 1:
            raise ValueError("--batch-size must be a positive integer")
        specs = reference_specs(args.prompt, args.text, args.bare)
        data = _read(args.data)
        examples = parse_examples(jsonl_lines(data.decode("utf-8")), source=str(args.data))
    except (ReferenceError, DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    settings = CommonSettings()
    try:
        store = open_store(args.store or settings.store)
    except PromptStoreError as error:
        print(f"error ({error.code}): {error}", file=sys.stderr)
        return 1
    with store:
        return _run(args, store, specs, examples, data, settings)


def _run(args, store, specs, examples, data, settings) -> int:
    import torch

    from core.modeling import load_frozen_model
    from prompt_store import PromptStoreError

    if args.threads:
        torch.set_num_threads(args.threads)
    frozen = load_frozen_model(args.model or settings.model)
    try:
        table = _score(frozen, store, specs, examples, data, args)
    except (PromptStoreError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from trainer.compare import format_table, record_results

    print(format_table(table))
    try:
        if args.json:
            args.json.write_text(json.dumps(table, indent=2))
            logger.info("wrote %s", args.json)
        if not args.no_record:
            recorded = record_results(store, table, source="softprompt eval")
            if recorded:
                print(f"recorded with {', '.join(recorded)} in {store.location}")
    except (OSError, PromptStoreError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _read(path: Path) -> bytes:
    try:
        data = path.read_bytes()
        data.decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason})") from None
    return data


def _score(frozen, store, specs, examples, data: bytes, args) -> dict:
    from tqdm import tqdm

    from trainer.batches import Encoder
    from trainer.compare import (
        choose_max_new_tokens,
        choose_task,
        data_identity,
        load_references,
        model_scorer,
        run_comparison,
    )

    references = load_references(frozen, store, specs)
    hints = [r.hint for r in references]
    task = choose_task(hints, examples, args.task)
    max_new_tokens = choose_max_new_tokens(hints, args.max_new_tokens, limit=max(args.max_new_tokens or 0, 256))
    score = model_scorer(frozen, Encoder(frozen), task, max_new_tokens=max_new_tokens, batch_size=args.batch_size)
    with tqdm(total=None, desc="eval", unit="part", disable=args.no_progress, file=sys.stderr) as bar:

        def on_progress(progress):
            bar.total = progress.total
            bar.update(progress.done - bar.n)

        return run_comparison(
            score,
            references,
            examples,
            task,
            data=data_identity(data, args.data.name, len(examples)),
            max_new_tokens=max_new_tokens,
            on_progress=on_progress,
        )
