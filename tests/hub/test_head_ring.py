"""The head with the ring: it sends prompts and re-prefills, the tail sends every next step
(played here by the test), and the head only watches the tokens.

Its envelopes carry the ring's limit (the request's max_tokens) and a chain number that every
(re-)prefill increases, so that nodes drop what is left of a chain a retry replaced; the
`end` carries the last chain, so the step the tail sent ahead of it is dropped.
"""

from __future__ import annotations

import dataclasses
import time

from linguamq.schemas.envelope import ActHeader
from linguamq.schemas.requests import GenerateRequest


def ahead(prefill: ActHeader, step: int, prompt: int) -> ActHeader:
    """The envelope the tail sends for ``step`` (the test's stand-in; the head never sees it)."""
    return dataclasses.replace(prefill, step=step, start_pos=prompt + step - 1, shape=(1, 1), more=False)


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_head_sends_the_prompt_and_the_tail_every_next_step(make_head) -> None:
    head, client = make_head(ring=True, retry_min_s=30.0)
    client.ask(GenerateRequest(id="r1", prompt="abc", max_tokens=3))
    (prefill,) = client.acts()
    assert (prefill.step, prefill.ring, prefill.shape) == (0, 3, (1, 3)) and prefill.chain >= 1
    for step, token in enumerate((10, 11, 12)):
        client.token(ahead(prefill, step, 3) if step else prefill, token)
    (result,) = client.results()
    assert (result.stop_reason, result.tokens) == ("max_tokens", (10, 11, 12))
    assert client.kinds().count("step") == 1  # the prompt only
    assert [e.index for e in client.events()] == [0, 1, 2]
    (end,) = client.ends()
    assert end.chain == prefill.chain


def test_a_stop_string_ends_the_session_and_drops_the_step_already_sent_ahead(make_head) -> None:
    # decode maps id i to chr(97 + i % 26): ids 0, 1, 3 are "a", "b", "d".
    head, client = make_head(ring=True, retry_min_s=30.0)
    client.ask(GenerateRequest(id="r2", prompt="abc", max_tokens=10, stop=("bd",)))
    (prefill,) = client.acts()
    for step, token in enumerate((0, 1, 3)):  # "abd": the stop string; the tail already sent step 3
        client.token(ahead(prefill, step, 3) if step else prefill, token)
    (result,) = client.results()
    assert (result.stop_reason, result.text, result.tokens) == ("stop", "a", (0, 1, 3))
    (end,) = client.ends()
    assert end.chain == prefill.chain  # the first stage drops that chain's step 3 after it
    client.token(ahead(prefill, 3, 3), 4)  # step 3's token, if it got through: no session any more
    assert client.results() == [result] and "".join(e.text for e in client.events()) == "a"
    assert client.kinds() == ["step", "event", "result", "end"]


def test_a_retry_starts_a_new_chain_and_only_the_new_chains_tokens_count(make_head) -> None:
    head, client = make_head(ring=True, retry_min_s=0.3, max_retries=3, step_timeout_s=30)
    client.ask(GenerateRequest(id="r3", prompt="abc", max_tokens=3))
    (prefill,) = client.acts()
    client.token(prefill, 10)
    wait_until(lambda: len(client.acts()) == 2)  # step 1 (the tail's) never answered: re-prefilled
    retry = client.acts()[-1]
    assert (retry.step, retry.start_pos, retry.shape, retry.ring) == (1, 0, (1, 4), 3)
    assert retry.chain > prefill.chain  # the nodes drop whatever is left of the first chain
    # The old chain's answer came after all, and differs (a tie, sampling): the new chain's
    # tail feeds its own token into the KV, so only that one may reach the text.
    client.token(ahead(prefill, 1, 3), 20)
    assert [e.index for e in client.events()] == [0]
    client.token(retry, 11)
    client.token(ahead(retry, 2, 3), 12)
    (result,) = client.results()
    assert result.error is None and result.tokens == (10, 11, 12)
    assert [e.index for e in client.events()] == [0, 1, 2]
    assert client.ends()[-1].chain == retry.chain


def test_stopping_the_head_ends_every_running_session(make_head) -> None:
    head, client = make_head(ring=True, retry_min_s=30.0)
    prefills = {}
    for rid in ("s1", "s2"):
        client.ask(GenerateRequest(id=rid, prompt="abc", max_tokens=100))
        prefills[rid] = client.acts()[-1]
    client.token(prefills["s1"], 10)  # s1 is decoding: its tail runs the chain on its own
    head.stop()
    # Only the head ends a chain: each session gets an end of its chain (the nodes drop the
    # step the tail sent ahead and free the KV), and its client an answer.
    assert {(e.request, e.chain) for e in client.ends()} == {(r, p.chain) for r, p in prefills.items()}
    assert {(r.request, r.stop_reason) for r in client.results()} == {("s1", "error"), ("s2", "error")}


def test_without_the_ring_the_head_sends_every_step(make_head) -> None:
    head, client = make_head(ring=False, retry_min_s=30.0)
    client.ask(GenerateRequest(id="r4", prompt="abc", max_tokens=2))
    client.token(client.acts()[0], 10)
    assert [(a.step, a.ring) for a in client.acts()] == [(0, 0), (1, 0)]
