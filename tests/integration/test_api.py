"""The OpenAI-compatible API of `hub --http` and `linguamq serve`, driven by the official
`openai` package against a hub with three nodes: answers equal run-local's, streamed and
not, 32 streams at once each get their own, and a caller that leaves frees the nodes."""

from __future__ import annotations

import asyncio
import json
import queue
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from linguamq import topics
from linguamq.node.sampling import SamplingParams
from linguamq.schemas.cluster import Telemetry
from linguamq.schemas.requests import ChatMessage, GenerateResult
from linguamq.tools.local import generate_local, open_local
from linguamq.tools.testing.cluster import LocalCluster, NodeSpec, linguamq_argv
from linguamq.topics.client import MqttClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NODES = ("a1", "a2", "a3")


@pytest.fixture(scope="module")
def cluster(chat_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(artifacts=chat_artifacts, nodes=[NodeSpec(n) for n in NODES], cluster="home",
                      workdir=tmp_path_factory.mktemp("api"), objective="even", hub_args=("--http", "0")) as c:
        with MqttClient(url=c.url, client_id="api-wait") as waiter:
            c.wait_ready(waiter, nodes=3, timeout=90)
        assert c.http is not None
        yield c


@pytest.fixture(scope="module")
def local(chat_artifacts: Path):
    return open_local(chat_artifacts)


def greedy(local, *, messages: list[dict[str, str]] | None = None, prompt: str | None = None, max_tokens: int,
           sampling: SamplingParams = SamplingParams()):
    """run-local's answer (what `run-local --chat` / `--prompt` print), greedy unless ``sampling``."""
    ids = (local.encode_chat(tuple(ChatMessage.from_dict(m) for m in messages)) if messages is not None
           else local.tokenizer.encode(prompt).ids)
    result = generate_local(local.runtime, prompt_ids=ids, max_tokens=max_tokens, sampling=sampling,
                            eos_token_ids=local.manifest.eos_token_ids,
                            decode=lambda t: local.tokenizer.decode(t, skip_special_tokens=True))
    return result, len(ids)


def api(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def finish_reason(result) -> str:
    return "length" if result.stop_reason == "max_tokens" else "stop"


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def test_a_chat_completion_whole_and_streamed_equals_run_local_chat(cluster, local) -> None:
    client = api(cluster.http)
    assert [m.id for m in client.models.list()] == [local.manifest.name]
    expected, prompt_tokens = greedy(local, messages=MESSAGES, max_tokens=12)

    whole = client.chat.completions.create(model=local.manifest.name, messages=MESSAGES, max_tokens=12,
                                           temperature=0)
    assert whole.choices[0].message.content == expected.text and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == finish_reason(expected)
    assert whole.usage.prompt_tokens == prompt_tokens and whole.usage.completion_tokens == len(expected.tokens)
    assert whole.model == local.manifest.name

    chunks = list(client.chat.completions.create(model="any", messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish_reason(expected)
    assert chunks[-1].usage.completion_tokens == len(expected.tokens)  # include_usage: the last chunk
    assert len({c.id for c in chunks}) == 1


def test_a_text_completion_equals_run_local_prompt(cluster, local) -> None:
    expected, _ = greedy(local, prompt="Once upon a time", max_tokens=10)
    client = api(cluster.http)
    whole = client.completions.create(model="any", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert whole.choices[0].text == expected.text
    streamed = client.completions.create(model="any", prompt="Once upon a time", max_tokens=10, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected.text


def test_a_seed_replays_a_sampled_answer(cluster) -> None:
    client = api(cluster.http)
    ask = dict(model="any", messages=MESSAGES, max_tokens=10, temperature=1.0, seed=1234)
    first, second = (client.chat.completions.create(**ask) for _ in range(2))
    assert first.choices[0].message.content == second.choices[0].message.content


def test_32_concurrent_streams_each_get_their_own_answer(cluster, local) -> None:
    """Each caller its own question and seed (a tiny random model answers most questions alike
    when greedy; sampled with a seed, each answer is its own and replayable by run-local)."""
    questions = [[{"role": "user", "content": f"Question number {i}: what comes next?"}] for i in range(32)]
    expected = [greedy(local, messages=q, max_tokens=8, sampling=SamplingParams(temperature=1.0, seed=i))[0].text
                for i, q in enumerate(questions)]
    assert len(set(expected)) == 32  # a mix-up of two callers' answers would show

    async def ask_all() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{cluster.http}/v1", api_key="unused", max_retries=0, timeout=120)

        async def ask(messages, seed: int) -> str:
            stream = await client.chat.completions.create(model="any", messages=messages, max_tokens=8,
                                                          temperature=1.0, seed=seed, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        try:
            return await asyncio.gather(*(ask(q, i) for i, q in enumerate(questions)))
        finally:
            await client.close()

    assert asyncio.run(ask_all()) == expected


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "whole"])
def test_a_client_that_leaves_mid_answer_frees_its_session_on_the_nodes(cluster, local, streamed: bool) -> None:
    messages = [{"role": "user", "content": "Tell me a very long story."}]
    assert len(greedy(local, messages=messages, max_tokens=200)[0].tokens) == 200  # no early end: a long answer
    results: queue.Queue[GenerateResult] = queue.Queue()
    sessions: dict[str, int] = {}
    lock = threading.Lock()

    def on_response(_t: str, value, _r: bool) -> None:
        if isinstance(value, GenerateResult):
            results.put(value)

    def on_telemetry(_t: str, report: Telemetry, _r: bool) -> None:
        with lock:
            sessions[report.node] = report.sessions

    with MqttClient(url=cluster.url, client_id="api-spy") as spy:
        spy.subscribe(topics.RESPONSES, topics.RESPONSES.filter("home"), on_response, wait=10.0)
        spy.subscribe(topics.NODE_TELEMETRY, topics.NODE_TELEMETRY.filter("home"), on_telemetry, wait=10.0)
        if streamed:
            stream = api(cluster.http).chat.completions.create(model="any", messages=messages, max_tokens=1500,
                                                               temperature=0, stream=True)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    break  # the first words arrived: the caller goes away
            stream.close()
        else:  # a caller that gives up waiting for a whole answer
            impatient = openai.OpenAI(base_url=f"{cluster.http}/v1", api_key="unused", max_retries=0, timeout=1.0)
            with pytest.raises(openai.APITimeoutError):
                impatient.chat.completions.create(model="any", messages=messages, max_tokens=1500, temperature=0)
        result = results.get(timeout=30)
        assert result.stop_reason == "cancelled" and len(result.tokens) < 1500
        with lock:
            sessions.clear()
        deadline = time.monotonic() + 10  # nodes report every second; a TTL would take minutes
        while time.monotonic() < deadline:
            with lock:
                if set(sessions) == set(NODES) and not any(sessions.values()):
                    break
            time.sleep(0.2)
        assert sessions == dict.fromkeys(NODES, 0)


def test_bad_requests_are_answered_in_openais_error_shape(cluster) -> None:
    client = api(cluster.http)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="any", messages=MESSAGES, n=2)
    assert refused.value.status_code == 400 and refused.value.param == "n"
    with pytest.raises(openai.BadRequestError, match="messages must be a non-empty list"):
        client.chat.completions.create(model="any", messages=[])
    with pytest.raises(openai.BadRequestError, match="role must be one of"):
        client.chat.completions.create(model="any", messages=[{"role": "tool", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as too_long:  # refused by the head: its code says why
        client.chat.completions.create(model="any", messages=MESSAGES, max_tokens=4000)
    assert too_long.value.code == "context_length_exceeded" and "exceeds" in too_long.value.message
    request = urllib.request.Request(f"{cluster.http}/v1/chat/completions", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as not_json:
        urllib.request.urlopen(request, timeout=30)
    assert not_json.value.code == 400
    assert json.loads(not_json.value.read())["error"]["message"] == "the request body is not JSON"


def test_serve_is_a_gateway_of_its_own_and_refuses_to_expose_an_open_cluster(cluster, local) -> None:
    with subprocess.Popen(linguamq_argv("--log-level", "error", "serve", "--broker", cluster.url, "--port", "0"),
                          stdout=subprocess.PIPE, text=True) as proc:
        try:
            line = proc.stdout.readline()  # "serving http://127.0.0.1:PORT (...)"
            url = line.split()[1]
            assert url.startswith("http://127.0.0.1:")
            expected, _ = greedy(local, messages=MESSAGES, max_tokens=6)
            answer = api(url).chat.completions.create(model="any", messages=MESSAGES, max_tokens=6, temperature=0)
            assert answer.choices[0].message.content == expected.text
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        assert proc.returncode == 0  # SIGTERM: a clean stop
    exposed = subprocess.run(linguamq_argv("serve", "--broker", cluster.url, "--host", "0.0.0.0", "--port", "0"),
                             capture_output=True, text=True, timeout=60)
    assert exposed.returncode == 2 and "pass --open" in exposed.stderr
