"""The settings every part reads: SOFTPROMPT_* environment variables (or a `.env` file).

One settings object family: the server's `Settings` extends this one, and the trainer and
store command lines read their defaults from it, so no part reads `os.environ` itself.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SOFTPROMPT_", env_file=".env", extra="ignore")

    model: str = Field("default", description="model spec: 'default' (embedded SmolLM2), a HF folder or a .gguf file")
    store: Path = Field(Path("./prompt-store"), description="prompt store root")
    cache_dir: Path = Field(Path("~/.cache/softprompt"), description="where dequantized GGUF models are cached")
