"""Request bodies of the OpenAI-compatible routes (/v1/chat/completions, /v1/completions).

The fields follow OpenAI's API reference. Unknown fields are kept (`extra="allow"`) so that
`unsupported_fields` can name them: a field that would change the output but is not
implemented is refused with a 400 naming it, rather than silently ignored; harmless ones
(`user`, `metadata`, ...) are accepted.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.http.schemas import (
    MAX_MESSAGES,
    MAX_SEED,
    MAX_STOP_CHARS,
    MAX_STOPS,
    MIN_TEMPERATURE,
    Text,
    check_temperature,
)

MAX_N = 16  # choices per request (each is a row of the batch)
MAX_PROMPTS = 16  # prompts in one /v1/completions request
MAX_TOP_LOGPROBS = 20

# Accepted and ignored: they do not change what is generated.
HARMLESS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier", "prompt_cache_key"}
# Known OpenAI fields this server does not implement, with the value that means "not used".
UNSUPPORTED_UNLESS = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "echo": (None, False),
    "suffix": (None, ""),
    "prediction": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "top_k": (None, -1, 0),
    "min_p": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "min_tokens": (None, 0),
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(min_length=1, max_length=64)]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)

    def as_turn(self) -> dict:
        """The chat-template turn: `developer` is OpenAI's newer name for `system`."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


StopText = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class SamplingFields(BaseModel):
    """What both routes share. Unlike /generate, `temperature` defaults to 1 (sampling), as in OpenAI."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(
        min_length=1,
        max_length=256,
        description="a prompt reference (`math`, `math-v3`, an alias) "
        "or the base model's id (GET /v1/models) for no soft prompt",
    )
    temperature: float | None = Field(
        None, ge=0, le=2, description=f"0 = greedy, else {MIN_TEMPERATURE} to 2; default 1"
    )
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N, description="choices, each decoded as a row of the batch")
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="choice i samples with seed + i (mod 2**64)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="only equal to n (or absent) is supported")
    ignore_eos: bool = Field(
        False, description="vLLM's extension: keep going past end-of-sequence up to the token limit (benchmarks)"
    )

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value):
        return check_temperature(value, 2)

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def unsupported_fields(self) -> list[str]:
        """Fields that would change the output but are not implemented, and fields OpenAI does not have."""
        names = []
        for name, value in (self.model_extra or {}).items():
            if name in HARMLESS:
                continue
            if name not in UNSUPPORTED_UNLESS or value not in UNSUPPORTED_UNLESS[name]:
                names.append(name)
        if self.best_of is not None and self.best_of != self.n:
            names.append("best_of")
        return sorted(names)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI for max_completion_tokens")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="default: as many as fit, up to the server's limit"
    )
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="needs logprobs: true")


class CompletionRequest(SamplingFields):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        description="one text or a list; each becomes one user turn, exactly like /generate's `input`"
    )
    max_tokens: int | None = Field(16, ge=1, description="OpenAI's default is 16")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description="log-probabilities of each token and this many alternatives"
    )

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
