"""Shared by every test: exceptions raised in MQTT callbacks fail the test that caused them.

Handlers passed to ``MqttClient.subscribe`` (and paho's ``on_message``) run on paho's
network thread. An ``assert`` there is caught (MqttClient logs it, paho ends its loop)
and the test sees nothing but a wait that times out. Wrap such a callback with the
``callback_errors`` fixture: what it raises is recorded (and raised on, so the client
behaves as before), ``callback_errors.wait(event, timeout)`` raises it as soon as it
happens, and the test fails with it in any case, even if its own wait ran out first.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Generator
from typing import ParamSpec, TypeVar

import pytest
import structlog

pytest_plugins = ["pytester"]  # tests/topics/test_callback_errors.py runs pytest on tests that use the fixture

P = ParamSpec("P")
R = TypeVar("R")


class CallbackErrors:
    """Exceptions raised by wrapped callbacks on other threads, first one first."""

    def __init__(self) -> None:
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()

    def wrap(self, callback: Callable[P, R]) -> Callable[P, R]:
        """``callback``, recording what it raises before raising it on."""
        @functools.wraps(callback)
        def recorded(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return callback(*args, **kwargs)
            except BaseException as exc:
                with self._lock:
                    self._errors.append(exc)
                raise
        return recorded

    def check(self) -> None:
        """Raise the first exception a wrapped callback raised, if any."""
        with self._lock:
            first = self._errors[0] if self._errors else None
        if first is not None:
            raise first

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """``event.wait(timeout)``, but a callback's exception is raised as soon as it happens."""
        deadline = time.monotonic() + timeout
        while not event.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
            self.check()
            if time.monotonic() >= deadline:
                return False
        self.check()
        return True


@pytest.fixture(autouse=True)
def _structlog_as_found() -> Generator[None, None, None]:
    """Each test leaves structlog as it found it. ``structlog.testing.capture_logs`` leaves it
    "configured" with the defaults, which print to stdout; a later ``linguamq.Client`` then keeps
    that set-up (it routes to ``logging`` only when nothing is configured) and its log lines
    landed in another test's captured stdout (test_chat parses run-local's JSON from it)."""
    was, config = structlog.is_configured(), structlog.get_config()
    yield
    if was:
        structlog.configure(**config)
    else:
        structlog.reset_defaults()


@pytest.fixture
def callback_errors() -> CallbackErrors:
    return CallbackErrors()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """A test whose wrapped callbacks raised fails with the callback's exception: a wait that
    timed out because of it is the symptom, the assertion the cause (chained as context)."""
    errors = getattr(item, "funcargs", {}).get("callback_errors")
    try:
        return (yield)
    finally:
        if isinstance(errors, CallbackErrors):
            errors.check()


# `make test` runs the suite in two phases: LINGUAMQ_TESTS=parallel (pytest-xdist workers)
# leaves out the tests marked `serial`, LINGUAMQ_TESTS=serial runs only those, alone on the
# machine (they watch timing-driven behaviour, such as drift replanning, that another
# worker's load would really change). Unset: everything, in one process.
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    phase = os.environ.get("LINGUAMQ_TESTS")
    if phase not in ("parallel", "serial"):
        return
    keep = [item for item in items if (item.get_closest_marker("serial") is not None) == (phase == "serial")]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep
