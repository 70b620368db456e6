"""`linguamq pub` and `linguamq sub` side by side with mosquitto_pub and mosquitto_sub.

Both run with the same words against the same real mosquitto (plain, password and TLS
listeners, started once for this module on free 127.0.0.1 ports): their stdout bytes,
their stderr and their exit codes must be the same. Timing never relies on sleeps: a
subscriber is known to be ready when it prints a retained marker, and "live" messages
are published again and again until the subscribers exit (each wait is bounded).

Our commands run as ``python -m linguamq.tools.commands.{pub,sub}`` (the `linguamq` entry
point imports every command, torch included, which costs seconds per run); a few tests
go through ``linguamq.tools.cli`` to check that the words reach mosquitto's parser.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import os
import pwd
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest

from linguamq import topics
from linguamq.broker.embedded import BrokerThread, EmbeddedBroker
from linguamq.schemas import blobs, envelope
from linguamq.schemas.cluster import NodeStatus
from linguamq.schemas.envelope import ActHeader
from linguamq.schemas.examples import EXAMPLES
from linguamq.schemas.requests import TokenEvent
from linguamq.tools import cli
from linguamq.tools.commands import pub as cmd_pub
from linguamq.tools.commands import sub as cmd_sub
from linguamq.tools.mosquitto import args as mosquitto_args
from linguamq.tools.mosquitto import render
from linguamq.tools.mosquitto.format import Clock, Received, parse_cjson, print_cjson, print_message

TOOLS = ("mosquitto", "mosquitto_pub", "mosquitto_sub", "mosquitto_passwd", "openssl")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                       reason="needs mosquitto, mosquitto-clients and openssl (make setup installs them)"),
]

OURS = {"pub": [sys.executable, "-m", "linguamq.tools.commands.pub"], "sub": [sys.executable, "-m", "linguamq.tools.commands.sub"]}
THEIRS = {"pub": ["mosquitto_pub"], "sub": ["mosquitto_sub"]}
RUN_TIMEOUT = 20.0  # seconds, any single command
USER, PASSWORD = "alice", "s3cret"


@dataclasses.dataclass(frozen=True)
class Result:
    rc: int
    out: bytes
    err: bytes


@dataclasses.dataclass(frozen=True)
class Mosquitto:
    plain: int
    auth: int
    tls: int
    ca: Path
    wrong_ca: Path  # the server's own certificate: not a CA, verification fails


# --- fixtures --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_certificates(d: Path) -> None:
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=linguamq test CA", cwd=d)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=localhost", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "2", "-extfile", "san.cnf", cwd=d)


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"mosquitto is not listening on {port} after {timeout} s")


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    d = tmp_path_factory.mktemp("mosquitto")
    make_certificates(d)
    (d / "passwords").touch()
    subprocess.run(["mosquitto_passwd", "-b", str(d / "passwords"), USER, PASSWORD], check=True, timeout=30,
                   capture_output=True)
    ports = Mosquitto(plain=free_port(), auth=free_port(), tls=free_port(), ca=d / "ca.crt",
                      wrong_ca=d / "server.crt")
    # As root, mosquitto drops to user "mosquitto", who cannot read our tmp dir: stay ourselves.
    (d / "mosquitto.conf").write_text(f"""\
user {pwd.getpwuid(os.getuid()).pw_name}
per_listener_settings true
persistence false
listener {ports.plain} 127.0.0.1
allow_anonymous true
listener {ports.auth} 127.0.0.1
allow_anonymous false
password_file {d / 'passwords'}
listener {ports.tls} 127.0.0.1
allow_anonymous true
cafile {d / 'ca.crt'}
certfile {d / 'server.crt'}
keyfile {d / 'server.key'}
""")
    log = (d / "mosquitto.log").open("wb")
    proc = subprocess.Popen(["mosquitto", "-c", str(d / "mosquitto.conf")], stdout=log, stderr=subprocess.STDOUT)
    try:
        for port in (ports.plain, ports.auth, ports.tls):
            wait_listening(port, proc)
        yield ports
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """No user options file (~/.config/mosquitto_sub), a time zone with minutes in it."""
    empty = tmp_path_factory.mktemp("xdg")
    return {**os.environ, "XDG_CONFIG_HOME": str(empty), "TZ": "IST-5:30"}


@pytest.fixture
def base(request: pytest.FixtureRequest) -> str:
    """A topic prefix no other test uses."""
    return f"t/{request.node.name[:40]}/{uuid.uuid4().hex[:8]}"


# --- running commands ------------------------------------------------------------------


def run(cmd: Sequence[str], env: dict[str, str], stdin: bytes = b"", timeout: float = RUN_TIMEOUT) -> Result:
    p = subprocess.run(list(cmd), check=False, input=stdin, capture_output=True, env=env, timeout=timeout)
    return Result(p.returncode, p.stdout, p.stderr)


def both(mode: str, args: Sequence[str], env: dict[str, str], stdin: bytes = b"") -> tuple[Result, Result]:
    """(ours, theirs), run at the same time; their stderr names us where it names itself."""
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        ours = pool.submit(run, OURS[mode] + list(args), env, stdin)
        theirs = pool.submit(run, THEIRS[mode] + list(args), env, stdin)
        a, b = ours.result(), theirs.result()
    return a, dataclasses.replace(b, err=b.err.replace(f"mosquitto_{mode} --help".encode(),
                                                       f"linguamq {mode} --help".encode()))


def assert_same(ours: Result, theirs: Result) -> None:
    assert (ours.rc, ours.out, ours.err) == (theirs.rc, theirs.out, theirs.err)


def publish(port: int, topic: str, payload: bytes, *, retain: bool = True, qos: int = 1) -> None:
    """Set up a message with mosquitto's own client (binary-safe through -s)."""
    args = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-q", str(qos)]
    args += (["-s"] if payload else ["-n"]) + (["-r"] if retain else [])
    subprocess.run(args, input=payload, check=True, timeout=RUN_TIMEOUT)


class LivePublisher:
    """Publishes one non-retained message again and again (every 50 ms) until stopped."""

    def __init__(self, port: int, topic: str, payload: bytes) -> None:
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
        self.client.connect("127.0.0.1", port)
        self.topic, self.payload = topic, payload
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            self.client.publish(self.topic, self.payload, qos=0)

    def __enter__(self) -> LivePublisher:
        self.client.loop_start()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.client.disconnect()
        self.client.loop_stop()


def read_line(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> bytes:
    """One line of a running process's stdout, without blocking past ``timeout``."""
    assert proc.stdout is not None
    fd, line = proc.stdout.fileno(), b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while not line.endswith(b"\n"):
            if not sel.select(max(deadline - time.monotonic(), 0)):
                raise TimeoutError(f"no line from {proc.args!r} in {timeout} s (so far {line!r})")
            chunk = os.read(fd, 1)
            if not chunk:
                break
            line += chunk
    return line


def finish(proc: subprocess.Popen[bytes], timeout: float = RUN_TIMEOUT) -> Result:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=5)
        raise
    return Result(proc.returncode, out, err)


# --- argument handling: same complaints, same exit codes -------------------------------

ARG_CASES = [
    [], ["-t"], ["--unknown"], ["-m", "x", "-t", "a"], ["-t", "a", "-q", "3"], ["-p", "70000", "-t", "a"],
    ["-p", "-1", "-t", "a"], ["-p"], ["-t", "a", "-W", "0"], ["-t", "a", "-C", "0"], ["-C", "x", "-t", "a"],
    ["-t", "a", "-R", "--retained-only"], ["-t", "a", "-F", "%Z"], ["-t", "a", "-F", "%"], ["-t", "a", "-F", "%-5.2"],
    ["-t", "a", "-F", "\\z"], ["-t", "a", "-F", "@"], ["-t", "a", "-V", "4"], ["-t", "a+b"], ["-t", "a/#/b"],
    ["-t", "a", "-T", "x+"], ["-U", "a#"], ["-t", "a", "-k", "2"], ["-i", "x", "-I", "y"], ["-t", "a", "-c"],
    ["--will-payload", "x", "-t", "a"], ["--will-topic", "+"], ["--will-qos", "3"], ["-t", "a", "--cert", "x"],
    ["-L", "http://x/a"], ["-L", "mqtt://localhost"], ["-x", "A"], ["-x", "4294967296"], ["-t", "\x01"],
    ["--psk", "aa", "-t", "a"], ["-M", "0"], ["--random-filter", "101"], ["-t", "a", "-r"], ["-t", "a", "-n"],
    ["-V", "5", "-c", "-t", "a"], ["-t", "a", "-i", ""], ["-t", "a", "-u", "\x01", "-p", "1"],
    ["-h", "127.0.0.1", "-p", "1", "-t", "a"],  # nothing listens on port 1
]
PUB_CASES = [
    ["-t", "a"], ["-m", "x"], ["-t", "a/+", "-m", "x"], ["-t", "a", "-m", "x", "-n"], ["-t", "a", "-f", "/nonexistent"],
    ["-t", "a", "-s"], ["-t", "a", "-m", "x", "-v"], ["-t", "a", "-m", "x", "-W", "1"], ["--repeat", "0"],
    ["-t", "a", "-m", "x", "-V", "5", "-c"],
]


@pytest.mark.parametrize("mode", ["sub", "pub"])
def test_rejected_command_lines_get_mosquittos_messages_and_exit_codes(mode: str, env: dict[str, str]) -> None:
    mismatches = []
    for argv in ARG_CASES + (PUB_CASES if mode == "pub" else []):
        out, err = io.BytesIO(), io.BytesIO()
        if mode == "sub":
            rc = cmd_sub.main(argv, out=out, err=err, env=env)
        else:
            rc = cmd_pub.main(argv, out=out, err=err, stdin=io.BytesIO(b""), env=env)
        theirs = run(THEIRS[mode] + argv, env)
        their_err = theirs.err.replace(f"mosquitto_{mode}".encode(), f"linguamq {mode}".encode())
        # mosquitto_pub prints its usage after "Both topic and message must be supplied".
        same_out = out.getvalue() == theirs.out or (b"Usage:" in out.getvalue() and b"Usage:" in theirs.out)
        if (rc, err.getvalue()) != (theirs.rc, their_err) or not same_out:
            mismatches.append(f"{argv}: ours {rc} {err.getvalue()!r}, theirs {theirs.rc} {their_err!r}")
    assert not mismatches, "\n".join(mismatches)


def test_help_and_version_go_to_stdout_with_exit_code_1(env: dict[str, str]) -> None:
    for mode, main in (("sub", cmd_sub.main), ("pub", cmd_pub.main)):
        for word, expected in (("--help", b"Usage: linguamq " + mode.encode()), ("--version", b"version")):
            out, err = io.BytesIO(), io.BytesIO()
            kwargs = {"stdin": io.BytesIO()} if mode == "pub" else {}
            assert main([word], out=out, err=err, env=env, **kwargs) == 1
            assert expected in out.getvalue() and err.getvalue() == b""
            assert run(THEIRS[mode] + [word], env).rc == 1


def test_the_cli_hands_every_word_to_the_mosquitto_parser(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    """argparse would read -h as "help" and complain in its own words: it must not."""
    assert cli.main(["sub", "-h"]) == 1
    captured = capsysbinary.readouterr()
    assert captured.err == b"Error: -h argument given but no host specified.\n\n\nUse 'linguamq sub --help' to see usage.\n"
    assert cli.main(["pub", "--help"]) == 1
    assert capsysbinary.readouterr().out.startswith(b"linguamq pub publishes")
    assert cli.main(["sub", "-t", "a", "--log-level", "debug"]) == 1  # not ours: mosquitto's words
    assert capsysbinary.readouterr().err.startswith(b"Error: Unknown option '--log-level'.")


def test_options_file_is_read_first_as_mosquitto_does(mosquitto: Mosquitto, env: dict[str, str], base: str,
                                                      tmp_path: Path) -> None:
    publish(mosquitto.plain, f"{base}/a", b"from the options file")
    (tmp_path / "mosquitto_sub").write_text(f"# defaults\n-h 127.0.0.1\n-p   {mosquitto.plain}\n-v\n")
    ours, theirs = both("sub", ["-t", f"{base}/#", "-C", "1"], {**env, "XDG_CONFIG_HOME": str(tmp_path)})
    assert_same(ours, theirs)
    assert ours.out == f"{base}/a from the options file\n".encode()


# --- what sub prints -------------------------------------------------------------------

RETAINED = {"1text": b"retained one", "2binary": b"bin\x00\x01\xff\"\\\n\ttail", "3json": b'{"a": [1, 2.50, "x"], '
            b'"b": null, "c": {"d": true, "e": "\\u00e9\\n"}, "f": -0.0, "g": 12345678901234567890, "h": 1e400}',
            "4utf8": "é✓".encode(), "5notjson": b"[1, 2,]", "6controls": b"c\x01\x1f\x7f\x08\x0c\r\"\\/ end"}
FORMATS = [
    [], ["-v"], ["-N"], ["-v", "-N"],
    ["-F", "%t|%p|%x|%X|%l|%q|%r|%m|%%"],
    ["-F", "%10t|%-10t|%.2t|%05l|%-5l|%3.1t|%010x|%-010p|%-p|%08X|%-6q"],
    ["-F", "\\t\\n\\0\\e\\a\\v\\r\\\\@@"],
    ["-F", "%j"], ["-F", "%J"], ["--pretty", "-F", "%J"], ["-q", "1", "-F", "%j %q %m %r"],
    ["-F", "%I|%U|@Y-@m-@d @H:@M:@S|@N|%5I|%.4U"],
    ["-F", "%A|%C|%E|%F|%R|%S|%P|%D|%5A|%5C|%-3E|"],  # v5 properties: none here
    ["-d", "-q", "1"], ["-V", "mqttv5", "-v"], ["-V", "31", "-v"],
]


@pytest.fixture(scope="module")
def retained_tree(mosquitto: Mosquitto) -> str:
    tree = f"t/retained/{uuid.uuid4().hex[:8]}"
    for name, payload in RETAINED.items():
        publish(mosquitto.plain, f"{tree}/{name}", payload)
    return tree


def normalise_time(data: bytes) -> bytes:
    return re.sub(rb"\d", b"0", data)  # the clocks differ, the shapes must not


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: " ".join(f) or "payload")
def test_retained_messages_print_the_same_bytes(mosquitto: Mosquitto, env: dict[str, str], retained_tree: str,
                                                fmt: list[str]) -> None:
    args = ["-h", "127.0.0.1", "-p", str(mosquitto.plain), "-t", f"{retained_tree}/#", "-C", str(len(RETAINED)), *fmt]
    ours, theirs = both("sub", args, env)
    if any("%j" in f or "%J" in f or "%I" in f for f in fmt):
        ours, theirs = (dataclasses.replace(r, out=normalise_time(r.out)) for r in (ours, theirs))
    assert_same(ours, theirs)
    assert ours.rc == 0 and ours.out


def test_count_stops_early_and_timeout_exits_27(mosquitto: Mosquitto, env: dict[str, str], retained_tree: str,
                                                base: str) -> None:
    at = ["-h", "127.0.0.1", "-p", str(mosquitto.plain)]
    ours, theirs = both("sub", [*at, "-t", f"{retained_tree}/#", "-C", "2", "-v"], env)
    assert_same(ours, theirs)
    assert (ours.rc, ours.out) == (0, f"{retained_tree}/1text retained one\n{retained_tree}/2binary ".encode()
                                   + RETAINED["2binary"] + b"\n")

    ours, theirs = both("sub", [*at, "-t", f"{base}/nothing/#", "-W", "1", "-v"], env)
    assert_same(ours, theirs)
    assert (ours.rc, ours.out, ours.err) == (27, b"", b"Timed out\n")

    ours, theirs = both("sub", [*at, "-t", f"{retained_tree}/1text", "-W", "1", "-C", "5", "--quiet"], env)
    assert_same(ours, theirs)
    assert (ours.rc, ours.out, ours.err) == (27, b"retained one\n", b"")


def test_interrupt_disconnects_and_exits_0(mosquitto: Mosquitto, env: dict[str, str], base: str) -> None:
    procs = [subscribe_ready(cmd, mosquitto.plain, f"{base}/{name}", 5, env)
             for name, cmd in (("ours", OURS["sub"]), ("theirs", THEIRS["sub"]))]
    for proc in procs:
        proc.send_signal(signal.SIGINT)
    ours, theirs = (finish(proc) for proc in procs)
    assert_same(ours, theirs)
    assert ours.rc == 0


def test_mqtt5_properties_in_formats(mosquitto: Mosquitto, env: dict[str, str], base: str) -> None:
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(mosquitto.plain), "-V", "5", "-t", f"{base}/p",
                    "-m", "with properties", "-r", "-D", "publish", "content-type", "text/plain",
                    "-D", "publish", "user-property", "a", "b", "-D", "publish", "user-property", "c", "d",
                    "-D", "publish", "response-topic", "rt", "-D", "publish", "correlation-data", "cd",
                    "-D", "publish", "payload-format-indicator", "1"], check=True, timeout=RUN_TIMEOUT)
    ours, theirs = both("sub", ["-h", "127.0.0.1", "-p", str(mosquitto.plain), "-V", "5", "-t", f"{base}/#", "-C", "1",
                                "-F", "%C|%P|%R|%D|%F|%A|%S|%E|%5A|%-12C|%.4R|%p"], env)
    assert_same(ours, theirs)
    assert ours.out == b"text/plain|a:b c:d|rt|cd|1||||     |text/plain  |rt|with properties\n"


def test_timeout_before_the_connack_exits_255(env: dict[str, str]) -> None:
    """A server that accepts and never answers: mosquitto_sub exit(-1)s when -W fires."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        ours, theirs = both("sub", ["-h", "127.0.0.1", "-p", str(server.getsockname()[1]), "-t", "a", "-W", "1"], env)
    assert_same(ours, theirs)
    assert ours.rc == 255


def test_live_messages_with_R_and_retained_only(mosquitto: Mosquitto, env: dict[str, str], base: str) -> None:
    at = ["-h", "127.0.0.1", "-p", str(mosquitto.plain)]
    publish(mosquitto.plain, f"{base}/old", b"stale")
    with LivePublisher(mosquitto.plain, f"{base}/new", b"live"):
        # -R: the retained message is not printed, the first live one is.
        ours, theirs = both("sub", [*at, "-t", f"{base}/#", "-R", "-C", "1", "-v", "-W", "10"], env)
        assert_same(ours, theirs)
        assert ours.out == f"{base}/new live\n".encode() and ours.rc == 0
        # --retained-only: retained messages, then exit at the first live one.
        ours, theirs = both("sub", [*at, "-t", f"{base}/#", "--retained-only", "-v", "-W", "10"], env)
        assert_same(ours, theirs)
        assert ours.out == f"{base}/old stale\n".encode() and ours.rc == 0
        # -T filters out, -U unsubscribes (nothing to undo here), -E exits after the SUBACK.
        ours, theirs = both("sub", [*at, "-t", f"{base}/#", "-T", f"{base}/old", "-C", "1", "-F", "%t=%p %r",
                                    "-W", "10"], env)
        assert_same(ours, theirs)
        assert ours.out == f"{base}/new=live 0\n".encode()
        ours, theirs = both("sub", [*at, "-t", f"{base}/#", "-E"], env)
        assert_same(ours, theirs)


def test_remove_retained_clears_what_it_printed(mosquitto: Mosquitto, env: dict[str, str], base: str) -> None:
    """mosquitto_sub 2.0.11 never exits with --remove-retained and -C (it waits for -W):
    ours exits once the removals are acknowledged."""
    at = ["-h", "127.0.0.1", "-p", str(mosquitto.plain)]
    for name in ("a", "b"):
        publish(mosquitto.plain, f"{base}/{name}", name.encode())
    ours = run(OURS["sub"] + [*at, "-t", f"{base}/#", "--remove-retained", "-C", "2", "-v", "-W", "10"], env)
    assert (ours.rc, ours.out) == (0, f"{base}/a a\n{base}/b b\n".encode())
    left = run(THEIRS["sub"] + [*at, "-t", f"{base}/#", "-W", "1"], env)
    assert (left.rc, left.out) == (27, b"")


# --- pub into sub, both ways -----------------------------------------------------------


def subscribe_ready(cmd: list[str], port: int, base: str, count: int, env: dict[str, str],
                    extra: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """A subscriber that has printed the retained marker ``{base}/0`` (so it is subscribed)."""
    publish(port, f"{base}/0", b"ready")
    proc = subprocess.Popen(cmd + ["-h", "127.0.0.1", "-p", str(port), "-t", f"{base}/#", "-C", str(count + 1),
                                   "-v", "-W", "15", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert read_line(proc) == f"{base}/0 ready\n".encode()
    except BaseException:
        proc.kill()
        proc.communicate(timeout=5)
        raise
    return proc


PUB_MODES = {  # name: (pub arguments, stdin, what a subscriber prints)
    "message": (["-m", "hello world"], b"", [b"hello world"]),
    "stdin": (["-s"], b"bin\x00\xff\nary", [b"bin\x00\xff\nary"]),
    "lines": (["-l"], b"one\n\ntwo\nthree", [b"one", b"(null)", b"two", b"three"]),
    "null": (["-n"], b"", [b"(null)"]),
    "repeat": (["-m", "again", "--repeat", "3", "--repeat-delay", "0.01"], b"", [b"again"] * 3),
    "qos2": (["-m", "exactly once", "-q", "2"], b"", [b"exactly once"]),
}


@pytest.mark.parametrize("direction", ["ours into theirs", "theirs into ours"])
def test_pub_into_sub_every_message_mode(mosquitto: Mosquitto, env: dict[str, str], base: str, tmp_path: Path,
                                         direction: str) -> None:
    pub_cmd, sub_cmd = (OURS["pub"], THEIRS["sub"]) if direction == "ours into theirs" else (THEIRS["pub"], OURS["sub"])
    (tmp_path / "payload.bin").write_bytes(b"\x00file\xff")
    modes = {**PUB_MODES, "file": (["-f", str(tmp_path / "payload.bin")], b"", [b"\x00file\xff"])}
    proc = subscribe_ready(sub_cmd, mosquitto.plain, base, sum(len(expected) for _, _, expected in modes.values()), env)
    try:
        for name, (args, stdin, _) in modes.items():
            sent = run(pub_cmd + ["-h", "127.0.0.1", "-p", str(mosquitto.plain), "-t", f"{base}/{name}", *args], env, stdin)
            assert (sent.rc, sent.out, sent.err) == (0, b"", b""), name
    finally:
        got = finish(proc)
    lines = [f"{base}/{name} ".encode() + e for name, (_, _, expected) in modes.items() for e in expected]
    assert (got.rc, got.out, got.err) == (0, b"\n".join(lines) + b"\n", b"")


def test_retained_and_will_published_by_us_are_seen_by_mosquitto(mosquitto: Mosquitto, env: dict[str, str],
                                                                base: str) -> None:
    at = ["-h", "127.0.0.1", "-p", str(mosquitto.plain)]
    assert run(OURS["pub"] + [*at, "-t", f"{base}/r", "-m", "kept", "-r", "-q", "1", "-i", "lmq-test-pub"], env).rc == 0
    got = run(THEIRS["sub"] + [*at, "-t", f"{base}/#", "-C", "1", "-F", "%t %p %r"], env)
    assert got.out == f"{base}/r kept 1\n".encode()
    # A will: our sub dies without a DISCONNECT (SIGKILL), the broker publishes it (retained).
    proc = subscribe_ready(OURS["sub"], mosquitto.plain, f"{base}/w", 1, env,
                           ["--will-topic", f"{base}/will", "--will-payload", "gone", "--will-retain", "-k", "5"])
    proc.kill()
    proc.communicate(timeout=10)
    got = run(THEIRS["sub"] + [*at, "-t", f"{base}/will", "-C", "1", "-F", "%p %r", "-W", "15"], env)
    assert (got.rc, got.out) == (0, b"gone 1\n")


# --- password and TLS ------------------------------------------------------------------


def test_password_protected_listener(mosquitto: Mosquitto, env: dict[str, str], base: str) -> None:
    at = ["-h", "127.0.0.1", "-p", str(mosquitto.auth)]
    for mode, creds in (("sub", []), ("pub", ["-u", USER, "-P", "wrong"]), ("sub", ["-P", PASSWORD])):
        ours, theirs = both(mode, [*at, *creds, "-t", "a", *(["-m", "x"] if mode == "pub" else [])], env)
        assert_same(ours, theirs)
        assert ours.rc == (1 if creds == ["-P", PASSWORD] else 5)  # 5: "not authorised"
    good = ["-u", USER, "-P", PASSWORD]
    for cmd, word in ((OURS["pub"], "ours"), (THEIRS["pub"], "theirs")):
        assert run(cmd + [*at, *good, "-t", f"{base}/{word}", "-m", word, "-r"], env).rc == 0
    url = f"mqtt://{USER}:{PASSWORD}@127.0.0.1:{mosquitto.auth}/{base}/#"
    ours, theirs = both("sub", ["-L", url, "-C", "2", "-v"], env)
    assert_same(ours, theirs)
    assert ours.out == f"{base}/ours ours\n{base}/theirs theirs\n".encode()


def test_tls_listener_with_a_ca_file(mosquitto: Mosquitto, env: dict[str, str], base: str) -> None:
    at = ["-p", str(mosquitto.tls), "--cafile", str(mosquitto.ca)]
    for cmd, word in ((OURS["pub"], "ours"), (THEIRS["pub"], "theirs")):
        assert run(cmd + ["-h", "127.0.0.1", *at, "-t", f"{base}/{word}", "-m", word, "-r"], env).rc == 0
    for host in ("127.0.0.1", "localhost"):  # the certificate names both
        ours, theirs = both("sub", ["-h", host, *at, "-t", f"{base}/#", "-C", "2", "-v"], env)
        assert_same(ours, theirs)
        assert ours.out == f"{base}/ours ours\n{base}/theirs theirs\n".encode()
    # A CA that did not sign the server's certificate. libmosquitto fails in connect() or
    # in its loop, depending on whether the TCP connect completed at once: either is right.
    tls_failures = {(1, b"", b"Unable to connect (A TLS error occurred.).\n"), (8, b"", b"Error: A TLS error occurred.\n")}
    for mode, extra in (("sub", ["-t", "a"]), ("pub", ["-t", "a", "-m", "x"])):
        ours, theirs = both(mode, ["-h", "127.0.0.1", "-p", str(mosquitto.tls), "--cafile", str(mosquitto.wrong_ca),
                                   *extra], env)
        assert {dataclasses.astuple(ours), dataclasses.astuple(theirs)} <= tls_failures
        ours, theirs = both(mode, ["-h", "127.0.0.1", "-p", str(mosquitto.tls), "--cafile", "/nonexistent", *extra], env)
        assert_same(ours, theirs)
    ours, theirs = both("pub", ["-h", "127.0.0.1", "-p", str(mosquitto.tls), "-t", "a", "-m", "x"], env)
    assert_same(ours, theirs)
    assert ours.rc == 7  # "The connection was lost."


# --- the embedded broker ---------------------------------------------------------------


def test_pub_to_sub_through_the_embedded_broker(env: dict[str, str], base: str) -> None:
    with BrokerThread(broker=EmbeddedBroker(host="127.0.0.1", port=0)) as broker:
        at = ["-h", "127.0.0.1", "-p", str(broker.port)]
        assert run(OURS["pub"] + [*at, "-t", f"{base}/0", "-m", "ready", "-r", "-q", "1"], env).rc == 0
        proc = subprocess.Popen(OURS["sub"] + [*at, "-t", f"{base}/#", "-C", "2", "-v", "-W", "15"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert read_line(proc) == f"{base}/0 ready\n".encode()
        assert run(OURS["pub"] + [*at, "-t", f"{base}/1", "-m", "through amqtt", "-q", "1"], env).rc == 0
        got = finish(proc)
    assert (got.rc, got.out, got.err) == (0, f"{base}/1 through amqtt\n".encode(), b"")


# --- --decode --------------------------------------------------------------------------

SHA = "ab" * 32


def our_messages() -> dict[str, bytes]:
    """One payload of each kind on its topic (cluster "c1")."""
    array = np.arange(12, dtype=np.float32).reshape(1, 3, 4) - 2.5
    header = ActHeader.for_tensor(array, session="s1", step=0, epoch=2, piece=1, start_pos=0)
    return {
        topics.NODE_STATUS.build("c1", node="phone-1"): EXAMPLES[NodeStatus].to_json(),
        topics.ACT.build("c1", piece=1): envelope.encode(header, array),
        topics.BLOB_CHUNK.build("c1", sha256=SHA, node="phone-1"): blobs.encode_chunk(SHA, 0, 10, b"\x00\x01\x02"),
        topics.RESPONSES.build("c1", request="r1"): EXAMPLES[TokenEvent].to_json(),
        topics.ACT.build("c1", piece=2): b"LMQ1\xff\xff\xff\xff broken",
        "elsewhere/bin": bytes(range(40)),
        "elsewhere/text": b"plain \x1b[31mred\x1b[0m text",
    }


def test_sub_decode_shows_a_chat_request_turn_by_turn() -> None:
    payload = b'{"id": "r1", "messages": [{"role": "user", "content": "Hi"}]}'
    text = render.render(topics.REQUESTS.build("c1"), payload)
    assert text.startswith("requests cluster=c1\n") and '"messages": [\n    {\n      "role": "user",' in text
    assert "(not a valid" in render.render(topics.REQUESTS.build("c1"), b'{"id": "r1"}')  # neither prompt nor messages


def test_render_each_kind_of_message() -> None:
    msgs = our_messages()
    status, act, chunk, token, broken, binary, escape = msgs.values()
    keys = list(msgs)
    text = render.render(keys[0], status)
    head, body = text.split("\n", 1)
    assert head == "node_status cluster=c1 node=phone-1" and json.loads(body) == EXAMPLES[NodeStatus].to_dict()
    text = render.render(keys[1], act)
    assert text.startswith("act cluster=c1 piece=1\n") and '"session": "s1"' in text
    assert text.endswith("tensor: float32 [1, 3, 4] min=-2.5 max=8.5 mean=3")
    text = render.render(keys[2], chunk)
    assert text.startswith("blob_chunk cluster=c1 sha256=" + SHA + " node=phone-1\n") and text.endswith("data: 3 bytes")
    assert '"text": " world"' in render.render(keys[3], token)
    text = render.render(keys[4], broken)
    assert text.startswith("act cluster=c1 piece=2 (not a valid act: ")
    assert f"<binary, {len(broken)} bytes> 4c4d5131" in text
    assert render.render(keys[5], binary) == ("<binary, 40 bytes> 00010203 04050607 08090a0b 0c0d0e0f 10111213 "
                                              "14151617 18191a1b 1c1d1e1f ...")
    assert render.render(keys[6], escape).startswith(f"<binary, {len(escape)} bytes>")
    assert render.render("x", b'{"k": "\\u001b[2J\\u202e"}') == '{\n  "k": "\\u001b[2J\\u202e"\n}'
    assert render.render("x", b"") == "(empty)"


def test_sub_decode_renders_our_topics_and_no_raw_bytes(mosquitto: Mosquitto, env: dict[str, str]) -> None:
    msgs = our_messages()
    cluster_topics = {}
    for topic, payload in msgs.items():
        moved = topic if not topic.startswith("elsewhere/") else f"x{uuid.uuid4().hex[:6]}/{topic}"
        publish(mosquitto.plain, moved, payload)
        cluster_topics[moved] = payload
    filters = sorted({t.split("/")[0] + "/#" for t in cluster_topics})
    args = ["-h", "127.0.0.1", "-p", str(mosquitto.plain), "-C", str(len(msgs)), "-v", "--decode", "-W", "10"]
    for f in filters:
        args += ["-t", f]
    got = run(OURS["sub"] + args, env)
    assert got.rc == 0, got.err
    text = got.out.decode("utf-8")
    assert all(ch.isprintable() or ch == "\n" for ch in text), "raw bytes reached the terminal"
    for topic, payload in cluster_topics.items():
        assert f"{topic} {render.render(topic, payload)}\n" in text


# --- the printer and cJSON, without a broker -------------------------------------------


def test_cjson_round_trips_like_mosquitto() -> None:
    doc = parse_cjson(b'\xef\xbb\xbf {"a":01, "a": [1.5e3, -0, 0.1, 1e400, "\\ud83d\\ude00\\u0041"], "b": {}} \n')
    assert print_cjson(doc, pretty=False) == b'{"a":1,"a":[1500,-0,0.1,null,"\xf0\x9f\x98\x80A"],"b":{}}'
    assert print_cjson(doc, pretty=True) == (b'{\n\t"a":\t1,\n\t"a":\t[1500, -0, 0.1, null, "\xf0\x9f\x98\x80A"],'
                                             b'\n\t"b":\t{\n\t}\n}')
    for bad in (b"", b"[1,]", b"{1:2}", b"+1", b".5", b"1 2", b"nul", b'"\\x"', b"[1]\x00", b'"\\udc00"'):
        with pytest.raises(ValueError):
            parse_cjson(bad)


def test_format_quirks_without_a_broker() -> None:
    cfg = mosquitto_args.parse(["-t", "a", "-F", "%-p|%5.1t|%-08l|"], "sub")
    msg = Received(topic="top", payload=b"abc", qos=1, retain=True, mid=7)
    printed = print_message(cfg, msg, Clock(0, 5))
    assert bytes(printed.out) == b"abc   |    t|3       |\n"  # "%-p" pads by its own length, as C's %*s does


def test_broken_pipe_stops_sub_quietly(mosquitto: Mosquitto, env: dict[str, str], retained_tree: str) -> None:
    """`linguamq sub ... | head -1`: no traceback, the subscriber goes away."""
    proc = subprocess.Popen(OURS["sub"] + ["-h", "127.0.0.1", "-p", str(mosquitto.plain), "-t", f"{retained_tree}/#",
                                           "-W", "15"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    proc.stdout.close()
    _, err = proc.communicate(timeout=RUN_TIMEOUT)
    assert proc.returncode == 141 and b"Traceback" not in err
