"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(BaseModel):
    """Give `input` (one user turn) or `messages` (a chat); greedy unless `temperature` > 0."""

    input: str | None = Field(None, description="the user's text (one turn)")
    messages: list[Message] | None = Field(None, description="a chat; the soft prompt opens the last user turn")
    max_new_tokens: int = Field(32, ge=1)
    temperature: float | None = Field(None, ge=0, le=5, description="0 or absent: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] | str | None = Field(None, description="stop strings (not included in the text)")
    seed: int | None = Field(None, ge=0, description="makes sampling reproducible")
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
        if len(stops) > 8 or any(not s for s in stops):
            raise ValueError("up to 8 non-empty stop strings")
        return stops


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
