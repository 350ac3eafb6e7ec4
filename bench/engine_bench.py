"""Engine-only benchmark (no HTTP): decode cost of 16 mixed-prompt rows under engine variants.

    .venv/bin/python bench/engine_bench.py [--repeats 2]

Compares, side by side and interleaved (`--repeats` rounds): DynamicCache's re-concatenation
against the growing KV buffer (one column written per step), SDPA's native GQA
(TRANSFORMERS_SDPA_FORCE_GQA=1) against repeat_kv, and plain against oneDNN-packed linear weights
(`packed_weights`, on a second copy of the model, since packing changes the model in place);
the last column is the ratio to the first variant of the same round. Projections are not
fused in any variant (`bench/decode_ab.py` measures fusing and packing, paired).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from bench.serve_bench import QUERIES, text_prompts  # noqa: E402
from core.modeling import load_frozen_model  # noqa: E402
from devtools.engine_requests import make_job  # noqa: E402
from server.engine import Engine  # noqa: E402
from server.engine.packed_linear import pack_linear_layers  # noqa: E402


def run(frozen, softs, *, growing: bool, gqa: bool, rows: int, new_tokens: int) -> tuple[float, float, list]:
    """`frozen` is the packed or the plain model: the variant is in its weights."""
    os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1" if gqa else "0"
    engine = Engine(frozen, max_batch_size=rows, growing_cache=growing)
    engine.start()
    try:
        names = list(softs)
        warm = [
            make_job(frozen.tokenizer, QUERIES[i], softs[n], key=(n, 1, "c"), max_new_tokens=2)
            for i, n in enumerate(names)
        ]
        for job, _ in warm:
            engine.submit(job)
        for _, sink in warm:
            sink.result(300)
        engine.pause()
        jobs = [
            make_job(
                frozen.tokenizer,
                QUERIES[i % len(QUERIES)],
                softs[names[i % 4]],
                key=(names[i % 4], 1, "c"),
                max_new_tokens=new_tokens,
            )
            for i in range(rows)
        ]
        for job, _ in jobs:
            engine.submit(job)
        steps0 = engine.counters["decode_steps"]
        started = time.perf_counter()
        engine.resume()
        done = [sink.result(600)[0] for _, sink in jobs]
        wall = time.perf_counter() - started
        steps = engine.counters["decode_steps"] - steps0
    finally:
        engine.stop()
    tokens = sum(d.completion_tokens for d in done)
    decode_ms = statistics_median([d.decode_ms for d in done]) / max(1, steps)
    return tokens / wall, decode_ms, [d.token_ids for d in done]


def rss_mb() -> float:
    """This process's resident memory, MB (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def anon_mb() -> float:
    """This process's resident anonymous memory, MB (Linux): what it allocated itself. The rest of
    its RSS is file-backed, e.g. pages of the model's safetensors file, which the weights are
    mapped from: those count once read, and the kernel can drop them again."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def statistics_median(values):
    values = sorted(values)
    return values[len(values) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of all variants, interleaved")
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    plain = load_frozen_model("default", device="cpu")
    packed = load_frozen_model("default", device="cpu")
    rss_before, anon_before = rss_mb(), anon_mb()
    weights = pack_linear_layers(packed.model, 16)  # in place, as prepare_for_serving(packed_weights=True) does
    print(
        f"packed {weights / 2**20:.0f} MB of linear weights for 16-row steps: process RSS {rss_before:.0f} -> "
        f"{rss_mb():.0f} MB, anonymous {anon_before:.0f} -> {anon_mb():.0f} MB",
        flush=True,
    )
    softs = text_prompts(plain)
    variants = [  # (growing, gqa, packed)
        (False, False, False),
        (True, False, False),
        (True, True, False),
        (True, False, True),
    ]
    reference = None
    for round_ in range(1, args.repeats + 1):
        first = None
        for growing, gqa, pack in variants:
            tok_s, step_ms, ids = run(
                packed if pack else plain, softs, growing=growing, gqa=gqa, rows=16, new_tokens=args.new_tokens
            )
            reference, first = reference or ids, first or tok_s
            same = sum(a == b for a, b in zip(ids, reference))
            print(
                f"round {round_}: growing={growing!s:5} sdpa_gqa={gqa!s:5} packed={pack!s:5}  {tok_s:6.1f} tok/s  "
                f"~{step_ms:5.1f} ms/step  same tokens {same}/16  {tok_s / first:.2f}x",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
