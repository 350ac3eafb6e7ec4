"""Paired A/B of one decode step: plain `nn.Linear` layers against a faster variant of them.

    .venv/bin/python bench/decode_ab.py [--variant served|fused|packed] [--rows 16] [--steps 60] [--profile]

`served` (the default): the engine as the server builds it, both of the following.
`fused` (`FUSED_PROJECTIONS`): q/k/v and gate/up as one matrix product each.
`packed` (`PACKED_WEIGHTS`): every linear layer through a copy of its weight packed for oneDNN.

Two engines, each on its own copy of the model (both variants swap layers in place), hold
the same 16 mixed-prompt rows. Their decode steps alternate (A B, B A, ...) so the VM's drift
hits both alike. The script prints the median step time of each, the median of the per-pair
ratios, and whether both produced the same tokens. Whether a variant pays is a property of
the host's CPU and memory, so measure it on yours. `--profile` then traces 10 more steps of
each engine with torch.profiler and prints where a step's time goes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.engine_bench import anon_mb, rss_mb  # noqa: E402
from bench.serve_bench import QUERIES, host_line, text_prompts  # noqa: E402
from core.modeling import load_frozen_model  # noqa: E402
from devtools.engine_requests import make_job  # noqa: E402
from server.engine import Engine  # noqa: E402
from server.engine.rewrites import prepare_for_serving  # noqa: E402


def fill_rows(engine: Engine, rows: int, *, max_new_tokens: int) -> None:
    """Prefill `rows` requests over the 4 bench prompts into an engine whose thread is not
    running (the caller steps it), then take 3 warm-up decode steps."""
    softs = text_prompts(engine.frozen)
    names = list(softs)
    for i in range(rows):
        name = names[i % len(names)]
        job, _ = make_job(
            engine.tokenizer,
            QUERIES[i % len(QUERIES)],
            softs[name],
            key=(name, 1, "c"),
            max_new_tokens=max_new_tokens,
            ignore_eos=True,
        )
        engine.reserve()
        engine.scheduler.hand_over(job, engine.scheduler.waiting.append)
    engine._admit()
    for _ in range(3):
        engine._decode_step()


VARIANTS = {  # name: the rewrites of the variant (prepare_for_serving; the plain engine turns all three off)
    "served": {"fused_projections": True, "packed_weights": True, "gqa_attention": True},
    "fused": {"fused_projections": True},
    "packed": {"packed_weights": True},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=list(VARIANTS), default="served")
    parser.add_argument("--steps", type=int, default=60, help="decode steps per engine (alternating)")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="also profile 10 steps of each engine")
    parser.add_argument("--model", default=os.environ.get("SOFTPROMPT_MODEL", "default"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plain = {"fused_projections": False, "packed_weights": False, "gqa_attention": False}
    engines, grew = {}, (0.0, 0.0)
    for variant in (False, True):
        frozen = load_frozen_model(args.model, device="cpu")
        before = anon_mb(), rss_mb()
        rewrites = prepare_for_serving(
            frozen.model, max_batch_size=args.rows, **{**plain, **(VARIANTS[args.variant] if variant else {})}
        )
        engines[variant] = Engine(frozen, max_batch_size=args.rows)
        grew = (
            anon_mb() - before[0],
            rss_mb() - before[1],
        )  # what building the variant's engine added (the last one built)
    times: dict[bool, list[float]] = {False: [], True: []}
    with torch.inference_mode():
        for engine in engines.values():  # the same rows in both
            fill_rows(engine, args.rows, max_new_tokens=args.steps + 30)
        for step in range(args.steps):
            for variant in (True, False) if step % 2 else (False, True):
                started = time.perf_counter()
                engines[variant]._decode_step()
                times[variant].append((time.perf_counter() - started) * 1e3)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            for variant, engine in engines.items():  # 10 steps each keeps both at the same length
                with profile(activities=[ProfilerActivity.CPU]) as trace:
                    for _ in range(10):
                        engine._decode_step()
                print(f"--- {args.variant if variant else 'plain'}: 10 decode steps")
                print(trace.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    same = [s.ids for s in engines[False].batch.seqs] == [s.ids for s in engines[True].batch.seqs]
    base, other = statistics.median(times[False]), statistics.median(times[True])
    paired = statistics.median(a / b for a, b in zip(times[False], times[True]))
    detail = (
        f"{rewrites.fused_projection_groups} groups fused, {rewrites.packed_weights_bytes / 2**20:.0f} MB packed; "
        f"building it added {grew[0]:.0f} MB of anonymous memory to the process, RSS {grew[1]:+.0f} MB "
        f"including weight-file pages it read"
    )
    print(host_line())
    print(f"{args.rows} rows, {args.steps} steps each, torch threads {torch.get_num_threads()}")
    print(f"plain nn.Linear  {base:7.1f} ms/step")
    print(f"{args.variant:16s} {other:7.1f} ms/step  ({detail})")
    print(f"{args.variant} speedup   {base / other:.3f}x (median of paired ratios {paired:.3f}x); same tokens: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
