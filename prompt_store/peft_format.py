"""Read and write PEFT prompt-tuning adapter folders (adapter_config.json + safetensors).

A published version is a valid PEFT adapter: `PeftModel.from_pretrained(model, folder)`
loads it. We write the config by hand so the store does not need `peft` installed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load, load_file, save

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
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise InvalidAdapterError(
            f"{folder}: a PEFT prompt-tuning adapter needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}."
        )
    config = read_config(config_path)
    if config.get("peft_type") != "PROMPT_TUNING":
        raise InvalidAdapterError(
            f"{config_path}: peft_type is {config.get('peft_type')!r}; only PROMPT_TUNING adapters hold soft prompts."
        )
    return read_weights(weights_path), config


def read_config(path: Path) -> dict:
    """Read adapter_config.json: a UTF-8 JSON object whose text fields we use are valid text."""
    try:
        config = parse_json(path.read_bytes())
    except OSError as exc:
        raise InvalidAdapterError(f"{path}: not readable ({exc.strerror}).") from exc
    except ValueError as exc:
        raise InvalidAdapterError(f"{path}: {exc}.") from None
    if not isinstance(config, dict):
        raise InvalidAdapterError(
            f"{path}: must be a JSON object of PEFT settings, got a JSON {type(config).__name__}."
        )
    for key in TEXT_FIELDS:
        value = config.get(key)
        if value is not None and not (isinstance(value, str) and is_text(value)):
            raise InvalidAdapterError(f"{path}: {key} must be a text string or null.")
    return config


def read_weights(path: Path) -> torch.Tensor:
    """Read the `prompt_embeddings` tensor of a safetensors file and validate it."""
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise InvalidAdapterError(f"{path}: not a readable safetensors file ({exc}).") from exc
    return _prompt_tensor(tensors, where=str(path))


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
