"""API keys on a secured cluster (`hub --users F --http`): a key is a client user's login,
checked by the broker; each key reaches the cluster as its own user, with that user's rate
limit; without a valid key nothing is answered (401); no plan is a 503."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator

import openai
import pytest

from linguamq import topics
from linguamq.broker.users import User, hash_password, save_users
from linguamq.gateway.keys import api_key
from linguamq.schemas.cluster import Plan
from linguamq.tools.args import PASSWORD_ENV
from linguamq.tools.testing.cluster import LocalCluster, NodeSpec, linguamq_argv
from linguamq.topics.client import MqttClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PASSWORDS = {"admin": "admin-pw", "k1": "k1-pw", "alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"}
ROLES = {"admin": "hub", "k1": "node", "alice": "client", "bob": "client", "carol": "client"}
PROMPT = "Hello world"


@pytest.fixture(scope="module")
def cluster(artifacts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    root = tmp_path_factory.mktemp("api-keys")
    save_users(root / "users", [User(n, ROLES[n], hash_password(pw)) for n, pw in PASSWORDS.items()])
    hub_args = ("--users", str(root / "users"), "--http", "0", "--rate", "0.2", "--burst", "2")
    with LocalCluster(artifacts=artifacts["llama"], nodes=[NodeSpec("k1", password=PASSWORDS["k1"])], workdir=root,
                      cluster="keys", hub_args=hub_args) as c:
        with MqttClient(url=c.url, client_id="keys-wait", username="admin", password=PASSWORDS["admin"]) as admin:
            c.wait_ready(admin, nodes=1, timeout=90)
        yield c


def api(cluster: LocalCluster, key: str) -> openai.OpenAI:
    """Use it in a `with`: a client left open leaks its pooled socket until the garbage
    collector finds it, during some later test (which then fails on the ResourceWarning)."""
    return openai.OpenAI(base_url=f"{cluster.http}/v1", api_key=key, max_retries=0, timeout=60)


def complete(cluster: LocalCluster, key: str) -> str:
    with api(cluster, key) as client:
        answer = client.completions.create(model="any", prompt=PROMPT, max_tokens=8, temperature=0)
    return answer.choices[0].text


def get(url: str, key: str | None = None) -> tuple[int, dict]:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_users_key_is_answered_and_a_wrong_or_missing_key_is_401(cluster, reference, artifacts) -> None:
    alice = api_key("alice", PASSWORDS["alice"])
    expected = reference(artifacts["llama"], PROMPT, 8)
    with api(cluster, alice) as client:
        answer = client.completions.create(model="any", prompt=PROMPT, max_tokens=8, temperature=0)
    assert answer.usage.completion_tokens == len(expected)
    for wrong in (api_key("alice", "guess"), api_key("mallory", "x"), "sk-not-ours", "lmq-!!!"):
        with pytest.raises(openai.AuthenticationError) as refused:
            complete(cluster, wrong)
        assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    status, body = get(f"{cluster.http}/v1/models")  # no key at all
    assert status == 401 and "API key is required" in body["error"]["message"]
    assert get(f"{cluster.http}/v1/models", alice)[0] == 200


def test_the_dashboard_data_takes_the_same_keys(cluster) -> None:
    assert get(f"{cluster.http}/api/state")[0] == 401
    assert get(f"{cluster.http}/api/state?key={api_key('alice', 'guess')}")[0] == 401
    status, state = get(f"{cluster.http}/api/state?key={api_key('bob', PASSWORDS['bob'])}")
    assert status == 200 and [n["name"] for n in state["nodes"]] == ["k1"]


def test_each_key_has_its_own_rate_limit(cluster) -> None:
    """--burst 2 --rate 0.2: bob's third request at once is refused (429), alice is not held back."""
    bob = api_key("bob", PASSWORDS["bob"])
    complete(cluster, bob)
    complete(cluster, bob)
    with pytest.raises(openai.RateLimitError) as limited:
        complete(cluster, bob)
    assert limited.value.status_code == 429 and "rate limited" in limited.value.message
    assert complete(cluster, api_key("alice", PASSWORDS["alice"]))


def test_serve_logged_in_as_a_client_says_it_cannot_see_the_cluster(cluster) -> None:
    """The ACL lets a client-role user read only its own answers: the gateway would show an
    empty dashboard and list no model. It says so (and still serves keys' requests)."""
    env = {**os.environ, PASSWORD_ENV: PASSWORDS["alice"]}
    with subprocess.Popen(linguamq_argv("--log-level", "error", "serve", "--broker", cluster.url, "--cluster", "keys",
                                        "--port", "0", "-u", "alice"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        try:
            assert proc.stdout.readline().startswith("serving http://127.0.0.1:")
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=10)
    assert "no model on cluster 'keys' yet" in err and "hub-role user" in err


def test_no_plan_is_503(cluster) -> None:
    plans: queue.Queue[Plan] = queue.Queue()
    with MqttClient(url=cluster.url, client_id="keys-watch", username="admin", password=PASSWORDS["admin"]) as admin:
        admin.subscribe(topics.PLAN, topics.PLAN.build("keys"), lambda _t, plan, _r: plans.put(plan), wait=10.0)
        cluster.kill_node("k1")
        while plans.get(timeout=30).stages:  # until the planner has no node left to place the model on
            pass
    with pytest.raises(openai.APIStatusError) as refused:
        complete(cluster, api_key("carol", PASSWORDS["carol"]))  # her first request: within her rate
    assert refused.value.status_code == 503 and "no plan fits" in refused.value.message
