"""Server settings, read from the environment with the prefix SOFTPROMPT_ (or a .env file)."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import math
import os
from typing import Literal

from pydantic import Field, field_validator, model_validator

from core.settings import settings_from as _settings_from
from jobs.settings import JobSettings
from server.engine.backend import ENGINES
from server.engine.fair_queue import POLICIES
from server.engine.sequence import DEFAULT_TENANT

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


ADMIN = "admin"  # the key name of requests with the admin key
ANONYMOUS = DEFAULT_TENANT  # without client keys configured, every request is this one's
LIMIT_FIELDS = ("concurrent", "requests_per_second", "tokens_per_minute")


def key_name(key: str) -> str:
    return f"key-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def parse_client_keys(text: str | None) -> dict[str, str]:
    """`name=key,key2` -> {name: key, key-<hash>: key2}; names are unique."""
    keys: dict[str, str] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, key = item.partition("=")
        name, key = (name.strip(), key.strip()) if sep else (key_name(item), item)
        if not key or not name or name in keys or name in (ANONYMOUS, ADMIN):
            raise ValueError(
                f"SOFTPROMPT_CLIENT_KEYS: each entry is name=key with a name of its own (not "
                f"{ANONYMOUS!r} or {ADMIN!r}); {name or 'an entry'!r} is not"
            )
        keys[name] = key
    return keys


def parse_limits(text: str | None) -> dict[str, dict[str, float]]:
    if not text:
        return {}
    try:
        limits = json.loads(text)
    except ValueError as error:
        raise ValueError(f"SOFTPROMPT_KEY_LIMITS is not JSON: {error}") from None
    if not isinstance(limits, dict) or not all(isinstance(v, dict) for v in limits.values()):
        raise ValueError('SOFTPROMPT_KEY_LIMITS: use {"default": {"concurrent": 8, ...}, "<key name>": {...}}')
    for name, values in limits.items():
        for limit, value in values.items():
            if limit not in LIMIT_FIELDS:
                raise ValueError(
                    f"SOFTPROMPT_KEY_LIMITS[{name!r}]: unknown limit {limit!r} (use {', '.join(LIMIT_FIELDS)})"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"SOFTPROMPT_KEY_LIMITS[{name!r}][{limit!r}] must be a positive number, got {value!r}")
    return limits


RETIRED = {"SOFTPROMPT_PACKED_DECODE": "SOFTPROMPT_PACKED_WEIGHTS (oneDNN packing, on by default)"}


class Settings(JobSettings):
    """The server's settings: the common ones (model, store, cache_dir), the job system's, and its own."""

    api_key: str | None = Field(
        None, description="if set, admin routes need 'Authorization: Bearer <key>'; an empty key is refused at start"
    )
    client_keys: str | None = Field(
        None,
        description="comma-separated name=key pairs (a bare key is named key-<hash>): when set, /generate and /v1 "
        "need 'Authorization: Bearer <key>' with one of them (or the admin key); metrics and logs show the name",
    )
    key_limits: str | None = Field(
        None,
        description='JSON limits per key name: {"default": {"concurrent": 8, "requests_per_second": 20, '
        '"tokens_per_minute": 20000}, "<name>": {...}}; a key over one gets 429 with Retry-After',
    )
    scheduling: str = Field("fair", description="waiting requests: 'fair' (key names served in turn) or 'fifo'")
    refusal_delay_ms: float = Field(
        250.0,
        ge=0,
        le=5000,
        description="a key refused more than SOFTPROMPT_REFUSAL_BURST times within a second has its further refusals "
        "answered after this long, doubled for each further second it keeps on (up to 8x), so clients that retry "
        "at once cannot spend the server's CPU on refusals",
    )
    refusal_burst: int = Field(20, ge=0, description="refusals a second a key gets at once (see refusal_delay_ms)")
    flood_rows: float = Field(
        0.125,
        gt=0,
        le=1,
        description="beside other keys, a key refused over refusal_burst times a second (in the last 2 s) runs "
        "this fraction of the batch rows the others ask for (at least one) and starts this fraction of the "
        "requests the most active other key starts (1: as many)",
    )
    served_model_name: str | None = Field(
        None,
        description="the base model's id on /v1 (default: the model's name, e.g. HuggingFaceTB/SmolLM2-135M-Instruct)",
    )
    host: str = Field("127.0.0.1", description="address `softprompt serve` binds to")
    port: int = Field(8000, ge=0, le=65535, description="port `softprompt serve` binds to")
    allow_open_admin: bool = Field(
        False,
        description="serve admin routes without an API key on a non-loopback "
        "address (off: without a key they answer only on 127.0.0.1/::1/localhost)",
    )
    shutdown_timeout_s: float = Field(
        5.0,
        gt=0,
        le=600,
        description="on SIGTERM, requests still running after this long are cut off, so a shutdown always finishes",
    )
    max_request_bytes: int = Field(
        1_000_000,
        ge=1024,
        description="largest request body of any route except the uploads below (413 before the body is read)",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads for serving (default: torch's); while "
        "training jobs run, the engine uses this minus their threads, at least one",
    )
    engine: str = Field(
        "torch",
        description="what computes the rows: torch (transformers, fp32 dequantized weights) or llamacpp "
        "(llama.cpp on the GGUF's own 4-bit weights; `make install-llamacpp`; needs a GGUF model)",
    )
    llamacpp_kv_tokens: int = Field(
        16384,
        ge=256,
        le=1 << 20,
        description="llama.cpp engine: key/value cells shared by every row and cached prefix (at least the "
        "model's context length); a row reserves its prompt plus max_new_tokens, requests wait when full",
    )
    llamacpp_prefix_slots: int = Field(
        8, ge=1, le=64, description="llama.cpp engine: soft-prompt prefixes kept computed (least recently used out)"
    )
    llamacpp_flash_attention: Literal["auto", "on", "off"] = Field(
        "auto",
        description="llama.cpp engine: its flash attention (auto, llama.cpp's default: on for CPU; off decodes as "
        "llama-cpp-python's own generation does, a little closer to the torch engine: bench/llamacpp_agreement.py)",
    )
    max_batch_size: int = Field(16, ge=1, le=192, description="most sequences decoded together")
    max_queue: int = Field(64, ge=1, description="waiting requests before 503")
    max_new_tokens_limit: int = Field(512, ge=1, description="largest max_new_tokens a request may ask for")
    prompt_cache_size: int = Field(32, ge=1, description="prompt versions kept loaded (LRU)")
    store_poll_seconds: float = Field(1.0, gt=0, description="how often the store is checked for new versions")
    max_upload_bytes: int = Field(20_000_000, ge=1, description="largest training upload accepted")
    # serving engine
    prefix_cache_mb: int = Field(512, ge=1, description="memory for cached soft-prompt prefix key/values (LRU)")
    use_prefix_cache: bool = Field(True, description="reuse the soft prompt's key/values across requests")
    input_cache_mb: int = Field(
        64,
        ge=0,
        description="memory for whole inputs' key/values and first logits, so a repeated input (a retry, "
        "a polling client) skips its prefill (LRU; torch engine; 0 turns it off)",
    )
    prewarm: bool = Field(True, description="load and prefill new prompt versions as soon as they are published")
    max_prompt_upload_bytes: int = Field(
        50_000_000, ge=1, description="largest prompt file (safetensors or zip) accepted"
    )
    queue_retry_after: int = Field(1, ge=1, description="Retry-After seconds sent with 503 queue_full")
    packed_weights: bool = Field(
        True,
        description="on CPU (fp32), run every linear layer through a copy of its weight "
        "packed for oneDNN: same results up to rounding, one more copy of the linear weights in "
        "memory (bench/decode_ab.py --variant packed measures the speed on this host)",
    )
    gqa_attention: bool = Field(
        True,
        description="on CPU, prefills read grouped key/value heads in place (SDPA's "
        "native GQA) instead of copying them per query head; same results up to rounding",
    )
    fused_projections: bool = Field(
        True,
        description="compute q/k/v and gate/up as one matrix product each (weights "
        "become views of one concatenated matrix that replaces them; same results up to rounding)",
    )
    pack_prefills: bool = Field(
        True,
        description="prefill requests that arrive while others decode inside the running rows' next "
        "decode step (one forward pass, not a pass of their own that every running row waits for); "
        "torch: full-attention models on the engine's attention; llama.cpp: always",
    )
    batch_window_ms: float = Field(
        10.0,
        ge=0,
        le=100,
        description="when idle, wait this long for more arrivals "
        "(each resets it, at most 4x) so a burst is prefilled as one batch",
    )

    @field_validator("api_key")
    @classmethod
    def _key_not_empty(cls, key: str | None) -> str | None:
        if key is not None and not key.strip():
            raise ValueError(
                "SOFTPROMPT_API_KEY is set but empty: set a real key, or unset it (admin routes then "
                "answer only on a loopback address unless SOFTPROMPT_ALLOW_OPEN_ADMIN=true)"
            )
        return key

    @field_validator("client_keys")
    @classmethod
    def _named_keys(cls, value: str | None) -> str | None:
        parse_client_keys(value)
        return value

    @field_validator("key_limits")
    @classmethod
    def _limits(cls, value: str | None) -> str | None:
        parse_limits(value)
        return value

    @field_validator("engine")
    @classmethod
    def _engine(cls, value: str) -> str:
        if value not in ENGINES:
            raise ValueError(f"SOFTPROMPT_ENGINE: use {' or '.join(ENGINES)}, got {value!r}")
        return value

    @field_validator("scheduling")
    @classmethod
    def _policy(cls, value: str) -> str:
        if value not in POLICIES:
            raise ValueError(f"SOFTPROMPT_SCHEDULING: use {' or '.join(POLICIES)}, got {value!r}")
        return value

    @property
    def client_key_map(self) -> dict[str, str]:
        """Key name -> key."""
        return parse_client_keys(self.client_keys)

    @property
    def key_limit_map(self) -> dict[str, dict[str, float]]:
        return parse_limits(self.key_limits)

    @property
    def admin_open_without_key(self) -> bool:
        """Whether admin routes may answer with no key: only on loopback, or when explicitly allowed."""
        return self.allow_open_admin or is_loopback(self.host)

    @model_validator(mode="after")
    def _warn_about_retired_variables(self) -> Settings:
        for old, new in RETIRED.items():
            if old in os.environ:
                logger.warning("%s is no longer read; see %s", old, new)
        return self


def settings_from(command: str, given: dict) -> Settings | None:
    """The settings of `softprompt <command>` (core.settings.settings_from)."""
    return _settings_from(Settings, command, given)
