"""OpenAI request and response schemas (pydantic) for ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

Requests are validated strictly (a string where a number belongs is refused, not coerced) and unknown fields are
ignored, as OpenAI's API does. Features we do not implement are refused with a message naming them
(:func:`unsupported_fields`), never silently dropped: ``n > 1``, ``logprobs``, tools, ``echo``, ``suffix``,
non-zero penalties, ``logit_bias``, a non-text ``response_format`` -- and a ``chat_template`` in the request
(the chat template comes from the model's files only).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

__all__ = [
    "ChatMessage", "ChatCompletionRequest", "CompletionRequest", "StreamOptions", "Usage", "ErrorResponse",
    "error_body", "unsupported_fields", "new_id",
]

Number = Union[StrictInt, StrictFloat]

#: the most ``stop`` strings one request may give
MAX_STOP_SEQUENCES = 16


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    top_k: StrictInt | None = Field(default=None, ge=-1)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    n: StrictInt | None = Field(default=None, ge=1)
    stream: StrictBool | None = False
    stream_options: "StreamOptions | None" = None
    ignore_eos: StrictBool | None = False
    user: StrictStr | None = None
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    logit_bias: dict[str, Any] | None = None
    logprobs: Any = None

    def stop_strings(self) -> tuple[str, ...]:
        """``stop`` as a tuple (empty strings dropped)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s for s in stops if s)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool | None = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = ""
    name: StrictStr | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    top_logprobs: StrictInt | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Request):
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    echo: StrictBool | None = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None


def unsupported_fields(request: _Request) -> str | None:
    """A message naming the first feature of ``request`` this server does not implement, or ``None``."""
    extra = request.model_extra or {}
    for name in ("chat_template", "chat_template_kwargs", "add_generation_prompt"):
        if name in extra:
            return f"'{name}' is not accepted: the chat template comes from the model's files"
    if len(request.stop_strings()) > MAX_STOP_SEQUENCES:
        return f"at most {MAX_STOP_SEQUENCES} stop sequences are accepted"
    if request.n not in (None, 1):
        return "only n=1 is supported"
    if request.logprobs not in (None, False, 0):
        return "logprobs are not supported"
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name) not in (None, 0, 0.0):
            return f"{name} is not supported (only 0)"
    if request.logit_bias:
        return "logit_bias is not supported"
    if isinstance(request, ChatCompletionRequest):
        if request.tools or request.functions or request.tool_choice not in (None, "none"):
            return "tools and function calling are not supported"
        if request.top_logprobs:
            return "top_logprobs are not supported"
        if request.response_format and request.response_format.get("type") not in (None, "text"):
            return "only response_format {'type': 'text'} is supported"
    if isinstance(request, CompletionRequest):
        if request.echo:
            return "echo is not supported"
        if request.suffix:
            return "suffix is not supported"
        if request.best_of not in (None, 1):
            return "only best_of=1 is supported"
        if isinstance(request.prompt, list) and request.prompt and isinstance(request.prompt[0], (str, list)):
            if len(request.prompt) != 1:
                return "only one prompt per request is supported"
    return None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code)).model_dump()


def new_id(prefix: str) -> str:
    """A request id like OpenAI's (``chatcmpl-...``, ``cmpl-...``)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def chat_response(request_id: str, model: str, text: str, finish_reason: str, usage: Usage, created: int) -> dict:
    return {
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage.model_dump(),
    }


def _with_usage(chunk: dict, usage: Usage | None, include_usage_field: bool) -> dict:
    """A streamed chunk as OpenAI sends it with ``stream_options.include_usage``: the final chunk carries the
    usage and no choices, the others ``"usage": null``."""
    if usage is not None:
        chunk["choices"] = []
        chunk["usage"] = usage.model_dump()
    elif include_usage_field:
        chunk["usage"] = None
    return chunk


def chat_chunk(request_id: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
               usage: Usage | None = None, include_usage_field: bool = False) -> dict:
    chunk: dict = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    return _with_usage(chunk, usage, include_usage_field)


def completion_response(request_id: str, model: str, text: str, finish_reason: str, usage: Usage,
                        created: int) -> dict:
    return {
        "id": request_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage.model_dump(),
    }


def completion_chunk(request_id: str, model: str, created: int, text: str, finish_reason: str | None = None,
                     usage: Usage | None = None, include_usage_field: bool = False) -> dict:
    chunk: dict = {"id": request_id, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    return _with_usage(chunk, usage, include_usage_field)


def model_list(model: str, created: int | None = None) -> dict:
    created = created if created is not None else int(time.time())
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "bitnet_torch"}]}


_Request.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
