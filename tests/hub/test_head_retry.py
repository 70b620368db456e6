"""The head's steps, without a network: a fake client records what the head publishes.

Per token the next step leaves before the token's text (a stop string found there still
ends the request, and the step sent ahead is dropped); none after EOS or max_tokens.

A step whose token never comes (lost to a frozen node or a reconnect) is re-sent as a
re-prefill of the whole history under the ready epoch, with a growing wait; a token
brings the count back to zero; after max_retries the request fails with a clear error.
Duplicated tail outputs are accepted once.
"""

from __future__ import annotations

import time

from linguamq import topics
from linguamq.schemas.cluster import Plan
from linguamq.schemas.envelope import ActHeader
from linguamq.schemas.requests import GenerateRequest

EOS = 2  # examples.MANIFEST's


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_lost_step_is_resent_as_a_reprefill_with_backoff_then_resumes(make_head) -> None:
    head, client = make_head(retry_min_s=0.3, max_retries=3, step_timeout_s=30)
    try:
        client.ask(GenerateRequest(id="r1", prompt="abc", max_tokens=3))
        first = client.acts()[0]
        client.token(first, 11)  # step 0 answered
        step1 = client.acts()[-1]
        assert (step1.step, step1.start_pos, step1.shape) == (1, 3, (1, 1))
        t0 = time.monotonic()
        wait_until(lambda: len(client.acts()) == 3)  # step 1 lost: re-sent
        retry = client.acts()[-1]
        waited = time.monotonic() - t0
        assert (retry.step, retry.epoch, retry.start_pos, retry.shape) == (1, 4, 0, (1, 4))  # prompt + 1 token
        assert 0.25 < waited < 1.5
        wait_until(lambda: len(client.acts()) == 4)  # again, after about twice as long
        assert time.monotonic() - t0 > 0.8
        client.token(step1, 12)  # the original's answer arrives late: a replaced chain's, ignored
        client.token(retry, 12)  # ... and so is the first retry's
        assert [e.index for e in client.events()] == [0]
        client.token(client.acts()[-1], 12)  # the latest retry's chain: taken
        client.token(client.acts()[-1], 13)
        (result,) = client.results()
        assert result.error is None and result.tokens == (11, 12, 13)
        assert [e.index for e in client.events()] == [0, 1, 2]
        assert head.retries == 2
    finally:
        head.stop()


def test_a_step_that_never_answers_fails_clearly_after_max_retries(make_head) -> None:
    head, client = make_head(retry_min_s=0.1, max_retries=2, step_timeout_s=30)
    try:
        client.ask(GenerateRequest(id="r2", prompt="abc", max_tokens=3))
        wait_until(lambda: client.results(), timeout=5)
        (result,) = client.results()
        assert result.stop_reason == "error" and "after 2 retries" in result.error
        assert len(client.acts()) == 3  # the step and its 2 retries
    finally:
        head.stop()


def test_a_resent_request_id_is_reported_not_failed(make_head) -> None:
    head, client = make_head(retry_min_s=5.0)
    try:
        request = GenerateRequest(id="r3", prompt="abc", max_tokens=1, client="c1")
        client.ask(request)
        client.ask(request)  # a client that reconnected sends it again
        assert client.results() == [] and "already in flight" in client.errors[-1]["message"]
        assert client.errors[-1]["to"] == "c1"
        client.token(client.acts()[0], 9)
        (result,) = client.results()
        assert result.error is None and result.tokens == (9,)
    finally:
        head.stop()


def test_an_empty_plan_fails_requests_with_its_reason(make_head) -> None:
    head, client = make_head(retry_min_s=5.0)
    try:
        client.ask(GenerateRequest(id="r4", prompt="abc", max_tokens=4))
        empty = Plan(epoch=5, objective="even", stages=(), predicted_ms_per_token=0.0,
                     reason="left: n2; no placement: n1 would need 0.6 MB")
        client.plan(empty)
        client.ask(GenerateRequest(id="r5", prompt="abc", max_tokens=4))
        assert [(r.request, r.stop_reason) for r in client.results()] == [("r4", "error"), ("r5", "error")]
        assert all("no plan fits the nodes online: left: n2" in r.error for r in client.results())
    finally:
        head.stop()


def test_topics_used_exist() -> None:  # the fake keys handlers by topic kind
    assert {t.kind for t in (topics.PLAN, topics.NODE_STATUS, topics.SESSION_OUT, topics.REQUESTS)} == {
        "plan", "node_status", "session_out", "requests"}


def test_the_next_step_leaves_before_the_text_of_the_token(make_head) -> None:
    head, client = make_head()
    try:
        client.ask(GenerateRequest(id="r1", prompt="abc", max_tokens=3))
        client.token(client.acts()[0], 11)
        assert client.kinds() == ["step", "step", "event"]
        assert client.acts()[-1].step == 1
    finally:
        head.stop()


def test_a_stop_string_ends_the_request_and_the_step_sent_ahead_is_dropped(make_head) -> None:
    # decode maps id i to chr(97 + i % 26): ids 0, 1, 2(=EOS), 3 are "a", "b", "c", "d".
    head, client = make_head()
    try:
        request = GenerateRequest(id="r2", prompt="abc", max_tokens=10, stop=("bd",))
        client.ask(request)
        client.token(client.acts()[0], 0)  # "a"
        client.token(client.acts()[-1], 1)  # "ab": "b" may start the stop string, held back
        ahead: ActHeader = client.acts()[-1]
        client.token(ahead, 3)  # "abd": the stop string; step 3 had already left
        (result,) = client.results()
        assert (result.stop_reason, result.text, result.tokens) == ("stop", "a", (0, 1, 3))
        sent = client.acts()[-1]
        assert sent.step == 3  # the step sent ahead ...
        client.token(sent, 4)  # ... answers after the end: dropped
        assert client.results() == [result] and "".join(e.text for e in client.events()) == "a"
        assert client.kinds() == ["step", "step", "event", "step", "step", "result", "end"]
    finally:
        head.stop()


def test_no_step_is_sent_after_eos_or_the_last_allowed_token(make_head) -> None:
    head, client = make_head()
    try:
        client.ask(GenerateRequest(id="r3", prompt="abc", max_tokens=5))
        client.token(client.acts()[0], EOS)
        client.ask(GenerateRequest(id="r4", prompt="abc", max_tokens=1))
        client.token(client.acts()[-1], 11)
        assert [a.step for a in client.acts()] == [0, 0]  # two prompts, no step after either token
        assert sorted(r.stop_reason for r in client.results()) == ["eos", "max_tokens"]
    finally:
        head.stop()


def test_a_long_prompt_gets_the_time_prefills_take_before_a_retry_or_a_timeout(make_head) -> None:
    """A prompt 10x longer than one whose prefill took 0.3 s is not re-sent after the
    decode-based wait (0.5 s here) but only once ~10x that prefill time has passed, and
    does not fail at the 4 s step timeout meanwhile."""
    head, client = make_head(encode=lambda text: [5] * len(text), retry_min_s=0.5, retry_factor=2.0,
                             step_timeout_s=4)
    try:
        client.ask(GenerateRequest(id="short", prompt="abcd", max_tokens=3))
        time.sleep(0.3)
        assert head.retries == 0
        client.token(client.acts()[-1], 11)  # 4 prompt tokens in 0.3 s
        client.token(client.acts()[-1], 12)  # decode steps answer at once
        client.token(client.acts()[-1], 13)
        client.ask(GenerateRequest(id="long", prompt="a" * 40, max_tokens=2))
        t0 = time.monotonic()
        time.sleep(1.5)  # a decode-based wait (2 x ~0 s, at least 0.5 s) would have re-sent it by now
        assert [a.request for a in client.acts()].count("long") == 1 and head.retries == 0
        wait_until(lambda: [a.request for a in client.acts()].count("long") == 2, timeout=10)
        assert time.monotonic() - t0 > 4.0  # 2 x 40 x 0.075 s = 6 s
        assert head.retries == 1 and len(client.results()) == 1  # only "short": "long" did not time out
        client.token(client.acts()[-1], 14)  # the re-sent prefill answers
        client.token(client.acts()[-1], 15)
        assert [(r.request, r.error, r.tokens) for r in client.results()][-1] == ("long", None, (14, 15))
    finally:
        head.stop()
