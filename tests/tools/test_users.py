"""`linguamq users`: the users file a secured hub reads, and its mosquitto export."""

from __future__ import annotations

import io
import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from linguamq import topics as T
from linguamq.broker.users import UsersError, load_users, parse_users, verify_password
from linguamq.tools.cli import main


@pytest.fixture(autouse=True)
def _fresh_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()  # cli.main bound structlog to this test's captured stderr


def users(*argv: str, stdin: str | None = None, monkeypatch: pytest.MonkeyPatch | None = None) -> int:
    if stdin is not None and monkeypatch is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return main(["users", *argv])


def test_add_list_remove_round_trip(tmp_path: Path, capsys, monkeypatch) -> None:
    f = tmp_path / "users"
    assert users("add", "n1", "--role", "node", "--file", str(f), "--password", "secret-1") == 0
    assert users("add", "alice", "--role", "client", "--file", str(f), stdin="from-stdin\n",
                 monkeypatch=monkeypatch) == 0
    assert stat.S_IMODE(f.stat().st_mode) == 0o600  # password hashes: owner only
    loaded = load_users(f)
    assert loaded["n1"].check("secret-1") and not loaded["n1"].check("secret-2")
    assert loaded["alice"].check("from-stdin")
    assert "secret-1" not in f.read_text() and "from-stdin" not in f.read_text()
    capsys.readouterr()
    assert users("list", "--file", str(f), "--json") == 0
    assert json.loads(capsys.readouterr().out) == [{"name": "n1", "role": "node"},
                                                   {"name": "alice", "role": "client"}]
    assert users("remove", "n1", "--file", str(f)) == 0
    assert users("list", "--file", str(f)) == 0
    assert capsys.readouterr().out == "alice\tclient\n"


def test_the_hash_is_mosquittos_pbkdf2_sha512_format(tmp_path: Path) -> None:
    f = tmp_path / "users"
    assert users("add", "n1", "--role", "node", "--file", str(f), "--password", "pw") == 0
    _, _, hashed = f.read_text().splitlines()[-1].split(":")
    algo, iterations, salt, digest = hashed.split("$")[1:]
    assert algo == "7" and int(iterations) >= 10_000
    import base64
    assert len(base64.b64decode(salt)) == 12 and len(base64.b64decode(digest)) == 64
    # a hash written by mosquitto_passwd 2.0.11 (password "secret") verifies here
    assert verify_password("$7$101$Tdov/xBhr0WXoCtP$lVAIeBsh+JwAUI1JLNdkZXHn8RUSm4lN8fmkxPm2Hk2MrigTKqeZC0"
                           "61YRJxHwE0QDEFgV5XQt9a1EXtOAeB6Q==", "secret")


def test_bad_input_gets_clear_errors(tmp_path: Path, capsys, monkeypatch) -> None:
    f = tmp_path / "users"
    assert users("add", "n1", "--role", "node", "--file", str(f), "--password", "pw") == 0
    capsys.readouterr()
    assert users("add", "n1", "--role", "node", "--file", str(f), "--password", "other") == 2
    assert "already in" in capsys.readouterr().err
    assert users("add", "n1", "--role", "client", "--file", str(f), "--password", "other", "--replace") == 0
    assert load_users(f)["n1"].role == "client" and load_users(f)["n1"].check("other")
    assert users("add", "a/b", "--role", "node", "--file", str(f), "--password", "pw") == 2
    assert "invalid user name 'a/b'" in capsys.readouterr().err
    assert users("add", "n2", "--role", "node", "--file", str(f), stdin="", monkeypatch=monkeypatch) == 2
    assert "no password on stdin" in capsys.readouterr().err
    assert users("remove", "ghost", "--file", str(f)) == 2
    assert "no user 'ghost'" in capsys.readouterr().err
    assert users("list", "--file", str(tmp_path / "missing")) == 2
    assert "no such users file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: unknown role
        users("add", "n3", "--role", "admin", "--file", str(f), "--password", "pw")


@pytest.mark.parametrize("text, error", [
    ("n1:node\n", "users:1: expected name:role"),
    ("# ok\n\nn1:root:$7$101$AAAA$BBBB\n", "users:3: unknown role 'root'"),
    ("n1:node:plaintext\n", "users:1: user 'n1': the password hash is not mosquitto's $7$ format"),
    ("n1:node:$7$101$AAAA$BBBB\nn1:client:$7$101$AAAA$BBBB\n", "users:2: duplicate user 'n1'"),
    ("bad name:node:$7$101$AAAA$BBBB\n", "users:1: invalid user name"),
])
def test_a_malformed_file_names_its_line(text: str, error: str) -> None:
    with pytest.raises(UsersError) as raised:
        parse_users(text, source="users")
    assert str(raised.value).startswith(error)


def test_export_mosquitto_writes_password_and_acl_files(tmp_path: Path) -> None:
    f, out = tmp_path / "users", tmp_path / "mosq"
    for name, role in (("hub1", "hub"), ("n1", "node"), ("alice", "client")):
        assert users("add", name, "--role", role, "--file", str(f), "--password", f"{name}-pw") == 0
    assert users("export-mosquitto", "--file", str(f), "--out", str(out), "--cluster", "home") == 0
    ours = load_users(f)
    lines = (out / "password_file").read_text().splitlines()
    assert lines == [f"{u.name}:{u.password_hash}" for u in ours.values()]  # the same hashes, no roles
    acl = (out / "acl_file").read_text()
    blocks = {b.splitlines()[0]: b.splitlines()[1:] for b in acl.split("\n\n") if b.startswith("user ")}
    assert blocks["user hub1"] == ["topic readwrite #"]
    assert blocks["user alice"] == [f"topic write {T.REQUESTS_FROM.build('home', client='alice')}",
                                    f"topic write {T.CANCEL_FROM.build('home', client='alice')}",
                                    f"topic read {T.CLIENT_RESPONSES.filter('home', client='alice')}",
                                    f"topic read {T.ERRORS.build('home', client='alice')}"]
    assert f"topic write {T.NODE_STATUS.build('home', node='n1')}" in blocks["user n1"]
    assert f"topic read {T.NODE_ASSIGN.build('home', node='n1')}" in blocks["user n1"]
    assert not any("n2" in line or "/plan" in line for line in blocks["user n1"])
    assert stat.S_IMODE((out / "password_file").stat().st_mode) == 0o600


def test_adding_a_client_prints_its_api_key(tmp_path: Path, capsys) -> None:
    from linguamq.gateway.keys import parse_api_key
    f = tmp_path / "users"
    assert users("add", "alice", "--role", "client", "--file", str(f), "--password", "pw:with:colons") == 0
    key = capsys.readouterr().out.strip()
    assert parse_api_key(key) == ("alice", "pw:with:colons")  # the login the gateway presents to the broker
    assert users("add", "n1", "--role", "node", "--file", str(f), "--password", "pw") == 0
    assert capsys.readouterr().out == ""  # nodes call no API
