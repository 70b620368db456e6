"""OpenAI's HTTP shapes: request bodies in, completions, chunks and errors out.

Only the fields we honour are read; others that change nothing we could do (``user``,
``presence_penalty`` at 0 ...) are ignored, as llama.cpp's server does, and those we cannot
honour are refused with a 400 (``n`` > 1, several prompts, token-id prompts, tool messages).
The ``model`` field is not checked: one cluster serves one model, and answers name it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Literal

from linguamq.schemas.errors import SchemaError
from linguamq.schemas.requests import ChatMessage, GenerateRequest, GenerateResult, Sampling

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


@dataclasses.dataclass(frozen=True)
class Call:
    """A parsed completion request."""

    kind: Literal["chat", "text"]
    request: GenerateRequest
    stream: bool
    include_usage: bool


def parse(kind: Literal["chat", "text"], body: Any, *, request_id: str) -> Call:
    """A completion request; ApiError 400 naming the parameter for anything we cannot take.
    A parameter given as null is absent, as OpenAI's API treats it."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}
    try:
        if kind == "chat":
            messages, prompt = _messages(body.get("messages")), None
        else:
            messages, prompt = (), _prompt(body.get("prompt"))
        if body.get("n", 1) != 1:
            raise bad("only n=1 is supported", "n")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None:  # absent: as many as the context allows (the head works it out)
            max_tokens = _int(max_tokens, "max_tokens", low=1)
        stop = body.get("stop", ())
        stop = (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop):
            raise bad("stop must be a string or a list of non-empty strings", "stop")
        stream = body.get("stream", False)
        options = body.get("stream_options", {})
        if not isinstance(stream, bool) or not isinstance(options, dict):
            raise bad("stream must be true or false, stream_options an object", "stream")
        seed = body.get("seed")
        sampling = Sampling(temperature=_number(body.get("temperature", 1.0), "temperature"),
                            top_p=_number(body.get("top_p", 1.0), "top_p"),
                            seed=None if seed is None else _int(seed, "seed", low=0))
        request = GenerateRequest(id=request_id, prompt=prompt, messages=messages, max_tokens=max_tokens,
                                  sampling=sampling, stop=tuple(stop))
    except SchemaError as exc:  # our wire limits (message length, stop strings...): the field named
        too_long = "exceeds" in str(exc) and exc.field in ("messages", "prompt", "content")
        raise ApiError(400, str(exc), param=exc.field,
                       code="context_length_exceeded" if too_long else None) from exc
    return Call(kind, request, stream, bool(options.get("include_usage", False)))


def _messages(value: Any) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list) or not value:
        raise bad("messages must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or message["role"] not in ROLES:
            raise bad(f"messages[{i}]: role must be one of {', '.join(ROLES)}", "messages")
        out.append(ChatMessage(role=ROLES[message["role"]], content=_content(message.get("content"), i)))  # type: ignore[arg-type]
    return tuple(out)


def _content(value: Any, i: int) -> str:
    """A message's text: a string, or a list of text parts (what newer clients send)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                       for p in value):
        return "".join(p["text"] for p in value)
    raise bad(f"messages[{i}]: content must be text (a string or text parts; this model reads no images)",
              "messages")


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str):
        raise bad("prompt must be one string (several prompts and token ids are not supported)", "prompt")
    return value


def _int(value: Any, param: str, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise bad(f"{param} must be an integer >= {low}", param)
    return value


def _number(value: Any, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad(f"{param} must be a number", param)
    return float(value)


# --- answers ------------------------------------------------------------------------------

FINISH = {"eos": "stop", "stop": "stop", "cancelled": "stop", "max_tokens": "length"}
STATUS = {"rate_limited": (429, "rate_limit_exceeded", "requests"), "overloaded": (503, "overloaded", "server_error"),
          "too_large": (400, "context_length_exceeded", "invalid_request_error"),
          "bad_request": (400, "invalid_request", "invalid_request_error"),
          "bad_payload": (400, "invalid_request", "invalid_request_error")}


def result_error(result: GenerateResult) -> ApiError:
    """The HTTP error of a result that says `error`, by the head's code."""
    status, code, type_ = STATUS.get(result.code or "", (500, "generation_failed", "server_error"))
    return ApiError(status, result.error or "generation failed", type=type_, code=code)


def usage(result: GenerateResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.tokens),
            "total_tokens": result.prompt_tokens + len(result.tokens)}


class Shape:
    """The response objects of one call (ids and timestamps shared by its chunks)."""

    def __init__(self, call: Call, model: str) -> None:
        self.call, self.model, self.created = call, model, int(time.time())
        chat = call.kind == "chat"
        self.id = ("chatcmpl-" if chat else "cmpl-") + call.request.id
        self.object = "chat.completion" if chat else "text_completion"
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def whole(self, result: GenerateResult) -> dict[str, Any]:
        finish = FINISH.get(result.stop_reason, "stop")
        if self.call.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text, "refusal": None},
                      "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": result.text, "finish_reason": finish, "logprobs": None}
        return {**self._head(self.object), "choices": [choice], "usage": usage(result)}

    def chunk(self, text: str | None, *, first: bool = False, finish: str | None = None) -> dict[str, Any]:
        if self.call.kind == "chat":
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if first:
                delta = {"role": "assistant", "content": text or ""}
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return {**self._head(self.chunk_object), "choices": [choice]}

    def final(self, result: GenerateResult) -> dict[str, Any]:
        return self.chunk(None, finish=FINISH.get(result.stop_reason, "stop"))

    def usage_chunk(self, result: GenerateResult) -> dict[str, Any]:
        return {**self._head(self.chunk_object), "choices": [], "usage": usage(result)}
