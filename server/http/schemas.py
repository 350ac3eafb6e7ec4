"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, Field, StringConstraints, field_validator, model_validator

from core.untrusted import is_text

MAX_TEXT_CHARS = 100_000  # one input or message content
MAX_MESSAGES = 256
MAX_STOPS, MAX_STOP_CHARS = 8, 256
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 5.0  # below 0.01 sampling is greedy in all but name: ask for 0
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes


def _unicode(value):
    if isinstance(value, str) and not is_text(value):
        raise ValueError("must be valid Unicode text: remove lone surrogate escapes like \\ud800")
    return value


# Text the tokenizer can take: valid Unicode (JSON escapes can smuggle in lone surrogates; checked
# before pydantic's own str check, whose message says less) and bounded.
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS), BeforeValidator(_unicode)]


def check_temperature(value: float | None, upper: float) -> float | None:
    """0 (or none) means greedy; a positive temperature must be at least MIN_TEMPERATURE."""
    if value is not None and 0 < value < MIN_TEMPERATURE:
        raise ValueError(f"use 0 for greedy decoding, or a temperature from {MIN_TEMPERATURE} to {upper}")
    return value


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class GenerateRequest(BaseModel):
    """Give `input` (one user turn) or `messages` (a chat); greedy unless `temperature` > 0."""

    input: Text | None = Field(None, description="the user's text (one turn)")
    messages: list[Message] | None = Field(
        None, min_length=1, max_length=MAX_MESSAGES, description="a chat; the soft prompt opens the last user turn"
    )
    max_new_tokens: int = Field(32, ge=1)
    temperature: float | None = Field(
        None, ge=0, le=MAX_TEMPERATURE, description=f"0 or absent: greedy; else {MIN_TEMPERATURE} to {MAX_TEMPERATURE}"
    )
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] | str | None = Field(None, description=f"up to {MAX_STOPS} stop strings (not included in the text)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="makes sampling reproducible")
    stream: bool = Field(False, description="answer with Server-Sent Events")
    ignore_eos: bool = Field(False, description="keep going past end-of-sequence up to max_new_tokens (benchmarks)")

    @model_validator(mode="after")
    def _one_input(self):
        if (self.input is None) == (self.messages is None):
            raise ValueError("give exactly one of 'input' or 'messages'")
        return self

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        if value is None:
            return []
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"give up to {MAX_STOPS} stop strings of 1 to {MAX_STOP_CHARS} characters")
        return [_unicode(s) for s in stops]

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value):
        return check_temperature(value, MAX_TEMPERATURE)


class Usage(BaseModel):
    prompt_tokens: int = Field(description="template + soft prompt + input tokens")
    soft_prompt_tokens: int
    completion_tokens: int


class Timings(BaseModel):
    queue_ms: float
    ttft_ms: float
    prefill_ms: float
    decode_ms: float
    total_ms: float


class GenerateResponse(BaseModel):
    text: str
    prompt: str | None = Field(description="the resolved version, e.g. 'math-v3'; null for the bare model")
    finish_reason: str
    usage: Usage
    timings: Timings
    batch: dict = Field(description="batch size when the request joined and the largest it decoded in")


class AliasRequest(BaseModel):
    target: str = Field(description="a version reference, e.g. 'math-v2' or 'math' (its newest version now)")
