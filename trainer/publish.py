"""Publish a training result to the prompt store with everything needed to trust it later."""

from __future__ import annotations

import logging

from core.modeling import FrozenModel
from prompt_store import PromptStore, PromptVersion
from trainer.loop import TrainResult

logger = logging.getLogger(__name__)


def publish_result(
    store: PromptStore,
    name: str,
    frozen: FrozenModel,
    result: TrainResult,
    *,
    parent: str | None = None,
    extra: dict | None = None,
) -> PromptVersion:
    """Publish `result.embeddings` as the next version of `name`.

    Metadata: the training config, metrics (validation before/after, hard-prompt metric,
    test metrics when the caller added them, cosine stats and per-vector cosines, nearest
    tokens, the curve: step, loss and validation metric), the init text, the model fingerprint
    and base model, and layer/head counts for the PEFT adapter config.
    """
    model_config = frozen.model.config
    curve = [{k: row[k] for k in ("step", "loss", "val_metric") if row.get(k) is not None} for row in result.history]
    metrics = {**result.metrics, "cosines": list(result.cosines), "curve": curve}
    version = store.publish(
        name,
        result.embeddings,
        fingerprint=frozen.fingerprint,
        base_model=frozen.base_model,
        init_text=result.config.init_text if result.config else None,
        training_config=result.config.to_dict() if result.config else {},
        metrics=metrics,
        parent=parent,
        extra={"trainer": "embedgrad", **(extra or {})},
        num_layers=getattr(model_config, "num_hidden_layers", None),
        num_attention_heads=getattr(model_config, "num_attention_heads", None),
    )
    logger.info(
        "published %s: validation %s %.4f -> %.4f",
        version.id,
        metrics.get("metric_name"),
        metrics.get("val_before", 0.0),
        metrics.get("val_after", 0.0),
    )
    return version
