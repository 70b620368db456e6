"""The head's requests, without a network: whose they are, and what reaches them.

Request ids are per client: a request made on `requests/{client}` is known by (client, id),
its session on the wire by an id derived from both, and its answers go to
`responses/{client}/{id}`; another user's request with the same id, hostile or not, is
another request.
"""

from __future__ import annotations

import threading
import time

from linguamq import topics
from linguamq.hub.chat import ChatTemplate, chat_encoder
from linguamq.schemas.envelope import ActHeader
from linguamq.schemas.examples import MANIFEST
from linguamq.schemas.requests import CancelRequest, ChatMessage, GenerateRequest, GenerateResult, Sampling, TokenEvent

CLUSTER = "t-req"


def within(predicate, timeout: float = 5.0) -> bool:
    """Whether ``predicate`` came true within ``timeout`` seconds (a bound, not a speed)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def wait_until(predicate, timeout: float = 5.0) -> None:
    assert within(predicate, timeout), "timed out"


def last_act(client, prompt_len: int) -> ActHeader:
    """The latest step of the session whose prompt had ``prompt_len`` tokens."""
    firsts = {a.session for a in client.acts() if a.step == 0 and a.shape == (1, prompt_len)}
    return [a for a in client.acts() if a.session in firsts][-1]


def answers(client, user: str, request: str) -> tuple[str, GenerateResult | None]:
    """(streamed text, final result) on `responses/{user}/{request}`."""
    got = client.on(topics.response_topic(client.cluster, request, user))
    results = [v for v in got if isinstance(v, GenerateResult)]
    return "".join(v.text for v in got if isinstance(v, TokenEvent)), (results[-1] if results else None)


def test_another_users_request_with_the_same_id_does_not_disturb_the_stream(make_head) -> None:
    head, client = make_head(cluster=CLUSTER, retry_min_s=30.0)
    try:
        client.ask(GenerateRequest(id="r1", prompt="abc", max_tokens=3), user="alice")
        client.token(last_act(client, 3), 0)  # "a"
        # bob, on his own topic, claims alice's id and name: refused, and answered to bob only
        client.ask(GenerateRequest(id="r1", prompt="zz", max_tokens=3, client="alice"), user="bob")
        refused = answers(client, "bob", "r1")[1]
        assert refused is not None and refused.stop_reason == "error" and "came on the topic of 'bob'" in refused.error
        client.token(last_act(client, 3), 1)  # "b"
        client.token(last_act(client, 3), 3)  # "d"
        text, result = answers(client, "alice", "r1")
        assert result is not None and (result.error, result.tokens, text) == (None, (0, 1, 3), "abd")
        assert client.on(topics.response_topic(CLUSTER, "r1")) == []  # nothing of hers went astray
        assert [v for v in client.on(topics.response_topic(CLUSTER, "r1", "bob")) if v is not refused] == []
    finally:
        head.stop()


def test_two_users_may_use_the_same_request_id_at_once(make_head) -> None:
    head, client = make_head(cluster=CLUSTER, retry_min_s=30.0)
    try:
        client.ask(GenerateRequest(id="same", prompt="abc", max_tokens=2), user="alice")
        client.ask(GenerateRequest(id="same", prompt="wxyz", max_tokens=2), user="bob")
        assert client.errors == []  # bob's is no duplicate of alice's
        alice, bob = last_act(client, 3), last_act(client, 4)
        assert alice.session != bob.session and alice.request == bob.request == "same"
        assert all(topics.is_id("session", s) for s in (alice.session, bob.session))
        client.token(bob, 20)  # "u"
        client.token(alice, 0)  # "a"
        client.token(last_act(client, 4), 21)  # "v"
        client.token(last_act(client, 3), 1)  # "b"
        assert answers(client, "alice", "same")[0] == "ab" and answers(client, "alice", "same")[1].tokens == (0, 1)
        assert answers(client, "bob", "same")[0] == "uv" and answers(client, "bob", "same")[1].tokens == (20, 21)
        assert {e.session for e in client.ends()} == {alice.session, bob.session}  # each one's KV freed
    finally:
        head.stop()


def test_the_same_user_resending_an_id_in_flight_is_reported_not_run_twice(make_head) -> None:
    head, client = make_head(cluster=CLUSTER, retry_min_s=30.0)
    try:
        client.ask(GenerateRequest(id="r2", prompt="abc", max_tokens=1), user="alice")
        client.ask(GenerateRequest(id="r2", prompt="abc", max_tokens=1), user="alice")
        assert "already in flight" in client.errors[-1]["message"] and client.errors[-1]["to"] == "alice"
        assert len(client.acts()) == 1
    finally:
        head.stop()


def test_a_prompt_being_tokenized_holds_up_no_other_sessions_tokens(make_head) -> None:
    """paho's thread delivers a big request, then a token of a session already streaming:
    that token reaches its client while the big prompt is still being tokenized."""
    release = threading.Event()

    def encode(text: str) -> list[int]:
        if text.startswith("big"):
            release.wait(30)  # a slow tokenizer on a long prompt; it finishes once released
        if text == "odd":
            raise ValueError("cannot read this")
        return [5] * min(len(text), 200)

    head, client = make_head(cluster=CLUSTER, retry_min_s=30.0, encode=encode)
    network = None
    try:
        client.ask(GenerateRequest(id="small", prompt="abc", max_tokens=3), user="alice")
        streaming = last_act(client, 3)

        def deliver() -> None:  # in order, on one thread, as paho does
            client.handlers["requests_from"](topics.REQUESTS_FROM.build(CLUSTER, client="bob"),
                                             GenerateRequest(id="big", prompt="big " * 1000, max_tokens=2), False)
            client.token(streaming, 0)

        network = threading.Thread(target=deliver, daemon=True)
        network.start()
        arrived = within(lambda: answers(client, "alice", "small")[0] == "a", timeout=10)
        release.set()
        assert arrived, "alice's token waited for bob's prompt to be tokenized"
        wait_until(lambda: any(a.shape == (1, 200) for a in client.acts()))  # then bob's prefill leaves
        client.ask(GenerateRequest(id="odd", prompt="odd"), user="bob")  # a tokenizer error is still answered
        refused = answers(client, "bob", "odd")[1]
        assert refused is not None and refused.error == "cannot tokenize the prompt: cannot read this"
    finally:
        release.set()
        if network is not None:
            network.join(10)
        head.stop()


def test_a_request_without_a_seed_gets_a_fresh_one_and_its_result_names_it(make_head) -> None:
    head, client = make_head(cluster=CLUSTER, retry_min_s=30.0)
    try:
        hot = Sampling(temperature=1.0)
        for rid, prompt, sampling in (("a", "abc", hot), ("b", "wxyz", hot), ("c", "ab", Sampling(temperature=1.0,
                                                                                                 seed=5))):
            client.ask(GenerateRequest(id=rid, prompt=prompt, max_tokens=1, sampling=sampling), user="alice")
        a, b, c = (last_act(client, n) for n in (3, 4, 2))
        assert a.sampling.seed is not None and b.sampling.seed is not None and a.sampling.seed != b.sampling.seed
        assert c.sampling.seed == 5  # an explicit seed is kept
        for header in (a, b, c):
            client.token(header, 9)
        assert [answers(client, "alice", r)[1].seed for r in "abc"] == [a.sampling.seed, b.sampling.seed, 5]
    finally:
        head.stop()


def test_a_cancel_ends_the_request_within_a_step_and_frees_its_kv(make_head) -> None:
    head, client = make_head(cluster=CLUSTER, retry_min_s=30.0)
    try:
        client.ask(GenerateRequest(id="r1", prompt="abc", max_tokens=50), user="alice")
        client.token(last_act(client, 3), 0)  # "a"
        in_flight = last_act(client, 3)  # step 1 is computing
        client.cancel(CancelRequest(id="r1"), user="alice")
        text, result = answers(client, "alice", "r1")
        assert result is not None and (result.stop_reason, result.tokens, result.text, text) == (
            "cancelled", (0,), "a", "a")
        (end,) = client.ends()  # the nodes free the session's KV
        assert end.session == in_flight.session
        steps = len(client.acts())
        client.token(in_flight, 1)  # the step in flight answers after the cancel: dropped
        assert len(client.acts()) == steps and [r for r in client.on(topics.response_topic(CLUSTER, "r1", "alice"))
                                                if isinstance(r, GenerateResult)] == [result]
    finally:
        head.stop()


def test_only_the_requests_own_client_may_cancel_it(make_head) -> None:
    head, client = make_head(cluster=CLUSTER, retry_min_s=30.0)
    try:
        client.ask(GenerateRequest(id="r1", prompt="abc", max_tokens=2), user="alice")
        client.cancel(CancelRequest(id="r1"), user="bob")  # bob's r1: there is none
        client.cancel(CancelRequest(id="r1", client="alice"), user="bob")  # in alice's name, on bob's topic
        client.cancel(CancelRequest(id="r1", client="alice"))  # on the open topic
        assert [(e["to"], e["code"]) for e in client.errors] == [("bob", "bad_request"), ("bob", "bad_request"),
                                                                 ("alice", "bad_request")]
        client.ask(GenerateRequest(id="r2", prompt="wxyz", max_tokens=2, client="c1"))  # on the open topic
        client.cancel(CancelRequest(id="r2", client="c2"))
        client.cancel(CancelRequest(id="r2"))
        assert answers(client, "alice", "r1")[1] is None and client.on(topics.response_topic(CLUSTER, "r2")) == []
        client.token(last_act(client, 3), 0)
        client.token(last_act(client, 3), 1)
        assert answers(client, "alice", "r1")[1].stop_reason == "max_tokens"  # alice's ran to its end
        client.cancel(CancelRequest(id="r2", client="c1"))  # its own client may
        (result,) = client.on(topics.response_topic(CLUSTER, "r2"))
        assert result.stop_reason == "cancelled" and len(client.errors) == 5
    finally:
        head.stop()


def test_a_request_cancelled_before_it_started_never_starts(make_head) -> None:
    started, release = threading.Event(), threading.Event()

    def encode(text: str) -> list[int]:
        if text.startswith("big"):
            started.set()
            release.wait(30)  # still being tokenized when the cancel comes
        return [5] * min(len(text), 8)

    head, client = make_head(cluster=CLUSTER, retry_min_s=30.0, encode=encode, max_sessions=1)
    try:
        client.ask(GenerateRequest(id="running", prompt="abc", max_tokens=1), user="alice")
        for rid, prompt in (("queued", "wxyz"), ("tokenizing", "bigbig")):
            client.handlers["requests_from"](topics.REQUESTS_FROM.build(CLUSTER, client="alice"),
                                             GenerateRequest(id=rid, prompt=prompt), False)
        assert started.wait(10)  # prompts are tokenized in order: "queued" waits for room by now
        for rid in ("queued", "tokenizing"):
            client.cancel(CancelRequest(id=rid), user="alice")
        release.set()
        client.token(last_act(client, 3), 0)  # room for another session now
        client.ask(GenerateRequest(id="after", prompt="xy", max_tokens=1), user="alice")  # tokenized after them
        assert [answers(client, "alice", r)[1].stop_reason for r in ("running", "queued", "tokenizing")] == [
            "max_tokens", "cancelled", "cancelled"]
        assert [a.shape for a in client.acts()] == [(1, 3), (1, 2)] and client.errors == []  # neither started
    finally:
        release.set()
        head.stop()


# --- messages (a chat) --------------------------------------------------------------

HI = (ChatMessage(role="user", content="Hi"),)


def result_of(client, request: str) -> GenerateResult:
    name = topics.response_topic(CLUSTER, request)
    wait_until(lambda: any(isinstance(v, GenerateResult) for v in client.on(name)))
    return next(v for v in client.on(name) if isinstance(v, GenerateResult))


def test_messages_to_a_model_without_a_template_fail_with_one_clear_line(make_head) -> None:
    head, client = make_head(cluster=CLUSTER, retry_min_s=30.0)
    try:
        client.ask(GenerateRequest(id="c1", messages=HI, max_tokens=4))
        result = result_of(client, "c1")
        assert (result.stop_reason, result.error) == ("error", "this model has no chat template: "
                                                      "send a prompt instead of messages")
    finally:
        head.stop()


def test_a_template_that_refuses_fails_that_request_and_the_head_goes_on(make_head) -> None:
    strict = ChatTemplate("{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message "
                          "comes first') }}{% endif %}ok")
    rendered: list[str] = []
    encode_chat = chat_encoder(strict, lambda text: rendered.append(text) or [5, 6])
    head, client = make_head(cluster=CLUSTER, retry_min_s=30.0, encode_chat=encode_chat)
    try:
        client.ask(GenerateRequest(id="c1", messages=HI, max_tokens=4))
        assert result_of(client, "c1").error == "the chat template refused the messages: a system message comes first"
        client.ask(GenerateRequest(id="c2", messages=(ChatMessage(role="system", content="Be brief."), *HI),
                                    max_tokens=4))
        assert rendered == ["ok"] and last_act(client, 2).step == 0  # rendered, tokenized, its prefill sent
    finally:
        head.stop()


def test_a_request_without_max_tokens_gets_what_fits_the_context_and_the_cap(make_head) -> None:
    """OpenAI's default (the API leaves max_tokens out): as many as the context and --max-tokens allow."""
    capped, capped_client = make_head(cluster=CLUSTER, retry_min_s=30.0, max_tokens=3)
    uncapped, client = make_head(cluster=CLUSTER, retry_min_s=30.0)
    context = MANIFEST.max_context  # the fake tokenizer: one token per character
    capped_client.ask(GenerateRequest(id="capped", prompt="abc", max_tokens=None), user="alice")
    client.ask(GenerateRequest(id="fills", prompt="x" * (context - 2), max_tokens=None), user="alice")
    client.ask(GenerateRequest(id="no-room", prompt="x" * context, max_tokens=None), user="alice")
    for each, rid, tokens in ((capped_client, "capped", 3), (client, "fills", 2)):
        for value in range(tokens):
            each.token(last_act(each, 3 if rid == "capped" else context - 2), value + 3)  # no EOS (2)
        result = answers(each, "alice", rid)[1]
        assert result is not None and (result.stop_reason, len(result.tokens)) == ("max_tokens", tokens), rid
    refused = answers(client, "alice", "no-room")[1]
    assert refused is not None and refused.code == "too_large" and "fills the model's context" in refused.error
