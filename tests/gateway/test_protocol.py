"""OpenAI request bodies as users' tools send them, and what we answer for each."""

from __future__ import annotations

import pytest

from linguamq.gateway.keys import BadKey, api_key, parse_api_key
from linguamq.gateway.protocol import ApiError, Shape, parse, result_error
from linguamq.schemas.requests import ChatMessage, GenerateResult


def chat(**body):
    return parse("chat", {"model": "m", "messages": [{"role": "user", "content": "Hi"}], **body}, request_id="r1")


def test_a_chat_body_becomes_a_request_with_openais_defaults() -> None:
    call = chat()
    assert call.request.messages == (ChatMessage(role="user", content="Hi"),)
    assert call.request.max_tokens is None  # absent: as many as fit, which the head works out
    assert call.request.sampling.temperature == 1.0  # OpenAI's default
    assert not call.stream and not call.include_usage


def test_newer_clients_shapes_are_understood() -> None:
    call = parse("chat", {"messages": [{"role": "developer", "content": [{"type": "text", "text": "Be "},
                                                                         {"type": "text", "text": "brief."}]},
                                       {"role": "user", "content": "Hi"}],
                          "max_completion_tokens": 7, "stop": "\n", "stream": True,
                          "stream_options": {"include_usage": True}, "seed": 5, "temperature": 0},
                 request_id="r1")
    assert call.request.messages[0] == ChatMessage(role="system", content="Be brief.")
    assert call.request.max_tokens == 7 and call.request.stop == ("\n",) and call.request.sampling.seed == 5
    assert call.stream and call.include_usage
    text = parse("text", {"prompt": ["Once"], "max_tokens": 3}, request_id="r2")
    assert text.request.prompt == "Once" and text.request.max_tokens == 3


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"n": 3}, "n", "only n=1"),
    ({"max_tokens": 0}, "max_tokens", "integer >= 1"),
    ({"max_tokens": "10"}, "max_tokens", "integer >= 1"),
    ({"temperature": "hot"}, "temperature", "must be a number"),
    ({"temperature": 500}, "temperature", "temperature"),
    ({"top_p": 0}, "top_p", "top_p"),
    ({"stop": [""]}, "stop", "non-empty strings"),
    ({"seed": -1}, "seed", "integer >= 0"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages", "images"),
    ({"messages": "Hi"}, "messages", "non-empty list"),
    ({"stream": "yes"}, "stream", "true or false"),
])
def test_bad_bodies_are_400_naming_the_parameter(body, param, says) -> None:
    with pytest.raises(ApiError) as refused:
        chat(**body)
    assert refused.value.status == 400 and refused.value.param == param and says in refused.value.message
    assert refused.value.body()["error"]["type"] == "invalid_request_error"


def test_null_means_absent_as_in_openais_api() -> None:
    call = chat(temperature=None, top_p=None, n=None, stream=None, max_tokens=None, max_completion_tokens=None, stop=None)
    assert call.request.sampling.temperature == 1.0 and call.request.max_tokens is None and not call.stream
    assert chat(max_completion_tokens=None, max_tokens=9).request.max_tokens == 9


def test_what_our_wire_refuses_is_a_400_naming_the_field() -> None:
    with pytest.raises(ApiError) as too_long:
        chat(messages=[{"role": "user", "content": "x" * 70_000}])
    assert too_long.value.status == 400 and too_long.value.code == "context_length_exceeded"
    with pytest.raises(ApiError, match="role must be one of"):
        chat(messages=[{"role": ["user"], "content": "Hi"}])


def test_several_prompts_or_token_ids_are_refused() -> None:
    for prompt in (["a", "b"], [1, 2, 3], None):
        with pytest.raises(ApiError, match="one string"):
            parse("text", {"prompt": prompt}, request_id="r1")


def result(**fields) -> GenerateResult:
    base = dict(request="r1", text="Paris.", tokens=(5, 6), prompt_tokens=9, ttft_ms=1.0, ms_per_token=2.0,
                stop_reason="eos")
    return GenerateResult(**(base | fields))


def test_answers_carry_usage_and_the_finish_reason() -> None:
    whole = Shape(chat(), "smollm2").whole(result(stop_reason="max_tokens"))
    assert whole["choices"][0]["message"]["content"] == "Paris." and whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"] == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    assert whole["model"] == "smollm2" and whole["object"] == "chat.completion"
    shape = Shape(chat(stream=True), "smollm2")
    assert shape.chunk("Pa", first=True)["choices"][0]["delta"] == {"role": "assistant", "content": "Pa"}
    assert shape.final(result())["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}


@pytest.mark.parametrize(("code", "status"), [("rate_limited", 429), ("overloaded", 503), ("too_large", 400),
                                              ("bad_request", 400), (None, 500)])
def test_a_refused_request_gets_the_status_of_its_code(code, status) -> None:
    assert result_error(result(stop_reason="error", error="why", code=code)).status == status


def test_an_api_key_is_a_login_and_anything_else_is_refused() -> None:
    assert parse_api_key(api_key("alice", "p@ss:w=rd")) == ("alice", "p@ss:w=rd")
    for bad in ("sk-123", "lmq-", "lmq-!!!", api_key("", "pw"), "lmq-" + "YWxpY2U"):  # the last: "alice", no colon
        with pytest.raises(BadKey):
            parse_api_key(bad)
