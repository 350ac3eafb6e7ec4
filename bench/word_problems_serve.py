"""A word-problem prompt trained through POST /train, served by /generate, against its instruction.

    .venv/bin/python bench/word_problems_serve.py --model qwen2.5-coder-0.5b --results bench/results-qwen

Starts `softprompt serve` on the model with a fresh folder store and, in one run:
1. publishes the instruction's own token embeddings as `instruction-v1` (a soft prompt that is
   exactly the text, tests/test_families.py), then trains `wordprob` from that instruction over
   HTTP (`POST /train`, the worked-solution training file, the settings train_bench chose on
   validation), timing each step and the job process's peak memory;
2. asks `/generate?prompt=wordprob` and `/generate?prompt=instruction` every held-out problem
   (greedy, at most 40 new tokens, 16 at a time) and scores each answer by the number after
   "The answer is", else the last number;
3. runs `POST /eval` (the trained prompt and the instruction as text) and `softprompt eval` on
   the same file, whose scores (with their 95 % intervals) must equal what /generate served;
4. prints train_bench's HF PEFT prompt tuning on the same test file beside it.
The report goes to `<results>/word_problems/served.txt`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

import httpx  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save  # noqa: E402

from core.modeling import load_frozen_model  # noqa: E402
from devtools.local_servers import start_server, stop_at_exit  # noqa: E402
from devtools.postgres import free_port  # noqa: E402
from trainer.compare import format_table  # noqa: E402
from trainer.data import jsonl_lines, load_examples  # noqa: E402
from trainer.evaluate import answers_match  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
MAX_NEW_TOKENS = 40


def peak_memory_mb(server_pid: int) -> float:
    """The largest peak RSS (VmHWM) among the server's job processes now."""
    peak = 0.0
    for children in Path(f"/proc/{server_pid}/task").glob("*/children"):
        for pid in children.read_text().split():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                if "jobs.process" in Path(f"/proc/{pid}/cmdline").read_text():
                    peak = max(peak, int(status.split("VmHWM:")[1].split()[0]) / 1024)
            except (FileNotFoundError, IndexError, ProcessLookupError):
                continue
    return peak


def train_over_http(base: str, pid: int, settings: dict, train_rows: list[dict]) -> tuple[dict, float]:
    body = {
        "name": "wordprob",
        "init": settings["init_text"],
        "examples": train_rows,
        "steps": settings["steps"],
        "lr": settings["lr"],
        "task": "generation",
        "max_new_tokens": MAX_NEW_TOKENS,
        "eval_fraction": settings["eval_fraction"],
        "config": {k: settings[k] for k in ("batch_size", "eval_every", "max_eval_examples", "warmup_steps", "seed")}
        | {"projection": settings.get("projection", "keep_norm")},  # runs saved before the field: keep_norm
    }
    answer = httpx.post(f"{base}/train", json=body, timeout=120)
    answer.raise_for_status()
    job_id, peak, shown = answer.json()["id"], 0.0, -1
    while (job := httpx.get(f"{base}/train/{job_id}", timeout=60).json())["state"] in ("queued", "running"):
        peak = max(peak, peak_memory_mb(pid))
        if job["step"] != shown:
            shown = job["step"]
            print(
                f"  job {job_id}: {job['state']} step {job['step']}/{job['total']} loss {job['loss']} "
                f"val {job['val_metric']}",
                flush=True,
            )
        time.sleep(2)
    if job["state"] != "succeeded":
        raise SystemExit(f"the training job {job['state']}: {job['error']}")
    return httpx.get(f"{base}/train/{job_id}/curve", timeout=60).json() | {"record": job}, peak


def served_rate(base: str, prompt: str, test) -> tuple[float, list[str], float]:
    def ask(example):
        answer = httpx.post(
            f"{base}/generate",
            params={"prompt": prompt},
            timeout=600,
            json={"input": example.input, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 0},
        )
        answer.raise_for_status()
        return answer.json()["text"]

    started = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(ask, test))
    return (
        sum(answers_match(t, e.output) for t, e in zip(texts, test)) / len(test),
        texts,
        time.perf_counter() - started,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--results", type=Path, default=Path("bench/results-qwen"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-test", type=int, default=None, help="only the first N held-out problems (a quick check)")
    args = parser.parse_args(argv)
    summary = json.loads((args.results / "word_problems" / "summary.json").read_text())
    run = json.loads((args.results / "word_problems" / f"embedgrad-lr{summary['lr']:g}.json").read_text())
    settings = run["config"]  # the settings train_bench chose on validation (seed 0)
    test_path = DATA / "word_problems.test.jsonl"
    if args.max_test is not None:  # the first N records of the same file, as written
        first = jsonl_lines(test_path.read_text())[: args.max_test]
        test_path = Path(tempfile.mkdtemp()) / test_path.name
        test_path.write_text("\n".join(first) + "\n")
    test = load_examples(test_path)
    train_rows = [json.loads(line) for line in (DATA / "word_problems.train.jsonl").read_text().splitlines()]
    frozen = load_frozen_model(args.model)
    with torch.no_grad():
        ids = frozen.tokenizer(settings["init_text"], add_special_tokens=False).input_ids
        instruction = frozen.token_embeddings(ids).float().contiguous()
    del frozen
    lines = []
    with tempfile.TemporaryDirectory() as folder, ExitStack() as stack:
        env = {"SOFTPROMPT_TRAIN_THREADS": str(args.threads), "SOFTPROMPT_MAX_NEW_TOKENS_LIMIT": "512"}
        port = free_port()
        server = stop_at_exit(
            stack,
            start_server(
                f"{folder}/store", Path(folder) / "server", port, model=args.model, threads=args.threads, env=env
            ),
        )
        base = f"http://127.0.0.1:{port}"
        uploaded = httpx.post(
            f"{base}/prompts",
            data={"name": "instruction"},
            timeout=120,
            files={"file": ("instruction.safetensors", save({"prompt_embeddings": instruction}))},
        )
        uploaded.raise_for_status()
        started = time.perf_counter()
        curve, peak = train_over_http(base, server.pid, settings, train_rows)
        job_seconds = time.perf_counter() - started
        steps = [h for h in curve["history"] if h.get("step")]
        per_step = (steps[-1]["elapsed_seconds"] - steps[0]["elapsed_seconds"]) / max(1, len(steps) - 1)
        trained, trained_texts, trained_s = served_rate(base, "wordprob", test)
        plain, plain_texts, plain_s = served_rate(base, "instruction", test)
        job = httpx.post(
            f"{base}/eval",
            timeout=120,
            files={"file": (test_path.name, test_path.read_bytes())},
            data={"prompt": ["wordprob"], "text": [settings["init_text"]], "max_new_tokens": str(MAX_NEW_TOKENS)},
        )
        job.raise_for_status()
        while (state := httpx.get(f"{base}/eval/{job.json()['id']}", timeout=60).json())["state"] in (
            "queued",
            "running",
        ):
            time.sleep(5)
        if state["state"] != "succeeded":
            raise SystemExit(f"the evaluation job {state['state']}: {state['error']}")
        server_table = state["table"]
        stack.close()  # the server stops before `softprompt eval` loads the model again
        cli_json = Path(folder) / "eval.json"
        subprocess.run(
            [
                str(Path(sys.executable).parent / "softprompt"),
                "eval",
                "--data",
                str(test_path),
                "--prompt",
                "wordprob",
                "--text",
                settings["init_text"],
                "--max-new-tokens",
                str(MAX_NEW_TOKENS),
                "--store",
                f"{folder}/store",
                "--model",
                args.model,
                "--threads",
                str(args.threads),
                "--no-progress",
                "--json",
                str(cli_json),
            ],
            check=True,
        )
        cli_table = json.loads(cli_json.read_text())
    scores = {r["reference"]: r for r in cli_table["results"]}
    lines += [
        f"word problems on {args.model}: {len(test)} held-out problems, "
        f"answers read within {MAX_NEW_TOKENS} new tokens",
        f"  trained through POST /train: {settings['steps']} steps of {settings['batch_size']}, lr {settings['lr']:g}, "
        f"{len(steps)} steps reported, {per_step:.1f} s per step, job {job_seconds / 60:.1f} min from upload to "
        f"published, job process peak memory {peak / 1024:.2f} GB",
        f"  /generate?prompt=wordprob (trained)          {100 * trained:5.1f} %   ({trained_s:.0f} s for {len(test)})",
        f"  /generate?prompt=instruction (the text)      {100 * plain:5.1f} %   ({plain_s:.0f} s for {len(test)})",
        f"  gain over the instruction                     {100 * (trained - plain):+5.1f} points",
        f"  HF PEFT prompt tuning (train_bench, seed 0)  {100 * summary['test_peft']:5.1f} %   "
        f"(3 seeds: {summary['test_peft_by_seed']}; ours {summary['test_after_by_seed']})",
        "",
        "POST /eval on the server:",
        format_table(server_table),
        "",
        "softprompt eval:",
        format_table(cli_table),
        "",
        f"  softprompt eval, wordprob: {100 * scores['wordprob']['score']:.1f} % "
        f"[{100 * scores['wordprob']['ci95'][0]:.1f}, {100 * scores['wordprob']['ci95'][1]:.1f}]"
        f" = /generate {100 * trained:.1f} %: {abs(scores['wordprob']['score'] - trained) < 1e-9}",
        "",
        "first served answers (trained | instruction):",
        *[f"  {a!r} | {b!r}" for a, b in zip(trained_texts[:3], plain_texts[:3])],
    ]
    report = "\n".join(lines) + "\n"
    print(report, end="")
    (args.results / "word_problems" / "served.txt").write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
