"""The EmbedGrad training loop: Adam on the [P, D] prompt matrix through the frozen model.

One function, `train_prompt`, used unchanged by the CLI, the benchmark and the server's job
runner: progress goes out through `callback` after every optimizer step, cancellation comes
in through `should_stop`. Model selection uses the validation split only.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from core.modeling import FrozenModel
from trainer.batches import Encoded, Encoder, collate, prefix_block, target_loss
from trainer.config import TrainConfig
from trainer.data import Example
from trainer.distributed import current as current_ranks
from trainer.evaluate import detect_task, evaluate
from trainer.interpret import hard_prompt, nearest_tokens
from trainer.trust_region import cosine_stats, project_to_cone

logger = logging.getLogger(__name__)


@dataclass
class TrainProgress:
    step: int
    total: int
    loss: float
    val_metric: float | None  # filled at evaluation steps
    eta_seconds: float | None
    elapsed_seconds: float


@dataclass
class TrainResult:
    embeddings: torch.Tensor  # [P, D] fp32 cpu, the best prompt on validation
    init_embeddings: torch.Tensor  # [P, D] fp32 cpu, the init text's token embeddings
    metrics: dict
    history: list[dict] = field(default_factory=list)
    cosines: list[float] = field(default_factory=list)
    config: TrainConfig | None = None
    final_embeddings: torch.Tensor | None = None  # [P, D] after the last step run (the best may be earlier)


class TrainingCancelled(Exception):
    """`should_stop()` returned True; nothing is published."""


@contextmanager
def _threads(count: int | None):
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _batches(rows: Sequence[Encoded], batch_size: int, seed: int, window: int = 8) -> Iterator[list[Encoded]]:
    """Endless seeded epochs of batches. Each epoch is shuffled, cut into windows of
    `window` batches whose rows are sorted by length (little padding), and the batches of
    the epoch are shuffled again, so long and short batches still alternate at random."""
    generator = torch.Generator().manual_seed(seed)
    length = [len(r.query_ids) + len(r.target_ids) for r in rows]
    while True:
        order = torch.randperm(len(rows), generator=generator).tolist()
        chunks = []
        for start in range(0, len(order), batch_size * window):
            group = sorted(order[start : start + batch_size * window], key=length.__getitem__)
            chunks += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
        for k in torch.randperm(len(chunks), generator=generator).tolist():
            yield [rows[i] for i in chunks[k]]


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to `min_lr_ratio` at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


FIT_MARGIN = 4  # tokens generated past the longest target, so an answer one token longer is still read whole
MAX_FITTED_NEW_TOKENS = 256


def fit_new_tokens(encoder: Encoder, examples: Sequence[Example]) -> int:
    """How many tokens to generate when scoring: the longest target (end of turn included) and a margin."""
    longest = max(len(encoder.layout.target_ids(e.output)) for e in examples)
    return min(MAX_FITTED_NEW_TOKENS, longest + FIT_MARGIN)


def init_embeddings(frozen: FrozenModel, text: str) -> torch.Tensor:
    """The token embeddings of `text`: [P, D] fp32 cpu (a fresh copy)."""
    ids = frozen.tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"init text {text!r} has no tokens")
    with torch.no_grad():
        return frozen.token_embeddings(ids).detach().float().cpu().clone()


def train_prompt(
    frozen: FrozenModel,
    train: list[Example],
    val: list[Example],
    config: TrainConfig,
    *,
    callback: Callable[[TrainProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Optimise the init text's embeddings on `train`, select on `val`, return the best."""
    if not train or not val:
        raise ValueError("train_prompt needs at least one training and one validation example")
    with _threads(config.threads):
        return _train(frozen, train, val, config, callback, should_stop)


def _train(frozen, train, val, config, callback, should_stop) -> TrainResult:
    """One process, or one rank of a data-parallel job (trainer/distributed.py): every rank
    runs the same steps on its shard of each global batch; rank 0 alone evaluates and reports."""
    started = time.perf_counter()
    ranks = current_ranks()
    if ranks.distributed and config.batch_size < ranks.world:
        raise ValueError(f"batch_size {config.batch_size} is smaller than the {ranks.world} ranks sharing each batch")
    torch.manual_seed(config.seed)
    task = detect_task(list(train) + list(val), config.task)
    encoder = Encoder(frozen, use_chat_template=config.use_chat_template, max_input_tokens=config.max_input_tokens)
    if config.max_new_tokens is None:  # recorded with the prompt: evaluations of it generate as long
        config = replace(config, max_new_tokens=fit_new_tokens(encoder, list(train) + list(val)))
    val_set = list(val)[: config.max_eval_examples] if config.max_eval_examples else list(val)

    def run_eval(vectors: torch.Tensor) -> dict:
        return evaluate(
            frozen,
            encoder,
            vectors,
            val_set,
            task,
            batch_size=config.eval_batch_size,
            max_new_tokens=config.max_new_tokens,
        )

    init = init_embeddings(frozen, config.init_text)  # [P, D]
    soft = torch.nn.Parameter(init.clone().to(frozen.device))  # [P, D] fp32, the only trainable tensor
    optimizer = torch.optim.AdamW([soft], lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    batches = _batches([encoder.encode(e) for e in train], config.batch_size, config.seed)
    pad_id = frozen.tokenizer.pad_token_id
    logger.info(
        "EmbedGrad: %s task, %d train / %d validation examples, %d prompt vectors, %d steps",
        task.kind,
        len(train),
        len(val_set),
        init.shape[0],
        config.steps,
    )

    before = run_eval(init) if ranks.is_main else {"name": "", "metric": 0.0}
    best = {"key": (before["metric"], -before.get("loss", 0.0)), "step": 0, "eval": before, "vectors": init.clone()}
    history = [
        {
            "step": 0,
            "split": "validation",
            "val_metric": before["metric"],
            "val_loss": before.get("loss"),
            "elapsed_seconds": time.perf_counter() - started,
        }
    ]
    logger.info("step 0: validation %s %.4f (init text)", before["name"], before["metric"])
    stale, stopped_early, step = 0, False, 0
    loop_started = time.perf_counter()
    for step in range(1, config.steps + 1):
        if ranks.decide(should_stop is not None and ranks.is_main and should_stop()):
            raise TrainingCancelled(f"training cancelled after {step - 1} of {config.steps} steps")
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(config.grad_accum):
            rows = ranks.shard(next(batches))  # every rank draws the same global batch
            loss_sum, tokens = (
                target_loss(frozen, prefix_block(frozen, encoder.head_ids, soft), collate(rows, pad_id))
                if rows
                else (None, 0)
            )  # an epoch's last batch may leave a rank nothing
            total = ranks.sum(tokens)  # the global batch's target tokens: the single-process normalisation
            if loss_sum is not None:
                (loss_sum / total / config.grad_accum).backward()
            step_loss += (
                ranks.sum(float(loss_sum.detach()) if loss_sum is not None else 0.0) / total / config.grad_accum
            )
        if soft.grad is None:
            soft.grad = torch.zeros_like(soft)
        ranks.sum_(soft.grad)
        grad_norm = float(soft.grad.norm())
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([soft], config.max_grad_norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        moved = project_to_cone(soft.data, init.to(soft.device), config.min_cosine, config.projection)
        elapsed = time.perf_counter() - started
        row = {
            "step": step,
            "split": "train",
            "loss": step_loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "projected_rows": moved,
            "elapsed_seconds": elapsed,
        }
        val_metric = None
        if ranks.is_main and (step % config.eval_every == 0 or step == config.steps):
            result = run_eval(soft.detach().cpu())
            val_metric = result["metric"]
            row.update(val_metric=val_metric, val_loss=result.get("loss"))
            key = (val_metric, -result.get("loss", 0.0))
            if key > best["key"]:
                best = {"key": key, "step": step, "eval": result, "vectors": soft.detach().float().cpu().clone()}
                stale = 0
            else:
                stale += 1
            logger.info(
                "step %d/%d: loss %.4f, validation %s %.4f (best %.4f at step %d)",
                step,
                config.steps,
                step_loss,
                result["name"],
                val_metric,
                best["eval"]["metric"],
                best["step"],
            )
        history.append(row)
        per_step = (time.perf_counter() - loop_started) / step
        if callback is not None and ranks.is_main:
            callback(
                TrainProgress(step, config.steps, step_loss, val_metric, per_step * (config.steps - step), elapsed)
            )
        if ranks.decide(config.patience is not None and stale >= config.patience):
            stopped_early = True
            logger.info("early stop at step %d: no validation improvement in %d evaluations", step, stale)
            break

    final = soft.detach().float().cpu().clone()
    if not ranks.is_main:  # rank 0 selects, interprets and reports; this rank's work is done
        return TrainResult(final, init, {"rank": ranks.rank}, history, [], config, final_embeddings=final)
    vectors = best["vectors"]
    hard_vectors, hard_text = hard_prompt(frozen, vectors)
    hard = run_eval(hard_vectors)
    stats = cosine_stats(vectors, init)
    metrics = {
        "task": task.kind,
        "labels": list(task.labels),
        "metric_name": before["name"],
        "val_before": before["metric"],
        "val_after": best["eval"]["metric"],
        "val_hard_prompt": hard["metric"],
        "val_loss_before": before.get("loss"),
        "val_loss_after": best["eval"].get("loss"),
        "val_examples": len(val_set),
        "train_examples": len(train),
        "best_step": best["step"],
        "steps_run": step,
        "stopped_early": stopped_early,
        "train_loss_first": next((h["loss"] for h in history if "loss" in h), None),
        "train_loss_last": history[-1].get("loss"),
        "train_seconds": time.perf_counter() - started,
        "num_virtual_tokens": int(init.shape[0]),
        "cosine_mean": stats["cosine_mean"],
        "cosine_min": stats["cosine_min"],
        "norm_ratio_mean": stats["norm_ratio_mean"],
        "hard_prompt_text": hard_text,
        "nearest_tokens": nearest_tokens(frozen, vectors),
    }
    for key in ("degenerate_fraction",):
        if key in best["eval"]:
            metrics[f"val_{key}"] = best["eval"][key]
    logger.info(
        "done in %.0f s: validation %s %.4f -> %.4f (hard prompt %.4f), cosine mean %.4f min %.4f",
        metrics["train_seconds"],
        before["name"],
        before["metric"],
        metrics["val_after"],
        hard["metric"],
        stats["cosine_mean"],
        stats["cosine_min"],
    )
    return TrainResult(vectors, init, metrics, history, stats["cosines"], config, final_embeddings=final)
