"""The head: the hub role that turns requests into pipelined generation steps.

It takes GenerateRequest JSON on `requests` (``mosquitto_pub`` works), tokenizes,
keeps every session's token history, publishes each step's input on `act/0`, reads the
sampled token from `sessions/{s}/out`, streams TokenEvents on `responses/{id}` and ends
with a GenerateResult. Many sessions are in flight at once: while one waits for its
token, the stages work on others.

Because the head keeps the history, a session whose KV cache was lost (a new epoch, a
node that restarted) is re-prefilled from position 0: no request is lost to a replan.
The same re-prefill is the step retry: a session that makes no progress for much longer
than its own measured step time (a message lost to a frozen or reconnecting node: QoS 1
gives up after 5 s, clean sessions drop what was queued) is re-sent, with backoff; the
nodes' KV alignment rule makes that idempotent, and outputs are accepted once per
(epoch, chain, step).

Request ids belong to their client: a request made on `requests/{c}` is known by (c, id),
one on the open `requests` topic by (None, id), and its session id on the wire (envelopes,
`sessions/{s}/out`, the nodes' KV caches) is derived from both: one user's ids never
reach another user's request. A CancelRequest on `cancel/{c}` (or `cancel`) stops a
request of that client: no step is sent after it, the nodes free the session's KV, and
the result says `cancelled`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np
import structlog

from linguamq import topics
from linguamq.hub.chat import ChatEncoder, ChatError, no_chat
from linguamq.hub.textstream import TextStream, stop_reason
from linguamq.schemas import envelope
from linguamq.schemas.cluster import NodeStatus, Plan, Telemetry
from linguamq.schemas.envelope import ActHeader
from linguamq.schemas.errors import SchemaError
from linguamq.schemas.manifest import ModelManifest
from linguamq.schemas.requests import (
    MAX_TOKENS_LIMIT,
    CancelRequest,
    ErrorCode,
    ErrorReport,
    GenerateRequest,
    GenerateResult,
    StopReason,
    TokenEvent,
)
from linguamq.schemas.wire import parse_json
from linguamq.topics.client import MqttClient, MqttError

log = structlog.get_logger()
MAX_REPREFILLS = 3  # per session, after nodes lost its KV; then the request fails
STEP_HISTORY = 32  # step times kept per session (and for the head), for the retry bound
PREFILL_CHUNK = 256  # prompt tokens per envelope (run-local runs its prompts in the same chunks)
Key = tuple[str | None, str]


def prefill_chunks(length: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of the chunks a prompt of ``length`` tokens goes out in (size 0: one)."""
    size = size or length
    return [(start, min(start + size, length)) for start in range(0, length, size)]  # (the client of `requests/{client}`, None for the open topic; request id)


def session_id(key: Key) -> str:
    """The session id on the wire for a request: unique per (client, request id), a topic id.
    The request id's start keeps logs readable; the digest of both keeps it unique (client
    ids are never empty and never hold the separator)."""
    client, request = key
    digest = hashlib.sha256(f"{client or ''}/{request}".encode()).hexdigest()[:24]
    return f"{request[:39]}-{digest}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadSettings:
    name: str = "head"
    cluster: str = "home"
    max_sessions: int = 64  # in flight at once; more wait in the queue
    max_queued: int = 1024  # waiting requests; more are refused
    step_timeout_s: float = 60.0  # no token for this long: the request fails
    retry_min_s: float = 3.0  # a step is re-sent after max(retry_min_s, retry_factor x median step) ...
    retry_factor: float = 10.0
    max_retries: int = 4  # ... doubling each time; a step that still gets no token after this many fails
    max_prompt_tokens: int = 4096
    # A (re-)prefill goes out in chunks of this many tokens (0: whole): a node runs other
    # sessions' steps between two chunks, and stages work on successive chunks at once.
    prefill_chunk: int = PREFILL_CHUNK
    max_tokens: int = 0  # cap on a request's max_tokens (0: the schema's cap and the model's context)
    rate: float = 0.0  # requests per second per client (its `client` field); 0: no limit
    burst: int = 10  # requests a client may send at once before the rate applies
    telemetry_interval_s: float = 1.0  # the hub's Telemetry (rejections) on hub/telemetry
    # The ring: the tail sends each next step to the first stage itself and the head only
    # watches the tokens; off (hub --no-ring), the head sends every step as it gets its token.
    ring: bool = True

    def __post_init__(self) -> None:
        if self.prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0 (0: whole prompts), got {self.prefill_chunk}")


@dataclasses.dataclass(frozen=True)
class _Ticket:
    """A request as it arrived: the client of its topic (None: the open `requests`) decides
    where its answers go and, with its id, whose it is."""

    request: GenerateRequest
    reply_to: str | None

    @property
    def key(self) -> Key:
        return self.reply_to, self.request.id


@dataclasses.dataclass
class _Session:
    request: GenerateRequest
    prompt: list[int]
    reply_to: str | None = None  # the client of `requests/{client}`; None: the open `requests` topic
    stream: TextStream = dataclasses.field(init=False)  # made right after the session: it streams to it
    tokens: list[int] = dataclasses.field(default_factory=list)
    epoch: int = 0
    step: int = 0
    t_start: float = 0.0
    t_first: float = 0.0
    t_last: float = 0.0  # last progress, for the step timeout
    t_sent: float = 0.0  # the current step (or its last retry) was sent, for the retry bound
    inputs: int = 0  # tokens in the step in flight: 1 decoding, more for a (re-)prefill
    step_times: deque[float] = dataclasses.field(default_factory=lambda: deque(maxlen=STEP_HISTORY))
    retries: int = 0  # re-sends of the current step; reset by a token
    reprefills: int = 0  # after a node lost the session's KV (evicted, expired, restarted)
    chain: int = 0  # the chain of its last (re-)prefill: nodes drop steps of older ones

    @property
    def id(self) -> str:
        """The session id on the wire."""
        return session_id((self.reply_to, self.request.id))

    @property
    def max_tokens(self) -> int:
        """The request's limit; a request without one got it in ``_enqueue``, before its session."""
        assert self.request.max_tokens is not None
        return self.request.max_tokens


class Head:
    def __init__(self, *, client: MqttClient, manifest: ModelManifest, encode: Callable[[str], list[int]],
                 decode: Callable[[list[int]], str], encode_chat: ChatEncoder = no_chat,
                 settings: HeadSettings = HeadSettings(), rss_mb: Callable[[], float] = lambda: 0.0) -> None:
        self._client, self._manifest, self.settings = client, manifest, settings
        self._encode_chat = encode_chat  # a request's messages -> prompt ids (hub/chat.py; injected like encode)
        self._rss_mb = rss_mb  # this process's memory, for its telemetry (the hub passes node.system's)
        self._eos = frozenset(manifest.eos_token_ids)
        self._encode, self._decode = encode, decode
        self._cluster = settings.cluster
        self._lock = threading.RLock()
        self._sessions: dict[str, _Session] = {}  # by session id on the wire (session_id)
        # Requests received and not started (being tokenized, or queued), for duplicates and the
        # max_queued bound, which also bounds the intake queue.
        self._waiting: dict[Key, _Ticket] = {}
        self._intake: queue.SimpleQueue[_Ticket | None] = queue.SimpleQueue()  # to tokenize, in arrival order
        self._queue: deque[tuple[_Ticket, list[int]]] = deque()  # tokenized, waiting for room: (request, prompt)
        self._plan: Plan | None = None
        self._status: dict[str, NodeStatus] = {}
        self._ready_epoch = 0  # the epoch whose stages all reported ready
        self._step_times: deque[float] = deque(maxlen=STEP_HISTORY)  # every session's, for a first step
        self._prefill_rates: deque[float] = deque(maxlen=STEP_HISTORY)  # seconds per prompt token of prefills
        self.retries = 0  # steps re-sent, all sessions (tests and the chaos bench read it)
        # Chains are numbered across sessions: a request id asked again after its end starts a
        # chain newer than the ended one, which the nodes would drop otherwise.
        self._chains = itertools.count(1)
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.errors = 0  # watchdog rounds that failed (logged, then tried again)
        self._intake_thread: threading.Thread | None = None
        self.rejected = 0  # messages refused (bad payloads, refused requests), reported in its telemetry
        self.tokens_generated = 0  # reported in its telemetry: tokens/s on the dashboard
        self.also_rejected: Callable[[], int] = lambda: 0  # the hub adds its planner's count
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, monotonic time)
        self._seq, self._t_telemetry = 0, 0.0

    def start(self) -> None:
        c, cl = self._client, self._cluster
        # plan and status are followed by the planner too, which reports what does not decode
        c.subscribe(topics.PLAN, topics.PLAN.build(cl), self._on_plan, on_reject=_planner_reports)
        c.subscribe(topics.NODE_STATUS, topics.NODE_STATUS.filter(cl), self._on_status, on_reject=_planner_reports)
        c.subscribe(topics.SESSION_OUT, topics.SESSION_OUT.filter(cl), self._on_out, on_reject=self._reject)
        c.subscribe(topics.ERRORS, topics.ERRORS.filter(cl), self._on_error, on_reject=self._reject)
        c.subscribe(topics.REQUESTS, topics.REQUESTS.build(cl), self._on_request, on_reject=self._reject_request)
        c.subscribe(topics.REQUESTS_FROM, topics.REQUESTS_FROM.filter(cl), self._on_client_request,
                    on_reject=self._reject_request)
        c.subscribe(topics.CANCEL, topics.CANCEL.build(cl), self._on_cancel, on_reject=self._reject)
        c.subscribe(topics.CANCEL_FROM, topics.CANCEL_FROM.filter(cl), self._on_client_cancel, on_reject=self._reject)
        self._watchdog = threading.Thread(target=self._watch, name="head-watchdog", daemon=True)
        self._watchdog.start()
        self._intake_thread = threading.Thread(target=self._take_in, name="head-intake", daemon=True)
        self._intake_thread.start()

    def stop(self) -> None:
        """Stop, ending every running session first: with the ring only the head ends a
        chain, and on an external broker the nodes would run each to its max_tokens."""
        self._stop.set()
        self._intake.put(None)
        for thread in (self._watchdog, self._intake_thread):
            if thread is not None:
                thread.join(timeout=5)
        with self._lock:
            sessions = list(self._sessions.values())
            try:
                for session in sessions:
                    self._finish(session, "error", "the hub stopped")
                if sessions:  # its end again, acknowledged: one connection, in order, so all are there
                    self._end_session(sessions[-1], wait=2.0)
            except MqttError as exc:  # the broker is gone: the nodes stop the ring on the head's silence
                log.warning("sessions not ended at stop", sessions=len(sessions), error=str(exc))

    @property
    def ready(self) -> bool:
        """Every stage of the current plan has loaded its pieces."""
        return self._plan is not None and self._ready_epoch == self._plan.epoch

    # --- requests ------------------------------------------------------------------

    def _on_client_request(self, topic: str, request: GenerateRequest, retained: bool) -> None:
        """A request on `requests/{c}` (a secured cluster's ACL lets only user c publish there):
        its client is c, and everything about it goes to `responses/{c}/{id}` and `errors/{c}`."""
        client = str(topics.parse(topic)["client"])
        if request.client is not None and request.client != client:
            with self._lock:
                return self._fail(dataclasses.replace(request, client=client), f"the request says client "
                                  f"{request.client!r} but came on the topic of {client!r}", code="bad_request",
                                  reply_to=client)
        self._on_request(topic, dataclasses.replace(request, client=client), retained, reply_to=client)

    def _response_name(self, request: str, reply_to: str | None) -> str:
        """Where a request's TokenEvents and result go: `responses/{c}/{id}` if it came on
        `requests/{c}`, else `responses/{id}`."""
        return topics.response_topic(self._cluster, request, reply_to)

    def _on_request(self, topic: str, request: GenerateRequest, retained: bool, reply_to: str | None = None) -> None:
        """Checks that need no tokenizer, on paho's thread; the prompt goes to the intake thread."""
        ticket = _Ticket(request.seeded(), reply_to)
        request = ticket.request
        with self._lock:
            if ticket.key in self._waiting or session_id(ticket.key) in self._sessions:
                # A client that reconnected re-sends its request (linguamq/client.py): the original
                # goes on; the duplicate is only reported, never answered on its response topic.
                self.rejected += 1
                return self._client.report_error(
                    self._cluster, reporter=self.settings.name, to=request.client or self.settings.name,
                    topic=topic, code="bad_request", message=f"request id {request.id!r} is already in flight",
                    ref=request.id)
            fail = functools.partial(self._fail, request, reply_to=reply_to)
            if not self._take_token(request.client or "anonymous"):
                return fail(f"rate limited: client {request.client or 'anonymous'} sent more than "
                            f"{self.settings.rate:g} requests/s (burst {self.settings.burst})", code="rate_limited")
            if self.settings.max_tokens and (request.max_tokens or 0) > self.settings.max_tokens:
                return fail(f"max_tokens {request.max_tokens} exceeds this hub's cap of "
                            f"{self.settings.max_tokens} (--max-tokens)", code="too_large")
            if self._plan is not None and not self._plan.stages:
                return fail(f"no plan fits the nodes online: {self._plan.reason}", code="overloaded")
            if len(self._waiting) >= self.settings.max_queued:
                return fail("too many requests waiting", code="overloaded")
            self._waiting[ticket.key] = ticket
            self._intake.put(ticket)

    def _take_in(self) -> None:
        """The intake thread: tokenizes each request off paho's thread and outside the lock (a
        long prompt on a slow tokenizer must hold up neither other sessions' tokens nor the
        keep-alives), then queues it."""
        while (ticket := self._intake.get()) is not None:
            prompt = self._tokenize(ticket.request)
            try:
                with self._lock:
                    self._enqueue(ticket, prompt)
            except Exception:  # never lose the thread: every later request would wait forever
                log.exception("request intake failed", request=ticket.request.id)

    def _tokenize(self, request: GenerateRequest) -> list[int] | str:
        """The prompt's token ids (its text, or its messages in the chat template), or why not."""
        try:
            if request.prompt is None:
                return self._encode_chat(request.messages)
            return self._encode(request.prompt)
        except ChatError as exc:  # no template, or the template refused the messages
            return str(exc)
        except Exception as exc:  # a tokenizer may raise anything on odd input
            return f"cannot tokenize the prompt: {exc}"

    def _enqueue(self, ticket: _Ticket, prompt: list[int] | str) -> None:
        """Queue a tokenized request, or fail it if its prompt does not fit."""
        if self._waiting.get(ticket.key) is not ticket:
            return  # no longer waiting: cancelled, or failed with its plan, meanwhile
        request = ticket.request
        if isinstance(prompt, str):
            return self._fail_waiting(ticket, prompt, code="bad_request")
        if not prompt or len(prompt) > self.settings.max_prompt_tokens:
            return self._fail_waiting(ticket, f"prompt has {len(prompt)} tokens; 1.."
                                      f"{self.settings.max_prompt_tokens} accepted", code="too_large")
        if request.max_tokens is None:  # as many as fit (OpenAI's default): known once the prompt is
            room = min(self._manifest.max_context - len(prompt), self.settings.max_tokens or MAX_TOKENS_LIMIT,
                       MAX_TOKENS_LIMIT)
            if room < 1:
                return self._fail_waiting(ticket, f"prompt ({len(prompt)}) fills the model's context of "
                                          f"{self._manifest.max_context}", code="too_large")
            request = dataclasses.replace(request, max_tokens=room)
            ticket = self._waiting[ticket.key] = dataclasses.replace(ticket, request=request)
        if len(prompt) + (request.max_tokens or 0) > self._manifest.max_context:
            return self._fail_waiting(ticket, f"prompt ({len(prompt)}) + max_tokens ({request.max_tokens}) exceeds "
                                      f"the model's context of {self._manifest.max_context}", code="too_large")
        if self._plan is not None and not self._plan.stages:
            return self._fail_waiting(ticket, f"no plan fits the nodes online: {self._plan.reason}", code="overloaded")
        self._queue.append((ticket, prompt))
        self._admit()

    def _fail_waiting(self, ticket: _Ticket, message: str, *, code: ErrorCode) -> None:
        del self._waiting[ticket.key]
        self._fail(ticket.request, message, code=code, reply_to=ticket.reply_to)

    def _admit(self) -> None:
        """Start queued requests while there is room and a ready pipeline."""
        while self.ready and self._queue and len(self._sessions) < self.settings.max_sessions \
                and not self._stop.is_set():
            ticket, prompt = self._queue.popleft()
            del self._waiting[ticket.key]
            request = ticket.request
            session = _Session(request=request, prompt=prompt, reply_to=ticket.reply_to)
            session.stream = TextStream(self._decode, request.stop, functools.partial(self._stream, session))
            self._sessions[session.id] = session
            session.t_start = time.perf_counter()
            self._prefill(session)

    # --- cancels -------------------------------------------------------------------

    def _on_client_cancel(self, topic: str, cancel: CancelRequest, retained: bool) -> None:
        """A cancel on `cancel/{c}` (only user c may publish there): it stops c's request only."""
        client = str(topics.parse(topic)["client"])
        if cancel.client is not None and cancel.client != client:
            return self._refuse_cancel(topic, cancel, client, f"the cancel says client {cancel.client!r} but came on "
                                       f"the topic of {client!r}")
        self._cancel(topic, cancel, (client, cancel.id), client)

    def _on_cancel(self, topic: str, cancel: CancelRequest, retained: bool) -> None:
        """A cancel on the open `cancel` topic, for a request made on `requests` by the same client."""
        self._cancel(topic, cancel, (None, cancel.id), cancel.client)

    def _cancel(self, topic: str, cancel: CancelRequest, key: Key, client: str | None) -> None:
        """Stop the request ``key`` if ``client`` made it: a session ends at once (the step in
        flight is dropped when it answers; its `end` envelope frees the nodes' KV)."""
        with self._lock:
            session, ticket = self._sessions.get(session_id(key)), self._waiting.get(key)
            if session is not None and session.request.client == client:
                log.info("request cancelled", request=cancel.id, client=client, tokens=len(session.tokens))
                return self._finish(session, "cancelled")
            if ticket is not None and ticket.request.client == client:
                log.info("request cancelled", request=cancel.id, client=client, tokens=0)
                del self._waiting[key]  # being tokenized (the intake thread then drops it) or queued
                self._queue = deque(item for item in self._queue if item[0] is not ticket)
                return self._answer(ticket.request, ticket.reply_to, "cancelled")
            self._refuse_cancel(topic, cancel, client, f"no request {cancel.id!r} of yours in flight")

    def _refuse_cancel(self, topic: str, cancel: CancelRequest, client: str | None, message: str) -> None:
        self.rejected += 1
        self._client.report_error(self._cluster, reporter=self.settings.name, to=client or self.settings.name,
                                  topic=topic, code="bad_request", message=message, ref=cancel.id)

    def _prefill(self, session: _Session) -> None:
        """Send the whole history from position 0 under the ready epoch, in chunks of
        ``prefill_chunk`` tokens (all but the last marked `more`: the tail samples nothing).

        At step k the session waits for token k+1; prompt + its k tokens are exactly the
        inputs that lead there, so a re-prefill at the same step yields the same token
        (sampling is seeded per step)."""
        session.epoch, session.t_last = self._ready_epoch, time.perf_counter()
        session.chain = next(self._chains)  # a new chain: the nodes drop what is left of the old one
        history = np.asarray([session.prompt + session.tokens], dtype=np.int64)
        session.t_sent, session.inputs = time.perf_counter(), history.shape[1]
        for start, end in prefill_chunks(history.shape[1], self.settings.prefill_chunk):  # in order on one
            self._send(session, history[:, start:end], start_pos=start, more=end < history.shape[1])  # connection

    def _expected_s(self, session: _Session) -> float:
        """What the step in flight should take: the session's median decode step (the
        head's, before its first token); for a (re-)prefill at least its prompt times the
        median seconds per token of the prefills seen (a long prompt on a slow pipeline
        takes long, and is no loss)."""
        times = session.step_times or self._step_times
        median = float(np.median(times)) if times else 0.0
        if session.inputs > 1 and self._prefill_rates:
            median = max(median, session.inputs * float(np.median(self._prefill_rates)))
        return median

    def _retry_after(self, session: _Session) -> float:
        """Seconds without a token before the current step is re-sent: many times what it
        should take, doubling per retry."""
        s = self.settings
        return max(s.retry_min_s, s.retry_factor * self._expected_s(session)) * 2 ** session.retries

    def _step_timeout(self, session: _Session) -> float:
        """Seconds without progress before the request fails: ``step_timeout_s``, or for a
        step expected to be long (a long prompt) room for its first retry to complete."""
        s = self.settings
        return max(s.step_timeout_s, (s.retry_factor + 1) * self._expected_s(session) * 2)

    def _send(self, session: _Session, ids: np.ndarray, *, start_pos: int, more: bool = False) -> None:
        request = session.request
        header = ActHeader.for_tensor(ids, session=session.id, request=request.id, step=session.step,
                                      epoch=session.epoch, piece=0, start_pos=start_pos, sampling=request.sampling,
                                      more=more, chain=session.chain,
                                      ring=session.max_tokens if self.settings.ring else 0)
        self._client.publish(topics.ACT, topics.ACT.build(self._cluster, piece=0), envelope.encode(header, ids))

    # --- tokens --------------------------------------------------------------------

    def _on_out(self, topic: str, value: tuple[ActHeader, np.ndarray], retained: bool) -> None:
        header, token_array = value
        with self._lock:
            session = self._sessions.get(header.session)
            if session is None or (header.epoch, header.chain, header.step) != \
                    (session.epoch, session.chain, session.step):
                # finished, re-prefilled under a newer epoch, a redelivered duplicate, or a token of
                # a chain a retry replaced: the new chain's tail feeds its own token into the KV
                return
            if token_array.shape != (1, 1) or token_array.dtype.kind not in "iu":
                return self._finish(session, "error", f"tail sent a {token_array.dtype} {token_array.shape} token")
            self._advance(session, int(token_array[0, 0]))

    def _advance(self, session: _Session, token: int) -> None:
        now = time.perf_counter()
        if session.inputs > 1:
            self._prefill_rates.append((now - session.t_sent) / session.inputs)
        else:
            session.step_times.append(now - session.t_sent)
            self._step_times.append(now - session.t_sent)
        session.tokens.append(token)
        self.tokens_generated += 1
        session.t_last, session.retries = now, 0
        if len(session.tokens) == 1:
            session.t_first = now
        if token not in self._eos and len(session.tokens) < session.max_tokens:
            # The next step is under way before the text work (decoding, TokenEvent): the
            # pipeline computes while the head streams. With the ring the tail sent it already,
            # before this token; without, it goes out here. If the text then holds a stop
            # string, the session ends: its `end` reaches every stage after that step, which
            # is dropped (its token finds no session; a step the tail sent ahead of it finds
            # the session ended at the first stage).
            session.step += 1
            session.t_sent, session.inputs = time.perf_counter(), 1
            if not self.settings.ring:
                start = len(session.prompt) + len(session.tokens) - 1
                self._send(session, np.asarray([[token]], dtype=np.int64), start_pos=start)
        reason = stop_reason(token, self._eos, session.stream, session.tokens, session.max_tokens)
        if reason is not None:
            return self._finish(session, reason)

    def _stream(self, session: _Session, text: str) -> None:
        """Publish newly final text; long text (a held-back stop-string prefix) goes in pieces."""
        request = session.request.id
        name = self._response_name(request, session.reply_to)
        for i in range(0, len(text), 1024):
            event = TokenEvent(request=request, index=len(session.tokens) - 1, token=session.tokens[-1],
                               text=text[i:i + 1024])
            self._client.publish(topics.RESPONSES, name, event)

    def _finish(self, session: _Session, reason: StopReason, error: str | None = None) -> None:
        self._sessions.pop(session.id, None)
        text = session.stream.finish(session.tokens) if reason != "error" else ""
        n = len(session.tokens)
        result = GenerateResult(
            request=session.request.id, text=text, tokens=tuple(session.tokens), prompt_tokens=len(session.prompt),
            ttft_ms=(session.t_first - session.t_start) * 1e3 if n else 0.0,
            ms_per_token=(session.t_last - session.t_first) * 1e3 / (n - 1) if n > 1 else 0.0,
            stop_reason=reason, error=error, seed=session.request.sampling.seed)
        self._client.publish(topics.RESPONSES, self._response_name(session.request.id, session.reply_to), result)
        self._end_session(session)
        log.info("request done", request=session.request.id, tokens=n, reason=reason, error=error)
        self._admit()

    def _end_session(self, session: _Session, wait: float | None = None) -> None:
        """Tell every stage to free the session's KV cache (an empty envelope marked end)."""
        empty = np.zeros((1, 0), dtype=np.int64)
        header = ActHeader.for_tensor(empty, session=session.id, request=session.request.id,
                                      step=session.step, epoch=session.epoch, piece=0, start_pos=0, end=True,
                                      chain=session.chain)
        self._client.publish(topics.ACT, topics.ACT.build(self._cluster, piece=0), envelope.encode(header, empty),
                             wait=wait)

    # --- cluster state ---------------------------------------------------------------

    def _on_plan(self, topic: str, plan: Plan, retained: bool) -> None:
        with self._lock:
            self._plan = plan
            if not plan.stages:  # the planner found no placement for the nodes left: say so, do not hang
                message = f"no plan fits the nodes online: {plan.reason}"
                for session in list(self._sessions.values()):
                    self._finish(session, "error", message)
                for ticket in list(self._waiting.values()):  # queued, or being tokenized
                    self._fail_waiting(ticket, message, code="overloaded")
                self._queue.clear()
                return
            self._check_ready()

    def _on_status(self, topic: str, status: NodeStatus, retained: bool) -> None:
        try:
            if topics.parse(topic)["node"] != status.node:
                return  # one node speaking for another (the planner reports it)
        except topics.TopicError:
            return  # a topic that breaks the id rules (the planner reports it)
        with self._lock:
            self._status[status.node] = status
            self._check_ready()

    def _check_ready(self) -> None:
        plan = self._plan
        if plan is None or plan.epoch == self._ready_epoch or not plan.stages:
            return
        if all((s := self._status.get(stage.node)) is not None and s.state == "ready" and s.epoch == plan.epoch
               for stage in plan.stages):
            self._ready_epoch = plan.epoch
            log.info("pipeline ready", epoch=plan.epoch, stages=len(plan.stages))
            for session in list(self._sessions.values()):  # their KV is gone: re-prefill
                self._prefill(session)
            self._admit()

    def _on_error(self, topic: str, report: ErrorReport, retained: bool) -> None:
        with self._lock:
            session = self._sessions.get(report.ref or "")
            if session is None or report.reporter == self.settings.name:
                return
            if report.code == "stale_epoch":
                # A replan is under way: a node switched before the head, which re-prefills every
                # session once the new epoch is ready (the step watchdog ends one that never is).
                return
            if report.code == "unknown_session" and self._ready_epoch > session.epoch:
                return  # the re-prefill under the new epoch is already on its way
            if report.code == "unknown_session" and session.reprefills < MAX_REPREFILLS:
                session.reprefills += 1  # a node dropped its KV (bounds, expiry): rebuild it
                return self._prefill(session)
            self._finish(session, "error", f"{report.reporter}: {report.message}")

    def _watch(self) -> None:
        """Every 250 ms: the step watchdog, then the hub's telemetry. A round that fails (a
        publish refused during a broker blip) is logged and counted, and the next one tries
        again: a dead watchdog would retry and time out no step ever again."""
        while not self._stop.wait(0.25):
            self._guarded(self._check_all)
            self._guarded(self._publish_telemetry)

    def _check_all(self) -> None:
        with self._lock:
            self._check_progress(time.perf_counter())

    def _guarded(self, work: Callable[[], None]) -> None:
        try:
            work()
        except Exception:
            self.errors += 1
            log.exception("head watchdog round failed, will try again", errors=self.errors)

    def _check_progress(self, now: float) -> None:
        """Fail sessions past the step timeout; re-send the step of those stuck for long.

        A retry is the re-prefill of the session's whole history under the ready epoch: the
        nodes' alignment rule makes it idempotent, whether the step was lost (frozen node,
        QoS 1 given up, a reconnect) or only late. No retry while a replan is under way:
        the new epoch re-prefills every session anyway."""
        s = self.settings
        for session in list(self._sessions.values()):
            if now - session.t_last > (timeout := self._step_timeout(session)):
                self._finish(session, "error", f"no token for {timeout:.0f} s (step {session.step}, "
                             f"{session.retries} retries)")
            elif (self.ready and session.epoch == self._ready_epoch
                  and now - session.t_sent > self._retry_after(session)):
                if session.retries >= s.max_retries:
                    self._finish(session, "error", f"no token for step {session.step} after {session.retries} "
                                 f"retries ({now - session.t_last:.1f} s)")
                    continue
                session.retries += 1
                self.retries += 1
                log.info("step retried", request=session.request.id, step=session.step, retry=session.retries,
                         waited_s=round(now - session.t_sent, 2))
                t_last = session.t_last
                try:
                    self._prefill(session)
                finally:
                    session.t_last = t_last  # a retry is not progress, sent or not: the step timeout still counts

    # --- rejects -----------------------------------------------------------------------

    def _fail(self, request: GenerateRequest, message: str, *, code: ErrorCode, reply_to: str | None) -> None:
        self.rejected += 1
        self._answer(request, reply_to, "error", message, code=code)
        self._client.report_error(self._cluster, reporter=self.settings.name, to=request.client or self.settings.name,
                                  topic=topics.REQUESTS.build(self._cluster), code=code, message=message,
                                  ref=request.id)

    def _answer(self, request: GenerateRequest, reply_to: str | None, reason: StopReason,
                error: str | None = None, *, code: ErrorCode | None = None) -> None:
        """The final result of a request that never started."""
        result = GenerateResult(request=request.id, text="", tokens=(), prompt_tokens=0, ttft_ms=0.0,
                                ms_per_token=0.0, stop_reason=reason, error=error, code=code)
        self._client.publish(topics.RESPONSES, self._response_name(request.id, reply_to), result)

    def _reject_request(self, topic: str, payload: bytes, exc: Exception) -> None:
        """A request that does not decode: an error report, and a final error response if it has an id."""
        self.rejected += 1
        request_id, client = _salvage_ids(payload)
        private = _topic_client(topic)  # on `requests/{c}`: c, whatever the payload claims
        client = private or client
        code: ErrorCode = "too_large" if "exceeds" in str(exc) else "bad_payload"
        if request_id is not None:
            result = GenerateResult(request=request_id, text="", tokens=(), prompt_tokens=0, ttft_ms=0.0,
                                    ms_per_token=0.0, stop_reason="error", error=str(exc)[:1024], code=code)
            self._client.publish(topics.RESPONSES, topics.response_topic(self._cluster, request_id, private), result)
        self._client.report_error(self._cluster, reporter=self.settings.name, to=client or self.settings.name,
                                  topic=topic, code=code, message=str(exc), ref=request_id)

    def _take_token(self, client: str) -> bool:
        """Token bucket per client: ``burst`` at once, then ``rate`` per second."""
        rate, burst = self.settings.rate, self.settings.burst
        if rate <= 0:
            return True
        now = time.monotonic()
        tokens, then = self._buckets.get(client, (float(burst), now))
        tokens = min(float(burst), tokens + (now - then) * rate)
        if len(self._buckets) > 10_000:  # forget full buckets: a stream of invented client ids is bounded
            self._buckets = {c: (t, w) for c, (t, w) in self._buckets.items() if t + (now - w) * rate < burst}
        self._buckets[client] = (tokens - 1 if tokens >= 1 else tokens, now)
        return tokens >= 1

    def _publish_telemetry(self) -> None:
        """The hub's Telemetry on `hub/telemetry`: the head's (and the planner's) rejections,
        sessions in flight and queued, RSS. Not under `nodes/`: the head is no stage."""
        now = time.monotonic()
        if now - self._t_telemetry < self.settings.telemetry_interval_s:
            return
        self._t_telemetry, self._seq = now, self._seq + 1
        with self._lock:
            sessions, queued = len(self._sessions), len(self._waiting)
        report = Telemetry(node=self.settings.name, ts=time.time(), seq=self._seq, epoch=self._ready_epoch,
                           queue_depth=queued, sessions=sessions, rss_mb=self._rss_mb(),
                           rejected=self.rejected + self.also_rejected(), tokens=self.tokens_generated)
        try:
            self._client.publish(topics.HUB_TELEMETRY, topics.HUB_TELEMETRY.build(self._cluster), report)
        except MqttError as exc:
            log.debug("head telemetry not sent", error=str(exc))

    def _reject(self, topic: str, payload: bytes, exc: Exception) -> None:
        self.rejected += 1
        self._client.report_error(self._cluster, reporter=self.settings.name, to=self.settings.name, topic=topic,
                                  code="bad_payload", message=str(exc))


def _planner_reports(topic: str, payload: bytes, exc: Exception) -> None:
    """A plan or status that does not decode: the planner, which follows the same topics in
    the same hub, counts and reports it (once per message, not once per follower)."""


_SALVAGE = {key: re.compile(rb'"%s"\s*:\s*"([A-Za-z0-9_-]{1,64})"' % key.encode()) for key in ("id", "client")}


def _topic_client(topic: str) -> str | None:
    """The client of a `requests/{client}` topic; None for the open `requests` topic."""
    try:
        parsed = topics.parse(topic)
    except topics.TopicError:
        return None
    return str(parsed["client"]) if parsed.topic is topics.REQUESTS_FROM else None


def _salvage_ids(payload: bytes) -> tuple[str | None, str | None]:
    """The request and client ids of a rejected request, so its sender still gets a final
    answer: parsed if the JSON is readable, else looked for in its first 4 KiB (an
    oversized prompt usually comes after them)."""
    try:
        doc = parse_json(payload, max_bytes=GenerateRequest.MAX_BYTES)
    except SchemaError:
        doc = None
    if isinstance(doc, dict):
        return tuple(v if isinstance(v, str) and topics.is_id("request", v) else None  # type: ignore[return-value]
                     for v in (doc.get("id"), doc.get("client")))
    head = bytes(payload[:4096])
    found = [m.group(1).decode() if (m := _SALVAGE[key].search(head)) else None for key in ("id", "client")]
    return found[0], found[1]
