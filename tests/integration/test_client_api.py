"""The Python API (``linguamq.Client``, ``AsyncClient``) against a live hub and two nodes:
the answers equal run-local's, streams add up to results, failures raise the documented
errors, and the README's example runs as printed."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import linguamq
from linguamq.broker import BrokerThread, EmbeddedBroker
from linguamq.broker.acl import secured
from linguamq.broker.users import Credentials, User, hash_password
from linguamq.tools.local import open_local
from linguamq.tools.testing.cluster import LocalCluster, NodeSpec
from linguamq.topics.client import MqttClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS_CAP = 16  # the hub's --max-tokens: a request above it is failed by the cluster


@pytest.fixture(scope="module")
def cluster(artifacts, tmp_path_factory) -> Iterator[LocalCluster]:
    with LocalCluster(artifacts=artifacts["llama"], nodes=[NodeSpec("a1"), NodeSpec("a2")], cluster="home",
                      workdir=tmp_path_factory.mktemp("api"), objective="even",
                      hub_args=("--max-tokens", str(MAX_TOKENS_CAP))) as c:
        with MqttClient(url=c.url, client_id="api-wait") as waiter:
            c.wait_ready(waiter, nodes=2, timeout=90)
        yield c


@pytest.fixture(scope="module")
def decode(artifacts):
    local = open_local(artifacts["llama"])
    return lambda ids: local.tokenizer.decode(list(ids))


def test_generate_equals_run_local_and_a_stream_adds_up_to_its_result(cluster, artifacts, reference, decode) -> None:
    with linguamq.Client(cluster.url, cluster="home", timeout=60) as client:
        result = client.generate("Hello world", max_tokens=12)
        with client.stream("Hello world", max_tokens=12) as stream:
            pieces = list(stream)
    assert result.tokens == reference(artifacts["llama"], "Hello world", 12)
    assert result.stop_reason in ("eos", "max_tokens") and result.text == decode(result.tokens)
    assert stream.result is not None and stream.result.tokens == result.tokens
    assert "".join(pieces) == stream.result.text == result.text


def test_async_client_gives_the_same_answers(cluster, artifacts, reference) -> None:
    async def main() -> tuple[list[linguamq.Result], list[str], linguamq.Result | None]:
        async with linguamq.AsyncClient(cluster.url, cluster="home", timeout=60) as client:
            both = await asyncio.gather(client.generate("The quick brown fox", max_tokens=10),
                                        client.generate("Hello world", max_tokens=10))
            async with client.stream("The quick brown fox", max_tokens=10) as stream:
                pieces = [piece async for piece in stream]
            return list(both), pieces, stream.result

    (fox, hello), pieces, streamed = asyncio.run(main())
    assert fox.tokens == reference(artifacts["llama"], "The quick brown fox", 10)
    assert hello.tokens == reference(artifacts["llama"], "Hello world", 10)
    assert streamed is not None and "".join(pieces) == streamed.text == fox.text


def test_failures_raise_the_documented_errors(cluster) -> None:
    with linguamq.Client(cluster.url, cluster="home", timeout=60) as client:
        with pytest.raises(linguamq.RequestError):
            client.generate("Hello", max_tokens=0)  # refused before sending
        with pytest.raises(linguamq.GenerationError) as failed:
            client.generate("Hello", max_tokens=MAX_TOKENS_CAP + 1)  # refused by the hub
    assert failed.value.result.stop_reason == "error" and str(MAX_TOKENS_CAP) in (failed.value.result.error or "")
    with pytest.raises(linguamq.RequestError):
        linguamq.Client(cluster.url, cluster="no/such")
    # a cluster nobody serves: the request is sent, no hub answers
    with linguamq.Client(cluster.url, cluster="nobody", timeout=1.0) as client, pytest.raises(linguamq.Timeout):
        client.generate("Hello", max_tokens=4)
    assert issubclass(linguamq.NotAuthorized, linguamq.ConnectionFailed)
    assert all(issubclass(e, linguamq.LinguamqError) for e in (linguamq.RequestError, linguamq.Timeout,
                                                               linguamq.ConnectionFailed, linguamq.GenerationError))


def test_a_refused_login_is_not_authorized() -> None:
    users = {"alice": User("alice", "client", hash_password("right"))}
    with BrokerThread(broker=EmbeddedBroker(**secured(Credentials(users)))) as running:
        client = linguamq.Client(running.url, username="alice", password="wrong")
        with pytest.raises(linguamq.NotAuthorized, match="not authorized"):
            client.connect()


def test_the_readme_example_runs_as_printed(cluster, decode) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "the README's Python API section has no example"
    proc = subprocess.run([sys.executable, "-c", code.group(1)], capture_output=True, text=True, timeout=120,
                          env=os.environ | {"LINGUAMQ_BROKER": cluster.url})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    with linguamq.Client(cluster.url, cluster="home", timeout=60) as client:
        story = client.generate("Once upon a time", max_tokens=12)
    assert proc.stdout.startswith(story.text)  # the streamed pieces, as printed
    assert f"[{len(story.tokens)} tokens, {story.stop_reason}]" in lines
    assert re.search(r" (eos|max_tokens|stop) \d+\.\d ms/token$", lines[-1]), lines[-1]
