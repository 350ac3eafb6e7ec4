"""Does a published math prompt, served by /generate?prompt=math, answer at its measured rate?

    .venv/bin/python bench/math_serve.py --task arithmetic --results bench/results

Takes the prompt train_bench.py chose for the task (seed 0, its best lr), publishes it as
`math-v1` in a fresh store, starts the server on the default model around that store, and asks
`POST /generate?prompt=math` every held-out problem (greedy, 16 at a time). It prints three
rates on the same test file, side by side:
- what train_bench measured for that prompt (the trainer's own evaluation),
- what the served prompt answers over HTTP (exact match of the extracted number),
- what `POST /eval` reports for math (the server's evaluation job), with the init text and
  no prompt beside it, as the table `softprompt eval` prints.
The report is also written to `<results>/<task>/served.txt`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

import prompt_store  # noqa: E402,F401  (sets how torch's threads wait, before torch loads)
from core.modeling import load_frozen_model  # noqa: E402
from prompt_store import open_store  # noqa: E402
from server.app import create_app  # noqa: E402
from server.settings import Settings  # noqa: E402
from trainer.compare import format_table  # noqa: E402
from trainer.data import load_examples  # noqa: E402
from trainer.evaluate import answers_match  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
logger = logging.getLogger("math_serve")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="arithmetic", choices=["arithmetic", "asdiv"])
    parser.add_argument("--results", type=Path, default=Path("bench/results"))
    parser.add_argument("--model", default="default")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2"):  # one line per request
        logging.getLogger(noisy).setLevel(logging.WARNING)

    summary = json.loads((args.results / args.task / "summary.json").read_text())
    key = f"embedgrad-lr{summary['lr']:g}"
    run = json.loads((args.results / args.task / f"{key}.json").read_text())
    vectors = torch.load(args.results / args.task / f"{key}.pt")
    measured = json.loads((args.results / args.task / f"test-{key}.json").read_text())["metric"]
    test_path = DATA / f"{args.task}.test.jsonl"
    test = load_examples(test_path)
    config = run["config"]

    frozen = load_frozen_model(args.model)
    with tempfile.TemporaryDirectory() as folder:
        store = open_store(folder)
        store.publish(
            "math",
            vectors,
            fingerprint=frozen.fingerprint,
            base_model=frozen.base_model,
            init_text=config["init_text"],
            training_config=config,
            metrics=run["metrics"],
        )
        with TestClient(create_app(Settings(model=args.model, store=folder, api_key=None), frozen=frozen)) as client:
            started = time.perf_counter()

            def ask(example):
                answer = client.post(
                    "/generate",
                    params={"prompt": "math"},
                    json={"input": example.input, "max_new_tokens": config["max_new_tokens"], "temperature": 0},
                )
                answer.raise_for_status()
                return answer.json()

            with ThreadPoolExecutor(args.concurrency) as pool:
                answers = list(pool.map(ask, test))
            served_seconds = time.perf_counter() - started
            assert {a["prompt"] for a in answers} == {"math-v1"}
            served = sum(answers_match(a["text"], e.output) for a, e in zip(answers, test)) / len(test)

            job = client.post(
                "/eval",
                files={"file": (test_path.name, test_path.read_bytes(), "application/jsonl")},
                data={"prompt": ["math"], "text": [config["init_text"]], "bare": "true"},
            ).json()
            while (state := client.get(f"/eval/{job['id']}").json())["state"] in ("queued", "running"):
                time.sleep(2)
            if state["state"] != "succeeded":
                raise SystemExit(f"eval job {state['state']}: {state['error']}")
            table = state["table"]
            kept = client.get("/prompts/math-v1").json()["evaluations"]
    evaluated = table["results"][0]["score"]
    lines = [
        format_table(table),
        "",
        f"{args.task}: {len(test)} held-out problems, prompt {key} (seed 0) published as math-v1",
        f"  train_bench's test exact match          {100 * measured:5.1f} %",
        f"  POST /generate?prompt=math (greedy)      {100 * served:5.1f} %   ({served_seconds:.0f} s for {len(test)} "
        "requests)",
        f"  POST /eval, math                          {100 * evaluated:5.1f} %   (recorded with math-v1: {len(kept)} "
        "evaluation)",
    ]
    bare_numbers = sum(NUMBER.fullmatch(a["text"].strip()) is not None for a in answers)
    lines.append(f"  served answers that are a number and nothing else: {bare_numbers} of {len(test)}")
    lines.append("  /eval answers that are a number and nothing else, by reference:")
    for result in table["results"]:
        label = result["reference"]
        numbers = sum(NUMBER.fullmatch(row["predicted"][label].strip()) is not None for row in table["examples"])
        lines.append(f"    {label[:40]:<40} {numbers:3d} / {len(table['examples'])}")
    if args.task == "arithmetic":
        lines.append("  served exact match by operation and operand size:")
        lines += [
            f"    {kind:<24} {hits:3d} / {total:3d}" for kind, (hits, total) in sorted(by_kind(test, answers).items())
        ]
    report = "\n".join(lines) + "\n"
    print(report, end="")
    out = args.results / args.task / "served.txt"
    out.write_text(report)
    logger.info("wrote %s", out)
    return 0


NUMBER = re.compile(r"-?\d+")


def by_kind(test, answers) -> dict[str, tuple[int, int]]:
    """Exact match per operation and operand size, read back from each problem and its answer."""
    counts: dict[str, list[int]] = {}
    for example, answer in zip(test, answers):
        a, b = (int(n) for n in NUMBER.findall(example.input)[:2])
        result = int(example.output)
        op = "+" if a + b == result else "-" if abs(a - b) == result else "x"  # "Subtract 26 from 88": b - a
        kind = f"{op} {'2-digit' if max(a, b) < 100 else 'with a 3-digit operand'}"
        tally = counts.setdefault(kind, [0, 0])
        tally[0] += answers_match(answer["text"], example.output)
        tally[1] += 1
    return {k: (v[0], v[1]) for k, v in counts.items()}


if __name__ == "__main__":
    sys.exit(main())
