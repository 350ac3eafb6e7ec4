"""How much of a task the frozen model's features carry: a linear probe beside the prompt results.

    .venv/bin/python bench/probe_bench.py --tasks sentiment causal_judgment

A soft prompt can only steer what the frozen network computes. This script measures a
reference point for that: it lays every example out exactly as training and evaluation do
(template head, the init text's token embeddings, query), takes the final hidden state at the
position that predicts the answer, and fits an L2-regularised logistic regression on it with
the TRAIN file's labels (regularisation chosen on a seeded validation split of the train
file). Its accuracy on the TEST file is what a fully supervised linear reader gets from the
frozen features under the init prompt. It is a reference, not an upper bound: a soft prompt
changes what every layer attends to, so prompt tuning can beat it (on sentiment it does, by
about 5 points); a probe near chance says the features hold little of the task at all.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402
from train_bench import DATA, TASKS  # noqa: E402

from core.modeling import load_frozen_model  # noqa: E402
from trainer.batches import Encoder, collate, lay_out, prefix_block  # noqa: E402
from trainer.data import load_examples  # noqa: E402
from trainer.evaluate import detect_task  # noqa: E402
from trainer.loop import init_embeddings  # noqa: E402

logger = logging.getLogger("probe_bench")
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


@torch.inference_mode()
def features(frozen, encoder: Encoder, prefix: torch.Tensor, examples, batch_size: int = 16) -> torch.Tensor:
    """Final-layer hidden state at the answer position for each example: [N, D] fp32."""
    encoded = [encoder.encode(e) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: len(encoded[i].query_ids))
    out = torch.empty(len(examples), frozen.model.config.hidden_size)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([encoded[i] for i in chunk], frozen.tokenizer.pad_token_id, with_targets=False)
        laid = lay_out(frozen, prefix, batch)
        hidden = frozen.model(
            inputs_embeds=laid.inputs_embeds,
            attention_mask=laid.attention_mask,
            position_ids=laid.position_ids,
            output_hidden_states=True,
            logits_to_keep=1,
            use_cache=False,
        ).hidden_states[-1]  # [B, T, D], final norm applied
        out[chunk] = hidden[:, -1].float().cpu()
    return out


def fit_logistic(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by L-BFGS on standardised features."""
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def accuracy(x, y, weight, bias) -> float:
    return float(((x @ weight + bias).argmax(-1) == y).float().mean())


def probe_task(name: str, frozen, max_train: int | None, out: Path) -> dict:
    train_all = load_examples(DATA / f"{name}.train.jsonl")
    test = load_examples(DATA / f"{name}.test.jsonl")
    if max_train and len(train_all) > max_train:
        train_all = random.Random(0).sample(train_all, max_train)
    task = detect_task(train_all)
    encoder = Encoder(frozen)
    prefix = prefix_block(frozen, encoder.head_ids, init_embeddings(frozen, TASKS[name]["init_text"]))
    started = time.perf_counter()
    x_train, x_test = features(frozen, encoder, prefix, train_all), features(frozen, encoder, prefix, test)
    seconds = time.perf_counter() - started
    y_train = torch.tensor([task.labels.index(e.output.strip()) for e in train_all])
    y_test = torch.tensor([task.labels.index(e.output.strip()) for e in test])
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

    order = torch.randperm(len(train_all), generator=torch.Generator().manual_seed(0))
    cut = len(order) // 5
    val_idx, fit_idx = order[:cut], order[cut:]
    val_scores = {}
    for l2 in L2_GRID:
        w, b = fit_logistic(x_train[fit_idx], y_train[fit_idx], len(task.labels), l2)
        val_scores[l2] = accuracy(x_train[val_idx], y_train[val_idx], w, b)
    best_l2 = max(val_scores, key=lambda l2: (val_scores[l2], l2))  # ties: stronger regularisation
    w, b = fit_logistic(x_train, y_train, len(task.labels), best_l2)
    majority = max(float((y_test == c).float().mean()) for c in range(len(task.labels)))
    row = {
        "task": name,
        "train_examples": len(train_all),
        "test_examples": len(test),
        "probe_test_accuracy": accuracy(x_test, y_test, w, b),
        "probe_train_accuracy": accuracy(x_train, y_train, w, b),
        "l2": best_l2,
        "val_by_l2": {f"{k:g}": v for k, v in val_scores.items()},
        "majority_class_test": majority,
        "feature_seconds": seconds,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"probe-{name}.json").write_text(json.dumps(row, indent=2))
    logger.info(
        "%s: probe test accuracy %.3f (train %.3f, l2 %g, majority %.3f); features in %.0f s",
        name,
        row["probe_test_accuracy"],
        row["probe_train_accuracy"],
        best_l2,
        majority,
        seconds,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--max-train", type=int, default=2000, help="train examples to fit on (seeded sample)")
    parser.add_argument("--model", default=os.environ.get("SOFTPROMPT_MODEL", "default"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    frozen = load_frozen_model(args.model)
    rows = [probe_task(t, frozen, args.max_train, args.out) for t in args.tasks]
    print("| task | linear probe on frozen features (test) | majority class | train examples fitted |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['task']} | {100 * r['probe_test_accuracy']:.1f} % | {100 * r['majority_class_test']:.1f} % | "
            f"{r['train_examples']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
