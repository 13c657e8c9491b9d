"""Request and response models of the OpenAI-compatible API and vLLM's LoRA admin API.

One module for every route's models (engine and gateway alike), so the two
speak exactly the same protocol. Limits live here too: a request over a limit
is a 400/422 in OpenAI's error shape, never a 500. Errors too: every error a
caller gets is a ``feedback.errors.APIError``, rendered by ``error_body`` here.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from datetime import datetime, timezone
from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from feedback.errors import APIError
from feedback.votes import CHOICES, VOTES

MAX_MESSAGES = 256
MAX_MESSAGE_CHARS = 32_000
MAX_N = 8
MAX_STOP = 4
# Characters per stop string. The engine looks for every stop in each row's text at every token
# (and holds back a tail that may begin one), so its cost grows with the stops' length for every
# user of the batch: 4 KB stops cost about 2 ms per row per token. Real stops are a few characters.
MAX_STOP_CHARS = 128
MAX_TOKENS_LIMIT = 4096
# vLLM's repetition_penalty (1: off) accepts any value above 0. Past 2 the text breaks down (a
# model that may not repeat a token it has seen, the prompt's included), and a denormal one
# divides a logit into infinity (a NaN distribution for every row of the batch), so here it is
# between 0.01 and 2.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 2.0
# What the product's own chat surfaces (the browser UI, `persona chat`) ask for: small models
# loop on a phrase ("Edit once, not forward. Edit once, ..."), and a mild penalty on tokens
# already said keeps answers readable. The API's default stays off (1.0), as in vLLM and OpenAI.
CHAT_REPETITION_PENALTY = 1.1
# Temperatures below this sample greedily, as in vLLM (its _SAMPLING_EPS): dividing logits
# by a denormal temperature overflows to inf and the sampling distribution to NaN. A top_p
# below it is raised to it: both keep only the likeliest token, but a denormal top_p is 0 in
# float32 and keeps none.
SAMPLING_EPS = 1e-5

# C0 control characters other than tab, newline and carriage return: no chat text needs
# them, tokenizers and terminals treat them unpredictably, and NUL ends C strings.
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _no_controls(text: str) -> str:
    found = CONTROL_CHARS.search(text)
    if found:
        raise ValueError(f"contains the control character U+{ord(found.group()):04X} at position {found.start()}; "
                         "only tab, newline and carriage return are allowed")
    return text


def strip_controls(text: str) -> str:
    """``text`` without the control characters requests refuse (for text a model wrote)."""
    return CONTROL_CHARS.sub("", text)


# Every string a request carries: refused (400, naming the field) when it holds control characters.
# The pattern only documents the rule in the OpenAPI schema; the validator enforces it, with a
# message that names the character.
Text = Annotated[str, AfterValidator(_no_controls),
                 Field(json_schema_extra={"pattern": "^[^\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f]*$"})]
# Counts and versions: the store's INTEGER columns (and vLLM's LoRA ids) hold 32 bits.
Int32 = Annotated[int, Field(ge=0, le=2**31 - 1)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Text = Field(max_length=MAX_MESSAGE_CHARS)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # Unknown OpenAI fields (logprobs, tools, ...) are ignored as vLLM does.
    model_config = ConfigDict(extra="ignore")

    model: Text = Field(min_length=1, max_length=128)
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
    # vLLM's extra sampling parameter: the logit of every token already in the prompt or the
    # answer is divided by it when positive and multiplied by it when negative (1: off).
    repetition_penalty: float | None = Field(default=None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    user: Text | None = Field(default=None, max_length=256)

    @field_validator("temperature")
    @classmethod
    def _greedy_below_eps(cls, value):
        return 0.0 if value is not None and value < SAMPLING_EPS else value

    @field_validator("top_p")
    @classmethod
    def _top_p_at_least_eps(cls, value):
        return max(value, SAMPLING_EPS) if value is not None else None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if value is None:
            return []
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences; {len(stops)} given")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        for i, s in enumerate(stops):
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters; "
                                 f"stop[{i}] has {len(s)}")
        return [_no_controls(s) for s in stops]

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
    lora_name: Text = Field(min_length=1, max_length=128)
    lora_path: Text = Field(min_length=1, max_length=4096)
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: Text = Field(min_length=1, max_length=128)
    lora_int_id: Int32 | None = None


class FeedbackRequest(BaseModel):
    """A thumbs vote on one answer of a turn; ``retract`` removes the caller's vote."""

    turn_id: Text = Field(min_length=1, max_length=64)
    # The enums document the values in the schema; feedback.votes checks them with a clear message.
    vote: Text = Field(min_length=1, max_length=16, json_schema_extra={"enum": list(VOTES)})
    choice_index: int = Field(default=0, ge=0, le=MAX_N - 1)
    reason: Text | None = None
    comment: Text | None = None


class ComparisonRequest(BaseModel):
    """Which of two answers to the same context is better; ``left`` says which one was shown on the left."""

    turn_a: Text = Field(min_length=1, max_length=64)
    turn_b: Text = Field(min_length=1, max_length=64)
    choice: Text = Field(min_length=1, max_length=16, json_schema_extra={"enum": list(CHOICES)})
    left: Text = Field(default="a", min_length=1, max_length=1, json_schema_extra={"enum": ["a", "b"]})


# ISO 8601 (RFC 3339 in the schema); stored as UTC without a zone.
Timestamp = Annotated[str, Field(max_length=64, json_schema_extra={"format": "date-time"})]


class RunRecord(BaseModel):
    """A training run as the loop reports it (columns of the store's training_runs)."""

    id: Text = Field(min_length=1, max_length=200)
    persona: Text = Field(min_length=1, max_length=100)
    kind: Text = Field(default="dpo", max_length=16)
    status: Text = Field(max_length=32)
    parent_version: Int32 | None = None
    adapter_version: Int32 | None = None
    started_at: Timestamp
    finished_at: Timestamp | None = None
    train_examples: Int32 | None = None
    heldout_examples: Int32 | None = None
    reward_accuracy: float | None = None
    reward_margin: float | None = None
    metrics: dict | None = None
    message: Text | None = Field(default=None, max_length=4000)

    @field_validator("started_at", "finished_at")
    @classmethod
    def _timestamp(cls, value):
        if value is None:
            return None
        try:
            when = datetime.fromisoformat(value)
            if when.tzinfo is not None:
                when = when.astimezone(timezone.utc).replace(tzinfo=None)
        except (ValueError, OverflowError):  # OverflowError: year 1 moved back across midnight
            raise ValueError("expected an ISO 8601 time such as 2025-01-31 12:00:00") from None
        return when.isoformat(sep=" ")

    @field_validator("metrics")
    @classmethod
    def _json_metrics(cls, value):
        try:
            json.dumps(value, allow_nan=False)  # stored as JSON, which has no NaN or Infinity
        except ValueError:
            raise ValueError("must not contain NaN or Infinity") from None
        return value


class RetrainRequest(BaseModel):
    persona: Text = Field(min_length=1, max_length=100)
    force: bool = False
    # How a gate-passing candidate is promoted: at once ("gate") or after an A/B experiment
    # ("ab"); None: as the recipe says.
    promotion: Literal["gate", "ab"] | None = None


class ExperimentRequest(BaseModel):
    """Start an A/B experiment: ``challenger`` (a registered version of ``persona``) against
    the active version, serving ``share`` of the API clients (sticky per client) and every
    side-by-side round of the persona, until the verdicts decide or ``max_hours`` pass."""

    model_config = ConfigDict(extra="forbid")  # a misspelt rule must not silently take its default

    persona: Text = Field(min_length=1, max_length=100)
    challenger: Int32 = Field(ge=1)
    run_id: Text | None = Field(default=None, max_length=200)
    share: float = Field(default=0.1, ge=0.0, le=1.0)
    min_votes: int = Field(default=40, ge=1, le=1_000_000)
    alpha: float = Field(default=0.05, gt=0.0, lt=0.5)
    max_hours: float = Field(default=72.0, gt=0.0, le=24 * 366)


class EmptyRequest(BaseModel):
    """The body of an admin action that takes no arguments: nothing, or ``{}``."""

    model_config = ConfigDict(extra="forbid")


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_body(error: APIError) -> dict:
    """OpenAI's error shape for ``error``: ``{"error": {"message", "type", "param", "code"}}``.
    The one renderer of errors, for every app and for in-stream error events too."""
    info = ErrorInfo(message=error.message, type=error.type, param=error.param, code=error.code)
    return ErrorResponse(error=info).model_dump()


def error_response(error: APIError) -> JSONResponse:
    """``error`` as an HTTP response: its status, its headers (``Retry-After``), ``error_body``."""
    return JSONResponse(error_body(error), status_code=error.status, headers=error.headers)


def invalid_request(errors: list[dict], skip: int = 0, type: str | None = None) -> APIError:
    """The first of pydantic's ``errors`` as a 400 that names the field. ``skip``: leading
    parts of the location that are not the field (FastAPI's ``body`` or ``query``)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(p) for p in first.get("loc", ())[skip:]) or None
    message = first["msg"].removeprefix("Value error, ")  # our validators' ValueErrors
    return APIError(400, f"{param or 'body'}: {message}", param=param, type=type)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"
