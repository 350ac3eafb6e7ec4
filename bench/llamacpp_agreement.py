"""Agreement: the llama.cpp engine against the torch engine on the same model, greedy.

    .venv/bin/python bench/llamacpp_agreement.py [--model default] [--json FILE]

50 prompts (25 held-out word problems, 25 held-out movie reviews from examples/data), each
without a soft prompt and with the prompt this repo trained for its task on the default model
(bench/results/<task>/, as bench/train_bench.py chose it; `--results bench/results-qwen` for qwen;
the instruction's own embeddings where none was trained),
served by both engines in batches of 16, greedy, 48 new tokens. Printed: the share of outputs
identical token for token, where the others first diverge, and the largest difference between
the two engines' logits for the first generated token (the torch engine runs the GGUF's weights
dequantized to fp32; llama.cpp runs them as stored, 4-bit, with 8-bit activations).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.modeling import load_frozen_model, resolve_spec  # noqa: E402
from devtools.engine_requests import make_job  # noqa: E402
from server.engine import Engine  # noqa: E402
from server.engine.llamacpp_backend import LlamaCppBackend  # noqa: E402
from server.engine.rewrites import prepare_for_serving  # noqa: E402
from trainer.data import jsonl_lines  # noqa: E402
from trainer.evaluate import answers_match  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = {  # task: (test file, the init instruction of bench/train_bench.py's prompt)
    "word_problems": (
        "examples/data/word_problems.test.jsonl",
        "Solve the problem with short calculations, then write: The answer is <number>.",
    ),
    "sentiment": (
        "examples/data/sentiment.test.jsonl",
        "Classify the sentiment of this movie review as positive or negative.",
    ),
}


def trained_prompt(results: Path, task: str, width: int) -> torch.Tensor | None:
    """The EmbedGrad prompt bench/train_bench.py chose for `task` under `results` (its lr), if any."""
    summary = results / task / "summary.json"
    if not summary.is_file():
        return None
    path = results / task / f"embedgrad-lr{json.loads(summary.read_text())['lr']}.pt"
    soft = torch.load(path) if path.is_file() else None
    return soft if soft is not None and soft.shape[1] == width else None


def cases(frozen, per_task: int, results: Path):
    out = []
    for task, (data, init) in TASKS.items():
        soft = trained_prompt(results, task, frozen.embedding.weight.shape[1])
        if soft is None:  # no trained prompt for this model: the instruction's own embeddings
            soft = frozen.token_embeddings(frozen.tokenizer(init, add_special_tokens=False)["input_ids"])
        records = [json.loads(line) for line in jsonl_lines((ROOT / data).read_text()) if line.strip()][:per_task]
        for i, record in enumerate(records):
            out.append((f"{task}-{i}", record["input"], None, record["output"]))
            out.append((f"{task}-{i}+prompt", record["input"], (task, soft.detach().float()), record["output"]))
    return out


def generate(engine: Engine, tokenizer, batch, max_new_tokens: int) -> list[list[int]]:
    engine.pause()  # submitted together: one prefill, decoded as one batch
    sinks = []
    for _, text, prompt, _ in batch:
        key, soft = (None, None) if prompt is None else ((prompt[0], 1, "bench"), prompt[1])
        job, sink = make_job(tokenizer, text, soft, key=key, max_new_tokens=max_new_tokens)
        engine.submit(job)
        sinks.append(sink)
    engine.resume()
    return [sink.result(600)[0].token_ids for sink in sinks]


def first_logits(engine: Engine, tokenizer, case) -> torch.Tensor:
    """The logits of the first generated token, straight from the backend (engine not running)."""
    _, text, prompt, _ = case
    key, soft = (None, None) if prompt is None else ((prompt[0], 1, "bench"), prompt[1])
    job, _ = make_job(tokenizer, text, soft, key=key)
    state, logits = engine.backend.prefill([job])
    engine.backend.discard(state)
    return logits[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--per-task", type=int, default=25, help="prompts per task (2 tasks)")
    parser.add_argument(
        "--results", type=Path, default=ROOT / "bench/results", help="where train_bench.py put this model's prompts"
    )
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--flash-attention", default="auto", choices=["auto", "on", "off"], help="llama.cpp's")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    frozen = load_frozen_model(args.model, device="cpu")
    resolved = resolve_spec(args.model)
    all_cases = cases(frozen, args.per_task, args.results)
    prepare_for_serving(frozen.model, max_batch_size=16)
    torch_engine = Engine(frozen, max_batch_size=16, threads=threads)
    llama_engine = Engine(
        frozen,
        max_batch_size=16,
        threads=threads,
        backend=LlamaCppBackend(
            frozen,
            resolved.folder / resolved.gguf_file,
            max_rows=16,
            kv_tokens=16384,
            threads=threads,
            flash_attention=args.flash_attention,
        ),
    )
    with torch.inference_mode():
        diffs = [
            (first_logits(torch_engine, frozen.tokenizer, c), first_logits(llama_engine, frozen.tokenizer, c))
            for c in all_cases
        ]
    outputs = {}
    for name, engine in (("torch", torch_engine), ("llamacpp", llama_engine)):
        engine.start()
        started = time.perf_counter()
        outputs[name] = []
        for i in range(0, len(all_cases), 16):
            outputs[name] += generate(engine, frozen.tokenizer, all_cases[i : i + 16], args.max_new_tokens)
        print(f"{name}: {len(all_cases)} generations in {time.perf_counter() - started:.1f} s", flush=True)
        engine.stop()

    rows = []
    for case, a, b, (la, lb) in zip(all_cases, outputs["torch"], outputs["llamacpp"], diffs):
        diverge = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if diverge is None and len(a) != len(b):
            diverge = min(len(a), len(b))
        rows.append(
            {
                "case": case[0],
                "soft_prompt": case[2] is not None,
                "identical": diverge is None,
                "first_divergence": diverge,
                "max_logit_diff": float((la - lb).abs().max()),
                "logit_std": float(la.std()),
                "same_first_token": int(la.argmax()) == int(lb.argmax()),
            }
        )
    print(
        f"model {frozen.base_model}; {args.max_new_tokens} new tokens, greedy; batches of 16; {threads} threads; "
        f"llama.cpp flash attention {args.flash_attention}"
    )
    summary = {}
    for label, subset in (
        ("without a soft prompt", [r for r in rows if not r["soft_prompt"]]),
        ("with a soft prompt", [r for r in rows if r["soft_prompt"]]),
        ("all", rows),
    ):
        split = [r["first_divergence"] for r in subset if not r["identical"]]
        summary[label] = {
            "prompts": len(subset),
            "identical": sum(r["identical"] for r in subset),
            "same_first_token": sum(r["same_first_token"] for r in subset),
            "first_divergence_median": statistics.median(split) if split else None,
            "first_divergence_min": min(split) if split else None,
            "max_logit_diff": max(r["max_logit_diff"] for r in subset),
            "logit_std_mean": statistics.mean(r["logit_std"] for r in subset),
        }
        s = summary[label]
        print(
            f"{label:<22} identical {s['identical']}/{s['prompts']} ({100 * s['identical'] / s['prompts']:.0f} %); "
            f"same first token {s['same_first_token']}/{s['prompts']}; the others first differ at token "
            f"{s['first_divergence_median']} (median, earliest {s['first_divergence_min']}); max |logit diff| "
            f"at the first token {s['max_logit_diff']:.3f} (logits' std {s['logit_std_mean']:.2f})"
        )
    # Does the trained prompt still do its job through llama.cpp? Word problems are scored by their answer.
    for label, with_prompt in (("without a soft prompt", False), ("with the trained prompt", True)):
        picked = [
            (case, a, b)
            for case, a, b in zip(all_cases, outputs["torch"], outputs["llamacpp"])
            if case[0].startswith("word_problems") and (case[2] is not None) == with_prompt
        ]
        right = {
            "torch": [answers_match(frozen.tokenizer.decode(a, skip_special_tokens=True), c[3]) for c, a, _ in picked],
            "llamacpp": [
                answers_match(frozen.tokenizer.decode(b, skip_special_tokens=True), c[3]) for c, _, b in picked
            ],
        }
        same = sum(x == y for x, y in zip(right["torch"], right["llamacpp"]))
        summary[f"word_problems {label}"] = {k: sum(v) for k, v in right.items()} | {"same_verdict": same}
        print(
            f"word problems {label}: answered right torch {sum(right['torch'])}/{len(picked)}, llama.cpp "
            f"{sum(right['llamacpp'])}/{len(picked)}; the same verdict on {same}/{len(picked)}"
        )
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
