"""Held-out metrics for a soft prompt: label accuracy or exact match of generated answers.

- classification: each label's tokens (+ end-of-turn) are scored by summed log-probability
  after the query and the best-scoring label is the prediction ("scoring restricted to the
  label set"). The query is run once; its KV cache is repeated for each label's continuation.
- generation: greedy decoding, then the answer is compared. A numeric answer (a target that is a
  number, or a worked solution ending "The answer is 71.") is read from the output as the number
  after "The answer is", else its last number, and compared by value; any other answer by exact
  match of the normalized first line. Outputs that collapse into loops are flagged (the
  repetition/entropy guard).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from core.modeling import FrozenModel
from trainer.batches import Encoded, Encoder, collate, lay_out, prefix_block
from trainer.data import Example

logger = logging.getLogger(__name__)

MAX_LABELS = 10


@dataclass(frozen=True)
class Task:
    kind: str  # "classification" | "generation"
    labels: tuple[str, ...] = ()


def detect_task(examples: Sequence[Example], requested: str = "auto") -> Task:
    """Classification when outputs take few values (<= 10 distinct, each seen >= 2 times)."""
    counts = Counter(e.output.strip() for e in examples)
    looks_like_labels = len(counts) <= MAX_LABELS and min(counts.values()) >= 2
    if requested == "generation" or (requested == "auto" and not looks_like_labels):
        return Task("generation")
    if len(counts) > 50:
        raise ValueError(f"task 'classification' needs a small label set; the data has {len(counts)} distinct outputs")
    return Task("classification", tuple(sorted(counts)))


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"answer is\s*:?\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?|-?\.\d+)", re.IGNORECASE)


def normalize_answer(text: str) -> str:
    """Lower-case, first line, no surrounding punctuation, single spaces; numbers by value."""
    lines = text.strip().splitlines()
    text = lines[0] if lines else ""
    text = " ".join(text.lower().split()).strip(" .,:;!?\"'`()[]")
    return text


def extract_answer(text: str) -> str | None:
    """The number a text answers with: the one after "The answer is", else its last number; None without one."""
    stated = _ANSWER_IS.search(text)
    if stated is not None:
        return stated.group(1).rstrip(".")
    numbers = _NUMBER.findall(text)
    return numbers[-1].rstrip(".") if numbers else None


def numeric_answer(target: str) -> str | None:
    """A target's numeric answer when it has one: a bare number, or a worked solution that states it."""
    if _NUMBER.fullmatch(normalize_answer(target)) or _ANSWER_IS.search(target):
        return extract_answer(target)
    return None


def answers_match(prediction: str, target: str) -> bool:
    expected = numeric_answer(target)
    if expected is not None:
        found = extract_answer(prediction)
        return found is not None and _as_number(found) == _as_number(expected)
    return normalize_answer(prediction) == normalize_answer(target)


def _as_number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return math.nan


def is_degenerate(token_ids: Sequence[int], *, min_len: int = 8) -> bool:
    """True when an output loops: a 1-4 token pattern repeated 3+ times at its end, or a
    unigram entropy under 1.5 bits (a few tokens over and over)."""
    ids = list(token_ids)
    if len(ids) < min_len:
        return False
    for n in range(1, 5):
        if len(ids) >= 3 * n and ids[-n:] * 3 == ids[-3 * n :]:
            return True
    counts = Counter(ids)
    entropy = -sum(c / len(ids) * math.log2(c / len(ids)) for c in counts.values())
    return entropy < 1.5


@torch.no_grad()
def score_labels(
    frozen: FrozenModel, prefix: torch.Tensor, queries: Sequence[Encoded], label_ids: Sequence[Sequence[int]]
) -> torch.Tensor:
    """Summed log-prob of each label's tokens after each query: [B, L]."""
    batch = collate(queries, frozen.tokenizer.pad_token_id, with_targets=False)
    laid = lay_out(frozen, prefix, batch)
    out = frozen.model(
        inputs_embeds=laid.inputs_embeds,
        attention_mask=laid.attention_mask,
        position_ids=laid.position_ids,
        use_cache=True,
        logits_to_keep=1,
    )
    rows, n_labels, device = len(queries), len(label_ids), frozen.device
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]
    scores = first[:, [ids[0] for ids in label_ids]]  # [B, L]
    longest = max(len(ids) for ids in label_ids)
    if longest == 1:
        return scores
    # Continue every query with every label: feed label tokens 1..n-1 after a repeated cache.
    feed = torch.full((n_labels, longest - 1), frozen.tokenizer.pad_token_id, dtype=torch.long)  # [L, n-1]
    wanted = torch.full((n_labels, longest - 1), -1, dtype=torch.long)  # [L, n-1] next tokens
    for j, ids in enumerate(label_ids):
        feed[j, : len(ids) - 1] = torch.tensor(ids[:-1])
        wanted[j, : len(ids) - 1] = torch.tensor(ids[1:])
    cache = out.cache
    cache.batch_repeat_interleave(n_labels)
    feed, wanted = feed.repeat(rows, 1).to(device), wanted.repeat(rows, 1).to(device)  # [B*L, n-1]
    mask = torch.cat([laid.attention_mask.repeat_interleave(n_labels, 0), (wanted >= 0).long()], dim=1)
    positions = laid.position_ids[:, -1:].repeat_interleave(n_labels, 0) + 1 + torch.arange(longest - 1, device=device)
    logits = frozen.model(
        input_ids=feed, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
    ).logits
    logp = (
        torch.log_softmax(logits.float(), dim=-1).gather(-1, wanted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    )  # [B*L, n-1]
    rest = (logp * (wanted >= 0)).sum(-1).view(rows, n_labels)  # [B, L]
    return scores + rest


@torch.no_grad()
def generate(
    frozen: FrozenModel, prefix: torch.Tensor, queries: Sequence[Encoded], max_new_tokens: int
) -> list[list[int]]:
    """Greedy continuation of each query (new token ids, without end-of-turn and padding)."""
    batch = collate(queries, frozen.tokenizer.pad_token_id, with_targets=False)
    laid = lay_out(frozen, prefix, batch)
    out = frozen.model.generate(
        inputs_embeds=laid.inputs_embeds,
        attention_mask=laid.attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=frozen.tokenizer.pad_token_id,
        eos_token_id=frozen.tokenizer.eos_token_id,
    )
    stop = {frozen.tokenizer.pad_token_id, frozen.tokenizer.eos_token_id}
    results = []
    for row in out.tolist():
        tokens = []
        for token in row:
            if token in stop:
                break
            tokens.append(token)
        results.append(tokens)
    return results


def evaluate(
    frozen: FrozenModel,
    encoder: Encoder,
    soft: torch.Tensor,
    examples: Sequence[Example],
    task: Task,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    keep_predictions: int = 0,
    placement: str = "user_turn",
    per_example: bool = False,
) -> dict:
    """Metric of `soft` ([P, D]) on `examples`: {"metric", "name", "n", ...}. Batches are
    sorted by length so little compute is spent on padding. With `per_example`, also
    "correct" (bools) and "predictions" (texts), one per example in their order."""
    prefix = prefix_block(frozen, encoder.head_ids, soft.detach(), placement)  # [H+P, D]
    encoded = [encoder.encode(e) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: len(encoded[i].query_ids))
    correct, degenerate, loss_sum, loss_tokens, predictions, outcomes = 0, 0, 0.0, 0, {}, {}
    label_ids = [encoder.layout.target_ids(label) for label in task.labels]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        queries = [encoded[i] for i in chunk]
        if task.kind == "classification":
            scores = score_labels(frozen, prefix, queries, label_ids)  # [B, L]
            best = scores.argmax(-1).tolist()
            for row, i in enumerate(chunk):  # teacher-forced loss of the gold label
                if examples[i].output.strip() not in task.labels:
                    continue
                gold = task.labels.index(examples[i].output.strip())
                loss_sum -= float(scores[row, gold])
                loss_tokens += len(label_ids[gold])
            texts = [task.labels[b] for b in best]
            hits = [text == examples[i].output.strip() for text, i in zip(texts, chunk)]
        else:
            outputs = generate(frozen, prefix, queries, max_new_tokens)
            texts = frozen.tokenizer.batch_decode(outputs, skip_special_tokens=True)
            hits = [answers_match(text, examples[i].output) for text, i in zip(texts, chunk)]
            degenerate += sum(is_degenerate(ids) for ids in outputs)
        correct += sum(hits)
        predictions.update(zip(chunk, texts))
        outcomes.update(zip(chunk, hits))
    n = len(examples)
    result = {
        "metric": correct / n if n else 0.0,
        "name": "accuracy" if task.kind == "classification" else "exact_match",
        "n": n,
    }
    if per_example:  # in the order of `examples`
        result["correct"] = [outcomes[i] for i in range(n)]
        result["predictions"] = [predictions[i] for i in range(n)]
    if loss_tokens:
        result["loss"] = loss_sum / loss_tokens
    if task.kind == "generation":
        result["degenerate_fraction"] = degenerate / n if n else 0.0
        if result["degenerate_fraction"] > 0.2:
            logger.warning(
                "%.0f%% of generated outputs loop or collapse (repetition guard)", 100 * result["degenerate_fraction"]
            )
    if keep_predictions:
        result["samples"] = [
            {"input": examples[i].input[:200], "output": examples[i].output, "predicted": predictions[i]}
            for i in range(min(keep_predictions, n))
        ]
    return result
