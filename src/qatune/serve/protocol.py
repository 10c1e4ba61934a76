"""The OpenAI wire format: request bodies (validated strictly), responses, stream chunks, errors.

Shapes follow the OpenAI API reference for chat completions and (legacy) completions, as vLLM's
OpenAI server does. One difference from vLLM: a field this server does not know is an error (as
on api.openai.com), not silently ignored, so a client never believes a setting took effect when
it did not. Types are strict: "0.5" is not a temperature.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class APIError(Exception):
    """An error answered with OpenAI's error object: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: Any  # a string or a list of text parts, see `text`
    name: str | None = None  # accepted for compatibility; the templates have no speaker names

    @field_validator("content")
    @classmethod
    def text(cls, v: Any) -> str:
        if isinstance(v, str):
            return v
        if isinstance(v, list):
            return "".join(TextPart.model_validate(p).text for p in v)
        raise ValueError("expected a string or an array of text parts")


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """Fields shared by both endpoints. None means "not given" (clients may send explicit nulls)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stop: Any = Field(None, validate_default=True)  # becomes a tuple of strings
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted for compatibility: an end-user id the caller may send

    @field_validator("stop")
    @classmethod
    def stop_strings(cls, v: Any) -> tuple[str, ...]:
        if v is None:
            return ()
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("expected a non-empty string or an array of non-empty strings")
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop strings, got {len(stops)}")
        return tuple(stops)


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(Sampling):
    prompt: Any

    @field_validator("prompt")
    @classmethod
    def prompts(cls, v: Any) -> list[str | list[int]]:
        """A string, an array of strings, an array of token ids, or an array of such arrays."""
        token_ids = lambda x: isinstance(x, list) and all(type(t) is int for t in x)
        if isinstance(v, str) or (token_ids(v) and v):
            return [v]
        if isinstance(v, list) and v and all(isinstance(p, str) or (token_ids(p) and p) for p in v):
            return v
        raise ValueError(
            "expected a string, an array of strings, an array of token ids or an array of token id arrays "
            "(none of them empty)"
        )


def parse(model: type[Strict], body: bytes) -> Any:
    """Validate a JSON body; the first problem becomes a 400 naming the field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e) from None


def validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    param = ".".join(str(x) for x in err["loc"]) or None
    kind = err["type"]
    if kind == "json_invalid":
        return APIError(400, f"We could not parse the JSON body of your request ({err['msg']}).")
    if kind == "model_type" and not err["loc"]:
        return APIError(400, "The request body must be a JSON object.")
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param)
    if kind == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param)
    msg = err["msg"].removeprefix("Value error, ")
    return APIError(400, f"Invalid value for '{param}': {msg}.", param)


# --- responses --------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_response(rid: str, model: str, texts: list[str], reasons: list[str], usage_: dict) -> dict:
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": reason,
        }
        for i, (text, reason) in enumerate(zip(texts, reasons))
    ]
    return {
        "id": rid,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "choices": choices,
        "usage": usage_,
    }


def completion_response(rid: str, model: str, texts: list[str], reasons: list[str], usage_: dict) -> dict:
    choices = [
        {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
        for i, (text, reason) in enumerate(zip(texts, reasons))
    ]
    return {
        "id": rid,
        "object": "text_completion",
        "created": now(),
        "model": model,
        "choices": choices,
        "usage": usage_,
    }


def chat_chunk(rid: str, created: int, model: str, choices: list[dict], with_usage: bool, usage_=None) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if with_usage:  # as OpenAI: every chunk has "usage" (null) when the client asked for it
        chunk["usage"] = usage_
    return chunk


def chat_delta(index: int, delta: dict, finish_reason: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def completion_chunk(rid: str, created: int, model: str, choices: list[dict], with_usage: bool, usage_=None) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if with_usage:
        chunk["usage"] = usage_
    return chunk


def completion_delta(index: int, text: str, finish_reason: str | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def model_card(name: str, created: int, context: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "qatune", "max_model_len": context}
