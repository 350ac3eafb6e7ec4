"""HF PEFT prompt tuning (TEXT init) with the same data, batches, steps and schedule as ours.

PEFT puts its virtual tokens before the WHOLE sequence (before the chat template's system
turn), ours at the start of the user turn. Batches are right-padded here because PEFT's
prompt-tuning forward does not pass mask-aware position ids (PEFT #1093); right padding keeps
every real token at its true position. Validation and test use our scorer with
`placement="sequence_start"`, i.e. exactly PEFT's layout [soft][template head][query]
(`check_equivalence` verifies the logits match PEFT's own forward).
"""

from __future__ import annotations

import logging
import tempfile
import time

import torch
from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

from core.modeling import FrozenModel
from core.prepend import IGNORE_INDEX, prepend_soft_prompt
from trainer.batches import Encoded, Encoder, prefix_block
from trainer.config import TrainConfig
from trainer.evaluate import Task, evaluate
from trainer.loop import _batches, init_embeddings, lr_factor

logger = logging.getLogger(__name__)


def _right_padded(rows: list[Encoded], head: tuple[int, ...], pad_id: int) -> dict[str, torch.Tensor]:
    seqs = [head + r.query_ids + r.target_ids for r in rows]
    width = max(map(len, seqs))
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    for i, (row, seq) in enumerate(zip(rows, seqs)):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(seq) - len(row.target_ids) : len(seq)] = torch.tensor(row.target_ids)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def check_equivalence(peft_model, frozen: FrozenModel, encoder: Encoder, row: Encoded, soft: torch.Tensor) -> float:
    """Max |logit| difference between PEFT's forward and our sequence_start layout."""
    ids = torch.tensor([encoder.head_ids + row.query_ids])
    theirs = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -ids.shape[1] :]
    query = torch.tensor([row.query_ids])
    laid = prepend_soft_prompt(
        prefix_block(frozen, encoder.head_ids, soft, "sequence_start"), frozen.embedding(query), torch.ones_like(query)
    )
    ours = frozen.model(
        inputs_embeds=laid.inputs_embeds, attention_mask=laid.attention_mask, position_ids=laid.position_ids
    ).logits[0, -ids.shape[1] :]
    return float((theirs - ours).abs().max())


def train_peft(frozen: FrozenModel, train: list, val: list, config: TrainConfig, task: Task) -> dict:
    """Train a PEFT prompt on a freshly loaded `frozen` (PEFT wraps its model); returns "
    "{"embeddings", "val_before", "val_after", "best_step", "history", "seconds"}."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    encoder = Encoder(frozen, max_input_tokens=config.max_input_tokens)
    val_set = val[: config.max_eval_examples] if config.max_eval_examples else val
    init = init_embeddings(frozen, config.init_text)
    with tempfile.TemporaryDirectory() as folder:
        frozen.tokenizer.save_pretrained(folder)
        peft_config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            prompt_tuning_init=PromptTuningInit.TEXT,
            prompt_tuning_init_text=config.init_text,
            num_virtual_tokens=init.shape[0],
            tokenizer_name_or_path=folder,
        )
        model = get_peft_model(frozen.model, peft_config)  # wraps `frozen.model`: pass a fresh copy
    start_prompt = model.get_prompt_embedding_to_save("default").float().cpu()
    assert torch.equal(start_prompt, init), "PEFT's TEXT init differs from the init text's embeddings"
    rows = [encoder.encode(e) for e in train]
    logger.info(
        "PEFT vs our sequence_start layout: max logit diff %.2e",
        check_equivalence(model, frozen, encoder, rows[0], init),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    batches = _batches(rows, config.batch_size, config.seed)

    def run_eval(vectors):
        return evaluate(
            frozen,
            encoder,
            vectors,
            val_set,
            task,
            batch_size=config.eval_batch_size,
            placement="sequence_start",
            max_new_tokens=config.max_new_tokens,
        )

    before = run_eval(init)
    best = {
        "key": (before["metric"], -before.get("loss", 0.0)),
        "step": 0,
        "metric": before["metric"],
        "vectors": init.clone(),
    }
    history = [{"step": 0, "val_metric": before["metric"]}]
    for step in range(1, config.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss_value = 0.0
        for _ in range(config.grad_accum):
            out = model(**_right_padded(next(batches), encoder.head_ids, frozen.tokenizer.pad_token_id))
            (out.loss / config.grad_accum).backward()
            loss_value += float(out.loss.detach()) / config.grad_accum
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        row = {"step": step, "loss": loss_value}
        if step % config.eval_every == 0 or step == config.steps:
            vectors = model.get_prompt_embedding_to_save("default").float().cpu()
            result = run_eval(vectors)
            row["val_metric"] = result["metric"]
            key = (result["metric"], -result.get("loss", 0.0))
            if key > best["key"]:
                best = {"key": key, "step": step, "metric": result["metric"], "vectors": vectors.clone()}
            logger.info("PEFT step %d/%d: loss %.4f, validation %.4f", step, config.steps, loss_value, result["metric"])
        history.append(row)
    return {
        "embeddings": best["vectors"],
        "val_before": before["metric"],
        "val_after": best["metric"],
        "best_step": best["step"],
        "history": history,
        "seconds": time.perf_counter() - started,
    }
