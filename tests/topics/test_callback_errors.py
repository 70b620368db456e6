"""An assertion that fails in an MQTT handler (paho's network thread) fails its test with
that assertion, at once, instead of being logged and leaving the test to time out
(the ``callback_errors`` fixture of tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

HANDLER_ASSERT = '        assert msg.payload == b"expected", "the handler saw the wrong payload"'
INNER = '''
import threading

from linguamq.broker import BrokerThread
from linguamq.topics.client import MqttClient


def run(handler, wait):
    done = threading.Event()

    def on_message(msg):
        assert msg.payload == b"expected", "the handler saw the wrong payload"
        done.set()

    with BrokerThread() as broker, MqttClient(url=broker.url, client_id="c") as client:
        client.subscribe_raw("t", handler(on_message), qos=1, wait=10)
        client.publish_raw("t", b"unexpected", qos=1)
        assert wait(done), "no message handled"


def test_waits_through_the_fixture(callback_errors):
    run(callback_errors.wrap, lambda done: callback_errors.wait(done, 60))


def test_waits_on_its_own(callback_errors):
    run(callback_errors.wrap, lambda done: done.wait(1))


def test_unwrapped(callback_errors):
    run(lambda on_message: on_message, lambda done: done.wait(1))
'''


def test_a_failed_assert_in_a_handler_fails_the_test_with_that_assertion(pytester: pytest.Pytester) -> None:
    pytester.makeconftest((Path(__file__).parents[1] / "conftest.py").read_text())
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=3)
    calls = {r.head_line: r for r in result.reprec.getreports("pytest_runtest_logreport") if r.when == "call"}
    crash = {name: report.longrepr.reprcrash for name, report in calls.items()}  # the error each test failed with
    for name in ("test_waits_through_the_fixture", "test_waits_on_its_own"):
        assert crash[name].message.startswith("AssertionError: the handler saw the wrong payload"), crash[name]
        assert crash[name].lineno == INNER.lstrip("\n").splitlines().index(HANDLER_ASSERT) + 1  # 1-based, there
    # The fixture's wait raised at once, not after its 60 s.
    assert calls["test_waits_through_the_fixture"].duration < 30
    # Without the wrapper the test sees only its wait run out: what happened is lost.
    assert crash["test_unwrapped"].message.startswith("AssertionError: no message handled"), crash
