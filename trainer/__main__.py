"""Train an EmbedGrad soft prompt and publish it to the store.

    python -m trainer --data examples/data/sentiment.train.jsonl \\
        --init "Classify the sentiment of this review as positive or negative." \\
        --name sentiment --eval examples/data/sentiment.test.jsonl --steps 100 --lr 3e-3

Same flags as `softprompt train`. Store: --store or $SOFTPROMPT_STORE (default ./prompt-store);
model: --model or $SOFTPROMPT_MODEL (default: the embedded SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import argparse
import logging
import sys

from trainer.cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
