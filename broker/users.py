"""The users file: who may connect to a cluster's broker, with which role.

One user per line, ``name:role:$7$ITERATIONS$SALT$HASH``; ``#`` starts a comment line.
Names are topic ids (``[A-Za-z0-9_-]{1,64}``) because a node's and a client's name appears
in the topics it may use; roles are ``hub``, ``node`` and ``client`` (see ``broker/acl.py``).

The hash is mosquitto 2's ``$7$`` format (PBKDF2-HMAC-SHA512, the iteration count in the
string, 12-byte salt, 64-byte hash, both base64): `linguamq users export-mosquitto` copies
it unchanged into a mosquitto ``password_file``, so one set of passwords serves both
brokers. ITERATIONS is chosen so that one check costs ~15-20 ms here (mosquitto_passwd uses
101): slow enough to make guessing from a stolen file expensive, fast enough that a whole
cluster reconnecting after a hub restart is not held up.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

ROLES = ("hub", "node", "client")
ITERATIONS = 40_000
SALT_BYTES = 12
HASH_BYTES = 64
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HASH = re.compile(r"\$7\$([1-9][0-9]{0,8})\$([A-Za-z0-9+/=]{1,64})\$([A-Za-z0-9+/=]{1,128})")
MAX_PASSWORD_BYTES = 1024  # bounded work per CONNECT (MQTT allows 64 KiB)


class UsersError(ValueError):
    """A users file or a user entry is invalid; the message names the file and line."""


@dataclasses.dataclass(frozen=True, slots=True)
class User:
    name: str
    role: str
    password_hash: str  # $7$...

    def line(self) -> str:
        return f"{self.name}:{self.role}:{self.password_hash}"

    def check(self, password: str | bytes | None) -> bool:
        """True if ``password`` is this user's (constant-time comparison)."""
        return verify_password(self.password_hash, password)


def hash_password(password: str, *, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    """mosquitto's ``$7$`` string for ``password``."""
    if not password:
        raise UsersError("the password must not be empty")
    data = password.encode()
    if len(data) > MAX_PASSWORD_BYTES:
        raise UsersError(f"the password is longer than {MAX_PASSWORD_BYTES} bytes")
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", data, salt, iterations, HASH_BYTES)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password_hash: str, password: str | bytes | None) -> bool:
    """Check ``password`` against a ``$7$`` string; False for anything malformed."""
    if password is None:
        return False
    data = password.encode() if isinstance(password, str) else bytes(password)
    match = _HASH.fullmatch(password_hash)
    if match is None or not data or len(data) > MAX_PASSWORD_BYTES:
        return False
    iterations, salt, expected = int(match[1]), base64.b64decode(match[2]), base64.b64decode(match[3])
    digest = hashlib.pbkdf2_hmac("sha512", data, salt, iterations, len(expected))
    return hmac.compare_digest(digest, expected)


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise UsersError(f"invalid user name {name!r}: 1-64 characters of A-Z a-z 0-9 _ - "
                         "(it is used in topics)")
    return name


def validate_role(role: str) -> str:
    if role not in ROLES:
        raise UsersError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    return role


def parse_users(text: str, *, source: str = "<users>") -> dict[str, User]:
    """name -> User; UsersError naming ``source:line`` for the first problem."""
    users: dict[str, User] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        parts = line.split(":")
        if len(parts) != 3:
            raise UsersError(f"{where}: expected name:role:$7$ITERATIONS$SALT$HASH, got {_short(line)}")
        name, role, password_hash = parts
        try:
            validate_name(name)
            validate_role(role)
        except UsersError as exc:
            raise UsersError(f"{where}: {exc}") from None
        if not _HASH.fullmatch(password_hash) or not _decodes(password_hash):
            raise UsersError(f"{where}: user {name!r}: the password hash is not mosquitto's $7$ format")
        if name in users:
            raise UsersError(f"{where}: duplicate user {name!r}")
        users[name] = User(name, role, password_hash)
    return users


def load_users(path: Path | str) -> dict[str, User]:
    """Read a users file (UsersError if missing or invalid)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsersError(f"{path}: no such users file (create it with `linguamq users add`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsersError(f"{path}: cannot read the users file: {exc}") from None
    return parse_users(text, source=str(path))


def save_users(path: Path | str, users: Iterable[User]) -> None:
    """Write the file atomically, readable by its owner only (0600)."""
    path = Path(path)
    body = "# linguamq users: name:role:password hash (mosquitto $7$). Edit with `linguamq users`.\n"
    body += "".join(f"{u.line()}\n" for u in users)
    write_private(path, body)


def write_private(path: Path, text: str) -> None:
    """Atomic write of a 0600 file (a secret: password hashes, private keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _decodes(password_hash: str) -> bool:
    match = _HASH.fullmatch(password_hash)
    try:
        return (match is not None and len(base64.b64decode(match[2], validate=True)) > 0
                and len(base64.b64decode(match[3], validate=True)) > 0)
    except ValueError:
        return False


def _short(text: str) -> str:
    return repr(text) if len(text) <= 60 else repr(text[:57] + "...")


# The hub's own clients (planner, head, blob server) log in with this name and a secret made
# for one run: no entry in the users file, and no name a users file can hold ('$').
HUB_USERNAME = "$hub"
HUB_SECRET_ENV = "LINGUAMQ_HUB_SECRET"  # how the hub hands the secret to its broker process


class Credentials:
    """The users of a broker: checks a CONNECT's username/password, tells a user's role.

    ``hub_secret``: the in-memory credential of the hub's own clients (``HUB_USERNAME``).
    """

    def __init__(self, users: dict[str, User], *, hub_secret: str | None = None) -> None:
        self._users = dict(users)
        self._hub_secret = hub_secret

    @classmethod
    def from_file(cls, path: Path | str, *, hub_secret: str | None = None) -> Credentials:
        return cls(load_users(path), hub_secret=hub_secret)

    @property
    def users(self) -> dict[str, User]:
        return dict(self._users)

    def role(self, username: str | None) -> str | None:
        if username is None:
            return None
        if username == HUB_USERNAME:
            return "hub" if self._hub_secret else None
        user = self._users.get(username)
        return user.role if user is not None else None

    def authenticate(self, username: str | None, password: str | bytes | None) -> bool:
        """True if this username/password may connect (slow on purpose: ~ms of PBKDF2)."""
        if username is None or password is None:
            return False
        if username == HUB_USERNAME:
            if not self._hub_secret:
                return False
            given = password.encode() if isinstance(password, str) else bytes(password)
            return hmac.compare_digest(given, self._hub_secret.encode())
        user = self._users.get(username)
        if user is None:
            # Same cost as a wrong password: timing does not tell which names exist.
            verify_password(_DUMMY_HASH, password)
            return False
        return user.check(password)


_DUMMY_HASH = f"$7${ITERATIONS}${base64.b64encode(bytes(SALT_BYTES)).decode()}$" \
              f"{base64.b64encode(bytes(HASH_BYTES)).decode()}"
