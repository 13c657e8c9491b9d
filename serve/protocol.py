"""Request and response models of the OpenAI-compatible API and vLLM's LoRA admin API.

One module for every route's models (engine and gateway alike), so the two
speak exactly the same protocol. Limits live here too: a request over a limit
is a 400/422 in OpenAI's error shape, never a 500.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_MESSAGES = 256
MAX_MESSAGE_CHARS = 32_000
MAX_N = 8
MAX_STOP = 4
MAX_TOKENS_LIMIT = 4096


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_MESSAGE_CHARS)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # Unknown OpenAI fields (logprobs, tools, ...) are ignored as vLLM does.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=128)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    user: str | None = Field(default=None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if value is None:
            return []
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    def completion_limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: ChoiceMessage
    finish_reason: Literal["stop", "length", "abort"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: Literal["stop", "length", "abort"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "persona-chat"
    root: str | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1, max_length=4096)
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1, max_length=128)
    lora_int_id: int | None = None


class FeedbackRequest(BaseModel):
    """A thumbs vote on one answer of a turn; ``retract`` removes the caller's vote."""

    turn_id: str = Field(min_length=1, max_length=64)
    vote: str = Field(min_length=1, max_length=16)  # up | down | retract (checked with a clear message)
    choice_index: int = Field(default=0, ge=0, le=MAX_N - 1)
    reason: str | None = None
    comment: str | None = None


class ComparisonRequest(BaseModel):
    """Which of two answers to the same context is better; ``left`` says which one was shown on the left."""

    turn_a: str = Field(min_length=1, max_length=64)
    turn_b: str = Field(min_length=1, max_length=64)
    choice: str = Field(min_length=1, max_length=16)  # a | b | tie | both_bad
    left: str = Field(default="a", min_length=1, max_length=1)


class RunRecord(BaseModel):
    """A training run as the loop reports it (columns of the store's training_runs)."""

    id: str = Field(min_length=1, max_length=200)
    persona: str = Field(min_length=1, max_length=100)
    kind: str = Field(default="dpo", max_length=16)
    status: str = Field(max_length=32)
    parent_version: int | None = None
    adapter_version: int | None = None
    started_at: str
    finished_at: str | None = None
    train_examples: int | None = None
    heldout_examples: int | None = None
    reward_accuracy: float | None = None
    reward_margin: float | None = None
    metrics: dict | None = None
    message: str | None = Field(default=None, max_length=4000)


class RetrainRequest(BaseModel):
    persona: str = Field(min_length=1, max_length=100)
    force: bool = False


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"
