"""Read and write PEFT prompt-tuning adapter folders (adapter_config.json + safetensors).

A published version is a valid PEFT adapter: `PeftModel.from_pretrained(model, folder)`
loads it. We write the config by hand so the store does not need `peft` installed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load, save

from core.untrusted import is_text, parse_json
from prompt_store.errors import InvalidAdapterError, InvalidShapeError, NonFiniteValuesError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TENSOR_KEY = "prompt_embeddings"
TEXT_FIELDS = ("prompt_tuning_init_text", "base_model_name_or_path")  # kept with an imported prompt


def adapter_config(
    *,
    num_virtual_tokens: int,
    token_dim: int,
    base_model: str,
    init_text: str | None,
    num_layers: int | None = None,
    num_attention_heads: int | None = None,
) -> dict:
    """The adapter_config.json PEFT writes for a TEXT-initialised prompt-tuning adapter."""
    return {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": num_virtual_tokens,
        "token_dim": token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": num_attention_heads,
        "num_layers": num_layers,
        "prompt_tuning_init": "TEXT" if init_text else "RANDOM",
        "prompt_tuning_init_text": init_text,
        "tokenizer_name_or_path": base_model,
        "base_model_name_or_path": base_model,
        "inference_mode": True,
        "revision": None,
        "modules_to_save": None,
    }


def validate_tensor(tensor: torch.Tensor, *, where: str) -> torch.Tensor:
    """Check a prompt tensor is a finite 2-D floating matrix; return it as contiguous fp32."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or 0 in tensor.shape:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise InvalidShapeError(f"{where}: expected a [num_virtual_tokens, hidden_size] matrix, got {shape}.")
    if not tensor.is_floating_point():
        raise InvalidShapeError(f"{where}: expected floating-point values, got {tensor.dtype}.")
    if not torch.isfinite(tensor).all():
        raise NonFiniteValuesError(f"{where}: the prompt tensor holds NaN or infinite values.")
    return tensor.detach().to("cpu", torch.float32).contiguous()


def serialize_tensor(tensor: torch.Tensor) -> bytes:
    """The bytes of adapter_model.safetensors for a [P, D] prompt."""
    return save({TENSOR_KEY: tensor}, metadata={"format": "pt"})


def read_adapter(folder: Path) -> tuple[torch.Tensor, dict]:
    """Read a PEFT prompt-tuning adapter folder; return its [P, D] tensor and config."""
    folder = Path(folder)
    files = {}
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        try:
            files[name] = (folder / name).read_bytes() if (folder / name).is_file() else None
        except OSError as exc:
            raise InvalidAdapterError(f"{folder / name}: not readable ({exc.strerror}).") from exc
    return adapter_from_bytes(files[ADAPTER_CONFIG], files[ADAPTER_WEIGHTS], where=str(folder))


def adapter_from_bytes(
    config: bytes | None, weights: bytes | None, *, where: str, join: str = "/"
) -> tuple[torch.Tensor, dict]:
    """A PEFT prompt-tuning adapter's [P, D] tensor and config from its two files' bytes (None:
    missing). Errors name the adapter `where` and a file in it as where + join + file name."""
    if config is None or weights is None:
        raise InvalidAdapterError(
            f"{where}: a PEFT prompt-tuning adapter needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}."
        )
    config_where = f"{where}{join}{ADAPTER_CONFIG}"
    parsed = _config_from_bytes(config, where=config_where)
    if parsed.get("peft_type") != "PROMPT_TUNING":
        raise InvalidAdapterError(
            f"{config_where}: peft_type is {parsed.get('peft_type')!r}; only PROMPT_TUNING adapters hold soft prompts."
        )
    return weights_from_bytes(weights, where=f"{where}{join}{ADAPTER_WEIGHTS}"), parsed


def _config_from_bytes(data: bytes, *, where: str) -> dict:
    """adapter_config.json: a UTF-8 JSON object whose text fields we use are valid text."""
    try:
        config = parse_json(data)
    except ValueError as exc:
        raise InvalidAdapterError(f"{where}: {exc}.") from None
    if not isinstance(config, dict):
        raise InvalidAdapterError(
            f"{where}: must be a JSON object of PEFT settings, got a JSON {type(config).__name__}."
        )
    for key in TEXT_FIELDS:
        value = config.get(key)
        if value is not None and not (isinstance(value, str) and is_text(value)):
            raise InvalidAdapterError(f"{where}: {key} must be a text string or null.")
    return config


def weights_from_bytes(data: bytes, *, where: str) -> torch.Tensor:
    """The validated `prompt_embeddings` tensor of adapter_model.safetensors held in memory."""
    try:
        tensors = load(data)
    except Exception as exc:
        raise InvalidAdapterError(f"{where}: not a readable safetensors file ({exc}).") from exc
    return _prompt_tensor(tensors, where=where)


def _prompt_tensor(tensors: dict[str, torch.Tensor], *, where: str) -> torch.Tensor:
    if TENSOR_KEY not in tensors:
        raise InvalidAdapterError(f"{where}: no {TENSOR_KEY!r} tensor (found {sorted(tensors)}).")
    return validate_tensor(tensors[TENSOR_KEY], where=where)
