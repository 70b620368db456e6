"""The head sends a long prompt in chunks: every chunk but the last marked `more`, positions
contiguous, one step; what follows it is decoding as usual."""

from __future__ import annotations

from linguamq.schemas.requests import GenerateRequest


def test_a_prompt_goes_out_in_chunks_and_only_the_last_asks_for_a_token(make_head) -> None:
    head, client = make_head(prefill_chunk=4, retry_min_s=30.0)
    client.ask(GenerateRequest(id="r", prompt="abcdefghij", max_tokens=3))  # 10 tokens
    chunks = client.acts()
    assert [(a.start_pos, a.shape, a.more, a.step) for a in chunks] == [
        (0, (1, 4), True, 0), (4, (1, 4), True, 0), (8, (1, 2), False, 0)]
    assert len({a.session for a in chunks}) == 1
    client.token(chunks[-1], 7)
    step = client.acts()[-1]
    assert (step.start_pos, step.shape, step.more, step.step) == (10, (1, 1), False, 1)


def test_chunk_zero_sends_the_whole_prompt_at_once(make_head) -> None:
    head, client = make_head(prefill_chunk=0, retry_min_s=30.0)
    client.ask(GenerateRequest(id="r", prompt="abcdefghij", max_tokens=3))
    assert [(a.start_pos, a.shape, a.more) for a in client.acts()] == [(0, (1, 10), False)]


