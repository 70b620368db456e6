"""The dashboard in a real browser (headless chromium driven by Selenium): the page shows the
nodes and the plan, follows a node's death to a new plan, and chats through the API.

Everything asserted is read from the rendered page (the DOM), never from /api/state.
Screenshots go to build/test-artifacts/ (created here) for a person to look at.
"""

from __future__ import annotations

import json
import shutil
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.wait import WebDriverWait

from linguamq.broker.users import User, hash_password, save_users
from linguamq.gateway.keys import api_key
from linguamq.models.export import read_manifest
from linguamq.tools.testing.cluster import LocalCluster, NodeSpec
from linguamq.topics.client import BrokerUrl, MqttClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's chromium, chromium-driver
SHOTS = Path(__file__).resolve().parents[2] / "build" / "test-artifacts"
NODES = ("c1", "c2", "c3")
MAX_TOKENS = 48  # the page's max tokens field, set by the tests: short answers, a quick test
ANSWERS = "document.querySelectorAll('#chat-log [data-role=assistant]')"

# The page as a test reads it: node cards, the plan bar and the epoch list.
READ_PAGE = """
const q = (s) => Array.from(document.querySelectorAll(s));
return {
  conn: document.getElementById('conn').dataset.state,
  nodes: Object.fromEntries(q('#nodes [data-node]').map(n =>
    [n.dataset.node, [n.dataset.online, n.querySelector('.badge').textContent]])),
  epoch: document.getElementById('plan').dataset.epoch,
  cells: q('#plan-bar .cell').map(c => c.dataset.node),
  epochs: q('#epochs li').map(e => e.dataset.epoch),
  keyForm: !document.getElementById('key-form').hidden,
  keyError: document.getElementById('key-error').textContent,
};
"""


# The tests share one cluster and one page, in file order: the node's kill and the hub's restart come last.
@pytest.fixture(scope="module")
def cluster(chat_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(artifacts=chat_artifacts, nodes=[NodeSpec(n) for n in NODES], cluster="home",
                      workdir=tmp_path_factory.mktemp("dashboard"), objective="even",
                      hub_args=("--http", str(free_port()))) as c:  # a fixed port: the page outlives a hub
        with MqttClient(url=c.url, client_id="dashboard-wait") as waiter:
            c.wait_ready(waiter, nodes=3, timeout=90)
        yield c


@pytest.fixture(scope="module")
def secured(chat_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A cluster with users: its API and dashboard take a client's key."""
    root = tmp_path_factory.mktemp("dashboard-secured")
    save_users(root / "users", [User("admin", "hub", hash_password("admin-pw")),
                                User("n1", "node", hash_password("n1-pw")),
                                User("alice", "client", hash_password("alice-pw"))])
    with LocalCluster(artifacts=chat_artifacts, nodes=[NodeSpec("n1", password="n1-pw")], cluster="home",
                      workdir=root, objective="even", hub_args=("--users", str(root / "users"), "--http", "0")) as c:
        with MqttClient(url=c.url, client_id="secured-wait", username="admin", password="admin-pw") as waiter:
            c.wait_ready(waiter, nodes=1, timeout=90)
        yield c


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    if shutil.which(CHROMIUM) is None or shutil.which(CHROMEDRIVER) is None:
        pytest.skip(f"needs Debian's headless chromium ({CHROMIUM}) and chromium-driver ({CHROMEDRIVER})")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with the driver's path below, Selenium Manager downloads nothing
    # No network beyond loopback here: without the background-networking flags chromium keeps
    # trying Google's hosts at every start.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1100", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-quic",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page(browser: WebDriver, cluster: LocalCluster) -> WebDriver:
    assert cluster.http, "the hub reported no HTTP address"
    browser.get(cluster.http + "/")
    return browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_page(driver: WebDriver, timeout: float, check: Callable[[dict[str, Any]], Any], what: str) -> dict[str, Any]:
    """The page (READ_PAGE) once ``check`` holds on it, polled for at most ``timeout`` seconds."""
    seen: list[dict[str, Any]] = []

    def ready(d: WebDriver) -> bool:
        seen[:] = [d.execute_script(READ_PAGE)]
        return bool(check(seen[0]))

    try:
        WebDriverWait(driver, timeout, poll_frequency=0.1).until(ready)
    except TimeoutException:
        pytest.fail(f"the page did not show {what} within {timeout} s; it showed {seen}")
    return seen[0]


def screenshot(driver: WebDriver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(SHOTS / name))


def test_the_page_shows_the_nodes_online_and_the_plan_over_all_pieces(page, chat_artifacts) -> None:
    pieces = len(read_manifest(chat_artifacts).pieces)
    shown = wait_page(page, 30, lambda p: p["conn"] == "live" and len(p["nodes"]) == 3 and p["cells"]
                      and all(p["cells"]), "three nodes and a plan")
    assert shown["nodes"] == {n: ["true", "online"] for n in NODES}
    assert len(shown["cells"]) == pieces and set(shown["cells"]) == set(NODES)
    assert shown["epochs"][0] == shown["epoch"]  # newest first
    screenshot(page, "dashboard.png")


def test_the_chat_box_streams_the_answer_the_api_gives(page, cluster) -> None:
    # Greedy (temperature 0, a field of the page) so that the API's answer to the same call is the same.
    # The observer keeps every text the answer showed: a partial one proves it rendered as it streamed.
    page.execute_script("""
      window.shown = [];
      new MutationObserver(() => {
        const a = document.getElementById('chat-answer');
        if (a) window.shown.push(a.textContent);
      }).observe(document.getElementById('chat-log'), {childList: true, subtree: true, characterData: true});""")
    answer = say(page, "Hello there", temperature="0")
    assert answer == api_answer(cluster.http, [{"role": "user", "content": "Hello there"}])
    assert any(0 < len(text) < len(answer) and answer.startswith(text) for text in page.execute_script(
        "return window.shown"))
    # The next turn goes out with the history the page kept.
    second = say(page, "And then?", temperature="0")
    assert second == api_answer(cluster.http, [{"role": "user", "content": "Hello there"},
                                               {"role": "assistant", "content": answer},
                                               {"role": "user", "content": "And then?"}])


def test_the_chat_box_shows_the_apis_error(page, cluster) -> None:
    page.find_element("id", "chat-clear").click()  # a new conversation: this message alone
    assert page.execute_script(f"return {ANSWERS}.length") == 0
    too_long = "hello " * 1200  # pasted: more tokens than the model's context
    page.execute_script("document.getElementById('chat-input').value = arguments[0]", too_long)
    assert send(page, temperature="0") == ""
    error = page.execute_script("const e = document.getElementById('chat-error'); return [e.hidden, e.textContent]")
    with pytest.raises(urllib.error.HTTPError) as refused:
        api_answer(cluster.http, [{"role": "user", "content": too_long.strip()}])
    assert error == [False, json.load(refused.value)["error"]["message"]]
    assert "exceeds the model's context" in error[1]


def test_a_killed_node_shows_offline_and_the_new_plan_leaves_it_out(page, cluster, chat_artifacts) -> None:
    pieces = len(read_manifest(chat_artifacts).pieces)
    before = wait_page(page, 30, lambda p: p["epoch"] and set(p["cells"]) == set(NODES), "the three-node plan")
    cluster.kill_node("c2")
    after = wait_page(page, 10, lambda p: p["nodes"].get("c2") == ["false", "offline"]
                      and int(p["epoch"] or 0) > int(before["epoch"]) and all(p["cells"]), "c2 offline, a new plan")
    assert len(after["cells"]) == pieces and set(after["cells"]) == {"c1", "c3"}
    assert after["nodes"]["c1"] == after["nodes"]["c3"] == ["true", "online"]
    assert after["epochs"][:2] == [after["epoch"], before["epoch"]]
    screenshot(page, "dashboard-after-kill.png")


def test_the_page_shows_it_reconnecting_while_the_hub_is_down_then_live_again(page, cluster) -> None:
    cluster.kill_hub()
    wait_page(page, 10, lambda p: p["conn"] == "reconnecting", "that it is reconnecting")
    cluster.start_hub(port=BrokerUrl.parse(cluster.url).port)  # the same broker and HTTP ports
    # Live again on its own (EventSource retries), showing what the new hub sees: its broker starts
    # empty, so the nodes reappear as they rejoin (a plan waits for the hub's --min-nodes).
    wait_page(page, 30, lambda p: p["conn"] == "live" and p["nodes"].get("c1") == ["true", "online"],
              "the cluster live again")


def test_on_a_secured_cluster_the_page_asks_for_a_key_then_shows_the_cluster(browser, secured) -> None:
    browser.switch_to.new_window("tab")  # the other tests' page stays as it is in its own tab
    try:
        browser.get(secured.http + "/")
        asked = wait_page(browser, 10, lambda p: p["keyForm"], "the key form")
        assert asked["conn"] == "key" and asked["nodes"] == {} and asked["keyError"] == ""
        enter_key(browser, api_key("alice", "not-her-password"))
        refused = wait_page(browser, 10, lambda p: p["keyError"], "why the key was refused")
        assert refused["keyForm"] and "refused" in refused["keyError"] and refused["nodes"] == {}
        enter_key(browser, api_key("alice", "alice-pw"))
        shown = wait_page(browser, 10, lambda p: p["conn"] == "live" and p["nodes"], "the cluster")
        assert not shown["keyForm"] and shown["nodes"] == {"n1": ["true", "online"]}
        assert say(browser, "Hi", temperature="0") == api_answer(
            secured.http, [{"role": "user", "content": "Hi"}], key=api_key("alice", "alice-pw"))
    finally:
        browser.close()
        browser.switch_to.window(browser.window_handles[0])


def enter_key(page: WebDriver, key: str) -> None:
    page.find_element("id", "key-input").send_keys(key)
    page.find_element("id", "key-save").click()


def say(page: WebDriver, text: str, *, temperature: str) -> str:
    """Type ``text`` in the chat box, send it, and return the answer once the page has it whole."""
    page.find_element("id", "chat-input").send_keys(text)
    return send(page, temperature=temperature)


def send(page: WebDriver, *, temperature: str) -> str:
    """Click send with that temperature; the answer once the page has it whole ("" if it failed)."""
    for name, value in (("chat-temperature", temperature), ("chat-max-tokens", str(MAX_TOKENS))):
        field = page.find_element("id", name)
        field.clear()
        field.send_keys(value)
    before = page.execute_script(f"return {ANSWERS}.length")
    page.find_element("id", "chat-send").click()
    answer_id, answer = WebDriverWait(page, 60, poll_frequency=0.1).until(lambda d: d.execute_script(f"""
        const all = {ANSWERS}, a = all[all.length - 1];
        return all.length > arguments[0] && a.dataset.done === 'true' ? [a.id, a.textContent] : null;""", before))
    assert answer_id == "chat-answer"
    return answer


def api_answer(http: str, messages: list[dict[str, str]], key: str | None = None) -> str:
    """The API's answer to the call the page makes (greedy, MAX_TOKENS)."""
    body = json.dumps({"messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS}).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(http + "/v1/chat/completions", data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)["choices"][0]["message"]["content"]
