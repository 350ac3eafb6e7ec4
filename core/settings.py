"""The settings every part reads: SOFTPROMPT_* environment variables (or a `.env` file).

One settings object family: the server's `Settings` extends this one, and the trainer and
store command lines read their defaults from it, so no part reads `os.environ` itself.

Every path is made absolute when the settings are read (the folder a process starts in is
the one its relative paths mean), and child processes get these absolute values through
`child_environment()`: a training process runs in its job's folder, not where the server
was started.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Model specs that name a model rather than a path (trainer/modeling.py resolves them).
MODEL_NAMES = ("", "default", "smollm2", "qwen2.5-coder-0.5b")


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SOFTPROMPT_", env_file=".env", extra="ignore")

    model: str = Field(
        "default",
        description="model spec: 'default' (embedded SmolLM2), 'qwen2.5-coder-0.5b' "
        "(installed by `make qwen`), a HF folder or a .gguf file",
    )
    store: str = Field(
        "./prompt-store", description="the prompt store: a folder, or a postgresql:// URL shared by every replica"
    )
    jobs_dir: Path | None = Field(
        None,
        description="job records and uploads (default: <store>/jobs for a folder "
        "store, ./softprompt-jobs for a database store)",
    )
    cache_dir: Path = Field(Path("~/.cache/softprompt"), description="where dequantized GGUF models are cached")

    @field_validator("store", mode="before")
    @classmethod
    def _store_as_text(cls, value):
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @model_validator(mode="after")
    def _absolute_paths(self) -> CommonSettings:
        """Resolve every path against the folder this process was started in, once, now."""
        if not self.store_is_database:
            self.store = absolute(self.store)
        if self.jobs_dir is None:  # the default, resolved now like the rest
            self.jobs_dir = Path("softprompt-jobs") if self.store_is_database else Path(self.store) / "jobs"
        self.jobs_dir = Path(absolute(self.jobs_dir))
        self.cache_dir = Path(absolute(self.cache_dir))
        self.model = absolute_model_spec(self.model)
        return self

    @property
    def store_is_database(self) -> bool:
        return is_database_url(self.store)

    def child_environment(self) -> dict[str, str]:
        """These settings as SOFTPROMPT_* variables (absolute paths), for a child process that reads
        CommonSettings wherever it runs: it sees exactly what this process uses, `.env` included."""
        return {
            "SOFTPROMPT_MODEL": self.model,
            "SOFTPROMPT_STORE": self.store,
            "SOFTPROMPT_JOBS_DIR": str(self.jobs_dir),
            "SOFTPROMPT_CACHE_DIR": str(self.cache_dir),
        }


def is_database_url(location: str) -> bool:
    return location.startswith(("postgresql://", "postgres://"))


def absolute(path: str | os.PathLike) -> str:
    """`path` with `~` expanded, made absolute against the current folder and normalised."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def absolute_model_spec(spec: str) -> str:
    """A model spec that is a path, made absolute; a model name (MODEL_NAMES) stays as it is."""
    text = (spec or "").strip()
    if text.lower() in MODEL_NAMES:
        return text
    looks_like_path = os.sep in text or text.startswith(("~", ".")) or text.endswith(".gguf")
    return absolute(text) if looks_like_path or os.path.exists(text) else text


def settings_from(cls: type[CommonSettings], command: str, given: dict):
    """`cls` read from the environment with the command line's values on top (None: not given), for
    `softprompt <command>`. An invalid value prints each problem as `softprompt <command>:
    SOFTPROMPT_<FIELD>: message` on stderr and returns None."""
    try:
        return cls(**{key: value for key, value in given.items() if value is not None})
    except ValidationError as exc:
        for error in exc.errors():
            field = ".".join(map(str, error["loc"]))
            where = f"SOFTPROMPT_{field.upper()}: " if field else ""
            message = error["msg"].removeprefix("Value error, ").removeprefix(where)  # once, if it names itself
            print(f"softprompt {command}: {where}{message}", file=sys.stderr)
        return None
