"""The settings every part reads: SOFTPROMPT_* environment variables (or a `.env` file).

One settings object family: the server's `Settings` extends this one, and the trainer and
store command lines read their defaults from it, so no part reads `os.environ` itself.
"""

from __future__ import annotations

from pathlib import Path

import os

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SOFTPROMPT_", env_file=".env", extra="ignore")

    model: str = Field("default", description="model spec: 'default' (embedded SmolLM2), a HF folder or a .gguf file")
    store: str = Field("./prompt-store", description="the prompt store: a folder, or a postgresql:// URL shared by "
                       "every replica")
    jobs_dir: Path | None = Field(None, description="job records and uploads (default: <store>/jobs for a folder "
                                  "store, ./softprompt-jobs for a database store)")
    cache_dir: Path = Field(Path("~/.cache/softprompt"), description="where dequantized GGUF models are cached")

    @field_validator("store", mode="before")
    @classmethod
    def _store_as_text(cls, value):
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @property
    def store_is_database(self) -> bool:
        return is_database_url(self.store)

    @property
    def jobs_folder(self) -> Path:
        if self.jobs_dir is not None:
            return self.jobs_dir
        return Path("softprompt-jobs") if self.store_is_database else Path(self.store) / "jobs"


def is_database_url(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))
