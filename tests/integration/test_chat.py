"""Chat: `messages` rendered with the model's chat template give the same tokens through the
cluster as `run-local --chat`; `linguamq chat` keeps the conversation's history."""

from __future__ import annotations

import json
import queue
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import linguamq
from linguamq import topics
from linguamq.schemas.requests import ChatMessage, GenerateRequest
from linguamq.tools.cli import main
from linguamq.tools.local import generate_local, open_local
from linguamq.tools.testing.cluster import LocalCluster, NodeSpec, linguamq_argv
from linguamq.topics.client import MqttClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(chat_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(artifacts=chat_artifacts, nodes=[NodeSpec("c1"), NodeSpec("c2")], cluster="home",
                      workdir=tmp_path_factory.mktemp("chat"), objective="even") as c:
        with MqttClient(url=c.url, client_id="chat-wait") as waiter:
            c.wait_ready(waiter, nodes=2, timeout=90)
        yield c


def run_local_chat(art: Path, capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["run-local", str(art), "--json", "--max-tokens", "10", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_chat_over_mqtt_equals_run_local_chat(cluster, chat_artifacts, capsys) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    with linguamq.Client(cluster.url, cluster="home", timeout=60) as client:
        chat = client.generate(messages=messages, max_tokens=10)
        plain = client.generate("Hello there", max_tokens=10)
    local = run_local_chat(chat_artifacts, capsys, "--system", "Be brief.", "--chat", "Hello there")
    assert list(chat.tokens) == local["tokens"] and chat.text == local["text"]
    assert chat.prompt_tokens > plain.prompt_tokens  # the template's turns went in, not the bare text
    assert chat.tokens != plain.tokens


def test_generate_chat_prints_what_run_local_chat_does(cluster, chat_artifacts, capsys) -> None:
    assert main(["generate", "--broker", cluster.url, "--json", "--max-tokens", "10", "--chat", "Hi"]) == 0
    remote = json.loads(capsys.readouterr().out)
    assert remote["tokens"] == run_local_chat(chat_artifacts, capsys, "--chat", "Hi")["tokens"]


def test_the_chat_command_sends_the_history_with_each_turn(cluster, chat_artifacts) -> None:
    seen: queue.Queue[GenerateRequest] = queue.Queue()
    with MqttClient(url=cluster.url, client_id="chat-spy") as spy:
        spy.subscribe(topics.REQUESTS, topics.REQUESTS.build("home"), lambda _t, r, _retained: seen.put(r), wait=5.0)
        out = subprocess.run(linguamq_argv("--log-level", "error", "chat", "--broker", cluster.url, "--max-tokens",
                                           "8", "--system", "Be brief."), input="Hello\n\nHow are you?\n",
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first, second = seen.get(timeout=10), seen.get(timeout=10)
    local = open_local(chat_artifacts)
    answers = [_answer(local, r.messages) for r in (first, second)]
    system, hello = ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hello")
    assert first.messages == (system, hello)
    assert second.messages == (system, hello, ChatMessage(role="assistant", content=answers[0]),
                               ChatMessage(role="user", content="How are you?"))
    assert out.stdout == f"{answers[0]}\n{answers[1]}\n"  # streamed answers, nothing for the empty line
    assert seen.empty()


def test_a_model_without_a_template_is_told_at_once(artifacts, tmp_path, capsys) -> None:
    assert main(["run-local", str(artifacts["llama"]), "--chat", "Hi"]) == 2
    assert "no chat template: send a prompt instead of messages" in capsys.readouterr().err
    with LocalCluster(artifacts=artifacts["llama"], nodes=[NodeSpec("p1")], cluster="home", workdir=tmp_path) as c:
        with MqttClient(url=c.url, client_id="plain-wait") as waiter:
            c.wait_ready(waiter, nodes=1, timeout=90)
        out = subprocess.run(linguamq_argv("--log-level", "error", "chat", "--broker", c.url), input="Hi\nAgain\n",
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == "linguamq chat: error: this model has no chat template: send a prompt instead of messages\n"


@pytest.mark.parametrize(("argv", "why"), [
    (["--system", "Be brief.", "--prompt", "Hi"], "--system goes with --chat"),
    (["--prompt", "Hi", "--chat", "Hi"], "argument --chat: not allowed with argument --prompt"),
])
def test_chat_flags_used_wrongly_are_named(artifacts, capsys, argv: list[str], why: str) -> None:
    for command in (["run-local", str(artifacts["llama"])], ["generate", "--broker", "mqtt://127.0.0.1:1"]):
        try:
            code = main([*command, *argv])
        except SystemExit as exc:  # argparse's own refusal
            code = exc.code
        assert code == 2 and why in capsys.readouterr().err


def test_a_request_with_both_prompt_and_messages_is_refused_before_sending(cluster) -> None:
    with linguamq.Client(cluster.url, cluster="home", timeout=60) as client:
        with pytest.raises(linguamq.RequestError, match="either prompt or messages"):
            client.generate("Hi", messages=[{"role": "user", "content": "Hi"}])
        with pytest.raises(linguamq.RequestError, match="role"):
            client.generate(messages=[{"role": "robot", "content": "Hi"}])


def _answer(local, messages: tuple[ChatMessage, ...]) -> str:
    result = generate_local(local.runtime, prompt_ids=local.encode_chat(messages), max_tokens=8,
                            eos_token_ids=local.manifest.eos_token_ids,
                            decode=lambda ids: local.tokenizer.decode(ids, skip_special_tokens=True))
    return result.text
