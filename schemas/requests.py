"""Messages between clients and the head: requests, cancels, streamed tokens, results, errors."""

from __future__ import annotations

import dataclasses
import secrets
from typing import Literal

from linguamq.schemas.errors import SchemaError
from linguamq.schemas.wire import ID_PATTERN, Message, Struct, parse_json, spec, struct

MAX_PROMPT_CHARS = 65536
MAX_MESSAGES = 256
MAX_TOKENS_LIMIT = 8192
SEED_MAX = 2**63 - 1


def random_seed() -> int:
    """A fresh seed for a request that names none. Below 2**53, so that a JSON reader that
    keeps numbers as doubles (JavaScript) can send it back unchanged to replay the answer."""
    return secrets.randbelow(2**53)


@struct
class Sampling(Struct):
    temperature: float = spec(ge=0, le=100, default=0.0, doc="0 means greedy")
    top_k: int = spec(ge=0, le=1_000_000, default=0, doc="0 means no top-k cut")
    top_p: float = spec(gt=0, le=1, default=1.0)
    seed: int | None = spec(ge=0, le=SEED_MAX, default=None,
                            doc="sampling is a function of (seed, step); none: the head picks one, reported in the result")


@struct
class ChatMessage(Struct):
    """One turn of a conversation; the head renders them with the model's chat template."""

    role: Literal["system", "user", "assistant"]
    content: str = spec(max_len=MAX_PROMPT_CHARS)


@struct
class GenerateRequest(Message):
    """Published on `requests`. "type" and "v" may be left out, so that
    `mosquitto_pub -t lmq/home/requests -m '{"id":"r1","prompt":"Hello","max_tokens":16}'` works.
    Exactly one of `prompt` (raw text) and `messages` (a chat, for instruct models) is given."""

    TYPE = "generate_request"
    TAG_OPTIONAL = True
    MAX_BYTES = 256 * 1024
    SCHEMA_RULES = {"oneOf": [{"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                              {"required": ["messages"], "properties": {"messages": {"minItems": 1}}}]}

    id: str = spec(pattern=ID_PATTERN)
    prompt: str | None = spec(max_len=MAX_PROMPT_CHARS, default=None, doc="raw text; or give messages")
    messages: tuple[ChatMessage, ...] = spec(max_len=MAX_MESSAGES, default=(),
                                             doc="a chat, rendered with the model's chat template; or give prompt")
    max_tokens: int | None = spec(ge=1, le=MAX_TOKENS_LIMIT, default=64,
                                  doc="null: as many as the model's context and the hub's cap allow")
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = spec(max_len=16, default=())
    client: str | None = spec(pattern=ID_PATTERN, default=None, doc="where errors are reported")

    def __post_init__(self) -> None:
        Struct.__post_init__(self)
        if (self.prompt is None) == (not self.messages):
            raise SchemaError("give either prompt or messages, not both or neither", field="prompt")
        if sum(len(m.content) for m in self.messages) > MAX_PROMPT_CHARS:
            raise SchemaError(f"the messages hold more than {MAX_PROMPT_CHARS} characters", field="messages")

    def seeded(self) -> GenerateRequest:
        """This request with a seed: its own, or a fresh one (users expect a new answer each
        time; the result reports the seed, so any answer can be replayed)."""
        if self.sampling.seed is not None:
            return self
        return dataclasses.replace(self, sampling=dataclasses.replace(self.sampling, seed=random_seed()))


@struct
class CancelRequest(Message):
    """Published on `cancel` (or `cancel/{client}`, beside `requests/{client}`) to stop a request
    in flight: its result then says `cancelled`. Only the request's own client may cancel it.
    Like a request, `mosquitto_pub -m '{"id":"r1"}'` works: "type" and "v" may be left out."""

    TYPE = "cancel"
    TAG_OPTIONAL = True

    id: str = spec(pattern=ID_PATTERN, doc="the request to stop")
    client: str | None = spec(pattern=ID_PATTERN, default=None, doc="the request's client, as the request said")


@struct
class TokenEvent(Message):
    """Streamed on `responses/{request}`, one per generated token."""

    TYPE = "token"

    request: str = spec(pattern=ID_PATTERN)
    index: int = spec(ge=0)
    token: int = spec(ge=0)
    text: str = spec(max_len=1024, doc="the text this token adds")


ErrorCode = Literal["bad_payload", "bad_request", "unknown_session", "stale_epoch",
                  "too_large", "overloaded", "rate_limited", "internal"]

StopReason = Literal["eos", "max_tokens", "stop", "error", "cancelled"]


@struct
class GenerateResult(Message):
    """The final message on `responses/{request}`; same keys as `run-local --json`."""

    TYPE = "result"

    request: str = spec(pattern=ID_PATTERN)
    text: str = spec(max_len=4 * MAX_TOKENS_LIMIT * 16)
    tokens: tuple[int, ...] = spec(ge=0, max_len=MAX_TOKENS_LIMIT)
    prompt_tokens: int = spec(ge=0)
    ttft_ms: float = spec(ge=0)
    ms_per_token: float = spec(ge=0)
    stop_reason: StopReason
    error: str | None = spec(max_len=1024, default=None)
    seed: int | None = spec(ge=0, le=SEED_MAX, default=None, doc="the sampling seed used: send it to replay the answer")
    code: ErrorCode | None = spec(default=None, doc="why a request was refused (with stop_reason error), as on errors/")



@struct
class ErrorReport(Message):
    """Published on `errors/{client}` by whoever rejected a message."""

    TYPE = "error"

    reporter: str = spec(pattern=ID_PATTERN, doc="who rejected the message")
    topic: str = spec(max_len=1024, doc="where the rejected message was published")
    code: ErrorCode
    message: str = spec(max_len=1024)
    ref: str | None = spec(max_len=128, default=None, doc="request or session id, if known")
    ts: float = spec(ge=0)


def decode_response(payload: bytes | bytearray | memoryview | str) -> TokenEvent | GenerateResult:
    """A message of `responses/{request}`: a TokenEvent or the final GenerateResult."""
    doc = parse_json(payload, max_bytes=GenerateResult.MAX_BYTES)
    kinds: dict[str, type[TokenEvent] | type[GenerateResult]] = {TokenEvent.TYPE: TokenEvent,
                                                                 GenerateResult.TYPE: GenerateResult}
    tag = doc.get("type") if isinstance(doc, dict) else None
    cls = kinds.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise SchemaError(f"expected one of {sorted(kinds)}", field="type")
    return cls.from_dict(doc)
