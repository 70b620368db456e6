"""mosquitto_pub / mosquitto_sub command lines for `linguamq pub` and `linguamq sub`.

People who run ``mosquitto_sub -h broker -t lmq/# -v`` must be able to type the same
words after ``linguamq sub``: the same flags, defaults, error messages and exit codes as
mosquitto 2.0.11's clients (``client/client_shared.c``). argparse cannot do that (``-h``
is the host, errors have mosquitto's wording and exit code 1, ``-t`` repeats, ``--help``
exits 1), so this module parses the words by hand into a ``ClientConfig``; it never
touches the network. ``take_raw_argv`` makes the `linguamq` argparse subparser hand the
words over untouched.

Like mosquitto, options are read first from ``$XDG_CONFIG_HOME/mosquitto_{pub,sub}`` (or
``~/.config/mosquitto_{pub,sub}``), one option per line, then from the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

Mode = Literal["pub", "sub"]
MQTT_MAX_PAYLOAD = 268435455
V31, V311, V5 = 3, 4, 5
UINT32_MAX = 4294967295
MOSQUITTO_VERSION = "2.0.11"


class ArgsError(Exception):
    """A command line mosquitto rejects: ``text`` is its exact stderr message."""

    def __init__(self, text: str, *, hint: bool = True) -> None:
        super().__init__(text)
        self.text = text
        self.hint = hint  # followed by "\nUse '... --help' to see usage.\n"


class HelpRequested(Exception):
    """``--help``: print the usage on stdout, exit 1 (as mosquitto does)."""


class VersionRequested(Exception):
    """``--version``: print the version on stdout, exit 1 (as mosquitto does)."""


@dataclasses.dataclass
class ClientConfig:
    """What a command line asks for (mosquitto's ``struct mosq_config``)."""

    mode: Mode
    host: str | None = None
    port: int | None = None  # None: 1883, or 8883 with TLS
    unix_socket: bool = False
    bind_address: str | None = None
    id: str | None = None
    id_prefix: str | None = None
    protocol: int = V311
    keepalive: int = 60
    clean_session: bool = True
    session_expiry: int = -1  # -1: not given
    username: str | None = None
    password: bytes | None = None
    will_topic: str | None = None
    will_payload: bytes | None = None
    will_qos: int = 0
    will_retain: bool = False
    # TLS
    cafile: str | None = None
    capath: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    keyform: str | None = None
    ciphers: str | None = None
    tls_version: str | None = None
    tls_alpn: str | None = None
    tls_engine: str | None = None
    tls_engine_kpass_sha1: str | None = None
    tls_use_os_certs: bool = False
    insecure: bool = False
    psk: str | None = None
    psk_identity: str | None = None
    proxy: str | None = None
    # behaviour
    qos: int = 0
    debug: bool = False
    quiet: bool = False
    max_inflight: int = 20
    tcp_nodelay: bool = False
    # pub
    topic: str | None = None
    pub_mode: str | None = None  # "message" | "file" | "stdin_file" | "stdin_line" | "null"
    message: bytes | None = None
    file_input: str | None = None
    retain: bool = False
    repeat_count: int = 1
    repeat_delay: float = 0.0
    # sub
    topics: list[str] = dataclasses.field(default_factory=list)
    unsub_topics: list[str] = dataclasses.field(default_factory=list)
    filter_outs: list[str] = dataclasses.field(default_factory=list)
    verbose: bool = False
    eol: bool = True
    format: bytes | None = None
    pretty: bool = False
    msg_count: int = 0
    timeout: int = 0
    no_retain: bool = False
    retained_only: bool = False
    remove_retained: bool = False
    retain_as_published: bool = False
    exit_after_sub: bool = False
    random_filter: int = 10000  # in 1/100 of a percent
    decode: bool = False  # linguamq's own: render our wire types

    @property
    def uses_tls(self) -> bool:
        return bool(self.cafile or self.capath or self.psk or self.tls_use_os_certs
                    or (self.port == 8883 and not self.unix_socket))

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return 8883 if (self.cafile or self.capath or self.psk) else 1883

    def client_id(self, pid: int) -> str:
        """mosquitto sends an empty id (the broker assigns one) unless -i or -I is given."""
        if self.id_prefix is not None:
            return f"{self.id_prefix}{pid}"
        return self.id or ""


# --- argparse hand-over ----------------------------------------------------------------


def take_raw_argv(parser: argparse.ArgumentParser) -> None:
    """Make a `linguamq` subparser pass every word after the subcommand to ``argv``.

    No word may look like an option to argparse: mosquitto's ``-h`` is the host, and
    mosquitto, not argparse, decides what is an error. With no prefix character left,
    every word is positional and lands, in order, in ``args.argv``.
    """
    parser.prefix_chars = "\0"  # NUL never occurs in argv
    parser.add_argument("argv", nargs=argparse.REMAINDER)


# --- C library behaviours the flags rely on --------------------------------------------


def atoi(text: str) -> int:
    """C ``atoi``: leading blanks, a sign, digits; stops at the first other character."""
    match = re.match(r"[ \t\n\v\f\r]*([+-]?\d+)", text)
    if not match:
        return 0
    value = max(min(int(match.group(1)), 2**63 - 1), -(2**63))  # strtol saturates
    return (value + 2**31) % 2**32 - 2**31  # ... and the int conversion wraps


def atof(text: str) -> float:
    """C ``atof`` for the decimal forms (leading blanks, longest numeric prefix)."""
    match = re.match(r"[ \t\n\v\f\r]*([+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?"
                     r"|inf(?:inity)?|nan))", text, re.IGNORECASE)
    return float(match.group(1)) if match else 0.0


def strtol_all(text: str) -> int | None:
    """C ``strtol(text, &end, 0)`` that must consume the whole text; None otherwise."""
    match = re.fullmatch(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9]\d*)", text)
    if not match:
        return None
    sign, digits = match.groups()
    value = int(digits, 16 if digits[:2].lower() == "0x" else 8 if digits.startswith("0") else 10)
    value = -value if sign == "-" else value
    return max(min(value, 2**63 - 1), -(2**63))


def valid_utf8(raw: bytes) -> bool:
    """``mosquitto_validate_utf8``: UTF-8 without NUL, control characters or non-characters."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    for char in text:
        code = ord(char)
        if code <= 0x1F or 0x7F <= code <= 0x9F or 0xFDD0 <= code <= 0xFDEF or (code & 0xFFFF) >= 0xFFFE:
            return False
    return True


def pub_topic_ok(topic: str) -> bool:
    """``mosquitto_pub_topic_check``: no wildcard, at most 65535 bytes."""
    return "+" not in topic and "#" not in topic and len(topic.encode()) <= 65535


def sub_topic_ok(topic: str) -> bool:
    """``mosquitto_sub_topic_check``: ``+`` a whole level, ``#`` the whole last level."""
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "+" in level and level != "+":
            return False
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
    return len(topic.encode()) <= 65535


def arg_bytes(text: str) -> bytes:
    """The bytes the user typed (argv is decoded with surrogateescape)."""
    return os.fsencode(text)


# --- the -F format check ---------------------------------------------------------------

_FORMAT_SPECIFIERS = set("%ACDEFIlmPpqRSrtjJUxX")
_ESCAPES = set("\\0aenrtv")


def check_format(fmt: bytes) -> None:
    """mosquitto's ``check_format``: reject a -F string it would reject, same words."""
    incomplete = ArgsError("Error: Incomplete format specifier.\n")
    n, i = len(fmt), 0
    while i < n:
        char = chr(fmt[i])
        if char == "%":
            if i == n - 1:
                raise incomplete
            if chr(fmt[i + 1]) in "0-":
                i += 1
                if i == n - 1:
                    raise incomplete
            while _digit(fmt[i + 1]):
                i += 1
                if i == n - 1:
                    raise incomplete
            if chr(fmt[i + 1]) == ".":
                i += 1
                if i == n - 1:
                    raise incomplete
                while _digit(fmt[i + 1]):
                    i += 1
                    if i == n - 1:
                        raise incomplete
            if chr(fmt[i + 1]) not in _FORMAT_SPECIFIERS:
                raise ArgsError(f"Error: Invalid format specifier '{_c(fmt[i + 1])}'.\n")
            i += 1
        elif char == "@":
            if i == n - 1:
                raise incomplete
            i += 1
        elif char == "\\":
            if i == n - 1:
                raise ArgsError("Error: Incomplete escape specifier.\n")
            if chr(fmt[i + 1]) not in _ESCAPES:
                raise ArgsError(f"Error: Invalid escape specifier '{_c(fmt[i + 1])}'.\n")
            i += 1
        i += 1


def _digit(byte: int) -> bool:
    return 0x30 <= byte <= 0x39


def _c(byte: int) -> str:
    return os.fsdecode(bytes([byte]))


# --- the option table ------------------------------------------------------------------

Take = Callable[[], str]
Handler = Callable[[ClientConfig, Take], None]
_OPTIONS: dict[str, tuple[frozenset[str], str | None, Handler]] = {}
BOTH, PUB, SUB = frozenset({"pub", "sub"}), frozenset({"pub"}), frozenset({"sub"})


def _option(*names: str, modes: frozenset[str] = BOTH, missing: str | None = None) -> Callable[[Handler], Handler]:
    """Register a handler; ``missing`` is the complaint when its argument is absent."""
    def register(handler: Handler) -> Handler:
        for name in names:
            _OPTIONS[name] = (modes, missing, handler)
        return handler
    return register


def _missing(what: str) -> str:
    return f"Error: {what}.\n\n"


def _store(field: str) -> Handler:
    def handler(cfg: ClientConfig, take: Take) -> None:
        setattr(cfg, field, take())
    return handler


def _set(field: str, value: bool) -> Handler:
    def handler(cfg: ClientConfig, take: Take) -> None:
        setattr(cfg, field, value)
    return handler


# Options that store their argument as given: (names, modes, field, complaint when it is missing).
_STORED = (
    (("-A",), BOTH, "bind_address", "-A argument given but no address specified"),
    (("--cafile",), BOTH, "cafile", "--cafile argument given but no file specified"),
    (("--capath",), BOTH, "capath", "--capath argument given but no directory specified"),
    (("--cert",), BOTH, "certfile", "--cert argument given but no file specified"),
    (("--ciphers",), BOTH, "ciphers", "--ciphers argument given but no ciphers specified"),
    (("-h", "--host"), BOTH, "host", "-h argument given but no host specified"),
    (("--key",), BOTH, "keyfile", "--key argument given but no file specified"),
    (("--keyform",), BOTH, "keyform", "--keyform argument given but no keyform specified"),
    (("--psk",), BOTH, "psk", "--psk argument given but no key specified"),
    (("--psk-identity",), BOTH, "psk_identity", "--psk-identity argument given but no identity specified"),
    (("--tls-alpn",), BOTH, "tls_alpn", "--tls-alpn argument given but no protocol specified"),
    (("--tls-engine",), BOTH, "tls_engine", "--tls-engine argument given but no engine_id specified"),
    (("--tls-engine-kpass-sha1",), BOTH, "tls_engine_kpass_sha1",
     "--tls-engine-kpass-sha1 argument given but no kpass sha1 specified"),
    (("--tls-version",), BOTH, "tls_version", "--tls-version argument given but no version specified"),
    (("-u", "--username"), BOTH, "username", "-u argument given but no username specified"),
)
# Options without an argument: (names, modes, field, value).
_SWITCHES = (
    (("-c", "--disable-clean-session"), BOTH, "clean_session", False),
    (("-d", "--debug"), BOTH, "debug", True),
    (("--insecure",), BOTH, "insecure", True),
    (("--nodelay",), BOTH, "tcp_nodelay", True),
    (("--quiet",), BOTH, "quiet", True),
    (("--tls-use-os-certs",), BOTH, "tls_use_os_certs", True),
    (("--will-retain",), BOTH, "will_retain", True),
    (("-r", "--retain"), PUB, "retain", True),
    (("-E",), SUB, "exit_after_sub", True),
    (("-N",), SUB, "eol", False),
    (("--pretty",), SUB, "pretty", True),
    (("-R",), SUB, "no_retain", True),
    (("--remove-retained",), SUB, "remove_retained", True),
    (("--retain-as-published",), SUB, "retain_as_published", True),
    (("--retained-only",), SUB, "retained_only", True),
    (("-v", "--verbose"), SUB, "verbose", True),
    (("--decode",), SUB, "decode", True),  # linguamq's own: render our wire types
)
for _names, _modes, _field, _what in _STORED:
    _option(*_names, modes=_modes, missing=_missing(_what))(_store(_field))
for _names, _modes, _field, _value in _SWITCHES:
    _option(*_names, modes=_modes)(_set(_field, _value))


@_option("-C", modes=SUB, missing=_missing("-C argument given but no count specified"))
def _count(cfg: ClientConfig, take: Take) -> None:
    cfg.msg_count = atoi(take())
    if cfg.msg_count < 1:
        raise ArgsError(f'Error: Invalid message count "{cfg.msg_count}".\n\n')


@_option("-D", "--property")
def _property(cfg: ClientConfig, take: Take) -> None:
    raise ArgsError("Error: -D/--property (MQTT v5 properties) is not supported by linguamq.\n\n")


def _message_mode(cfg: ClientConfig, mode: str) -> None:
    if cfg.pub_mode is not None:
        raise ArgsError(_missing("Only one type of message can be sent at once"))
    cfg.pub_mode = mode


@_option("-f", "--file", modes=PUB)
def _file(cfg: ClientConfig, take: Take) -> None:
    if cfg.pub_mode is not None:
        _message_mode(cfg, "file")
    cfg.file_input = _need(take, "-f argument given but no file specified")
    cfg.pub_mode = "file"


@_option("-F", modes=SUB, missing=_missing("-F argument given but no format specified"))
def _format(cfg: ClientConfig, take: Take) -> None:
    cfg.format = arg_bytes(take())
    check_format(cfg.format)


@_option("--help")
def _help(cfg: ClientConfig, take: Take) -> None:
    raise HelpRequested


@_option("-i", "--id")
def _id(cfg: ClientConfig, take: Take) -> None:
    if cfg.id_prefix is not None:
        raise ArgsError(_missing("-i and -I argument cannot be used together"))
    cfg.id = _need(take, "-i argument given but no id specified")


@_option("-I", "--id-prefix")
def _id_prefix(cfg: ClientConfig, take: Take) -> None:
    if cfg.id is not None:
        raise ArgsError(_missing("-i and -I argument cannot be used together"))
    cfg.id_prefix = _need(take, "-I argument given but no id prefix specified")


@_option("-k", "--keepalive", missing=_missing("-k argument given but no keepalive specified"))
def _keepalive(cfg: ClientConfig, take: Take) -> None:
    cfg.keepalive = atoi(take())
    if not 5 <= cfg.keepalive <= 65535:
        raise ArgsError(_missing("Invalid keepalive given, it must be between 5 and 65535 inclusive"))


@_option("-L", "--url", missing=_missing("-L argument given but no URL specified"))
def _url(cfg: ClientConfig, take: Take) -> None:
    url = take()
    if url[:7].lower() == "mqtt://":
        url, cfg.port = url[7:], 1883
    elif url[:8].lower() == "mqtts://":
        url, cfg.port, cfg.tls_use_os_certs = url[8:], 8883, True
    else:
        raise ArgsError(_missing("unsupported URL scheme"))
    if "/" not in url:
        raise ArgsError("Error: Invalid URL for -L argument specified - topic missing.\n")
    url, topic = url.split("/", 1)
    _add_topic(cfg, topic, "-L topic")
    if "@" in url:
        userinfo, url = url.split("@", 1)
        if ":" in userinfo:
            userinfo, password = userinfo.split(":", 1)
            cfg.password = arg_bytes(password)
        cfg.username = userinfo
    if ":" in url:
        url, port = url.split(":", 1)
        cfg.port = atoi(port)
    cfg.host = url


@_option("-l", "--stdin-line", modes=PUB)
def _stdin_line(cfg: ClientConfig, take: Take) -> None:
    _message_mode(cfg, "stdin_line")


@_option("-m", "--message", modes=PUB)
def _message(cfg: ClientConfig, take: Take) -> None:
    if cfg.pub_mode is not None:
        _message_mode(cfg, "message")
    cfg.message = arg_bytes(_need(take, "-m argument given but no message specified"))
    if len(cfg.message) > MQTT_MAX_PAYLOAD:
        raise ArgsError(_missing(f"Message length must be less than {MQTT_MAX_PAYLOAD} bytes"))
    cfg.pub_mode = "message"


@_option("-M", missing=_missing("-M argument given but max_inflight not specified"))
def _max_inflight(cfg: ClientConfig, take: Take) -> None:
    cfg.max_inflight = atoi(take())
    if cfg.max_inflight < 1:
        raise ArgsError(_missing("Maximum inflight messages must be greater than 0"))


@_option("-n", "--null-message", modes=PUB)
def _null(cfg: ClientConfig, take: Take) -> None:
    _message_mode(cfg, "null")


@_option("-p", "--port", missing=_missing("-p argument given but no port specified"))
def _port(cfg: ClientConfig, take: Take) -> None:
    cfg.port = atoi(take())
    if not 0 <= cfg.port <= 65535:
        raise ArgsError(f"Error: Invalid port given: {cfg.port}\n")


@_option("-P", "--pw", missing=_missing("-P argument given but no password specified"))
def _password(cfg: ClientConfig, take: Take) -> None:
    cfg.password = arg_bytes(take())


@_option("--proxy", missing=_missing("--proxy argument given but no proxy url specified"))
def _proxy(cfg: ClientConfig, take: Take) -> None:
    url = take()
    if not url.startswith("socks5h://"):
        raise ArgsError(f"Error: Unsupported proxy protocol: {url}\n")
    cfg.proxy = url


@_option("-q", "--qos", missing=_missing("-q argument given but no QoS specified"))
def _qos(cfg: ClientConfig, take: Take) -> None:
    cfg.qos = atoi(take())
    if not 0 <= cfg.qos <= 2:
        raise ArgsError(f"Error: Invalid QoS given: {cfg.qos}\n")


@_option("--random-filter", modes=SUB, missing=_missing("--random-filter argument given but no chance specified"))
def _random_filter(cfg: ClientConfig, take: Take) -> None:
    chance = 10.0 * atof(take())
    cfg.random_filter = int(chance) if math.isfinite(chance) and abs(chance) < 2**31 else -1
    if not 1 <= cfg.random_filter <= 10000:
        raise ArgsError("Error: --random-filter chance must be between 0.1-100.0\n\n")


@_option("--repeat", modes=PUB, missing=_missing("--repeat argument given but no count specified"))
def _repeat(cfg: ClientConfig, take: Take) -> None:
    cfg.repeat_count = atoi(take())
    if cfg.repeat_count < 1:
        raise ArgsError(_missing("--repeat argument must be >0"))


@_option("--repeat-delay", modes=PUB, missing=_missing("--repeat-delay argument given but no time specified"))
def _repeat_delay(cfg: ClientConfig, take: Take) -> None:
    cfg.repeat_delay = atof(take())
    if cfg.repeat_delay < 0.0:
        raise ArgsError(_missing("--repeat-delay argument must be >=0.0"))


@_option("-s", "--stdin-file", modes=PUB)
def _stdin_file(cfg: ClientConfig, take: Take) -> None:
    _message_mode(cfg, "stdin_file")


@_option("-t", "--topic", missing=_missing("-t argument given but no topic specified"))
def _topic(cfg: ClientConfig, take: Take) -> None:
    _add_topic(cfg, take(), "-t")


@_option("-T", "--filter-out", modes=SUB, missing=_missing("-T argument given but no topic filter specified"))
def _filter_out(cfg: ClientConfig, take: Take) -> None:
    cfg.filter_outs.append(_sub_filter(take(), "-T", "filter"))


@_option("-U", "--unsubscribe", modes=SUB, missing=_missing("-U argument given but no unsubscribe topic specified"))
def _unsubscribe(cfg: ClientConfig, take: Take) -> None:
    cfg.unsub_topics.append(_sub_filter(take(), "-U", "unsubscribe"))


@_option("--unix", missing=_missing("--unix argument given but no socket path specified"))
def _unix(cfg: ClientConfig, take: Take) -> None:
    cfg.host, cfg.port, cfg.unix_socket = take(), 0, True


_VERSIONS = {"mqttv31": V31, "31": V31, "mqttv311": V311, "311": V311, "mqttv5": V5, "5": V5}


@_option("-V", "--protocol-version", missing=_missing("--protocol-version argument given but no version specified"))
def _protocol(cfg: ClientConfig, take: Take) -> None:
    version = _VERSIONS.get(take())
    if version is None:
        raise ArgsError(_missing("Invalid protocol version argument given"))
    cfg.protocol = version


@_option("--version")
def _version(cfg: ClientConfig, take: Take) -> None:
    raise VersionRequested


@_option("-W", modes=SUB, missing=_missing("-W argument given but no timeout specified"))
def _timeout(cfg: ClientConfig, take: Take) -> None:
    seconds = atoi(take())
    if seconds < 1:
        raise ArgsError(_missing(f'Invalid timeout "{seconds}"'))
    cfg.timeout = seconds


@_option("--will-payload", missing=_missing("--will-payload argument given but no will payload specified"))
def _will_payload(cfg: ClientConfig, take: Take) -> None:
    cfg.will_payload = arg_bytes(take())


@_option("--will-qos", missing=_missing("--will-qos argument given but no will QoS specified"))
def _will_qos(cfg: ClientConfig, take: Take) -> None:
    cfg.will_qos = atoi(take())
    if not 0 <= cfg.will_qos <= 2:
        raise ArgsError(_missing(f"Invalid will QoS {cfg.will_qos}"))


@_option("--will-topic", missing=_missing("--will-topic argument given but no will topic specified"))
def _will_topic(cfg: ClientConfig, take: Take) -> None:
    topic = take()
    if not valid_utf8(arg_bytes(topic)):
        raise ArgsError(_missing("Malformed UTF-8 in --will-topic argument"))
    if not pub_topic_ok(topic):
        raise ArgsError(f"Error: Invalid will topic '{topic}', does it contain '+' or '#'?\n")
    cfg.will_topic = topic


@_option("-x", missing=_missing("-x argument given but no session expiry interval specified"))
def _session_expiry(cfg: ClientConfig, take: Take) -> None:
    text = take()
    if text == "∞":
        cfg.session_expiry = UINT32_MAX
        return
    value = strtol_all(text)
    if value is None:
        raise ArgsError(_missing("session-expiry-interval not a number"))
    if not -1 <= value <= UINT32_MAX:
        raise ArgsError(_missing("session-expiry-interval out of range"))
    cfg.session_expiry = UINT32_MAX if value == -1 else value


def _need(take: Take, what: str) -> str:
    try:
        return take()
    except _NoValue:
        raise ArgsError(_missing(what)) from None


def _add_topic(cfg: ClientConfig, topic: str, source: str) -> None:
    if not valid_utf8(arg_bytes(topic)):
        raise ArgsError(_missing(f"Malformed UTF-8 in {source} argument"))
    if cfg.mode == "pub":
        if not pub_topic_ok(topic):
            raise ArgsError(f"Error: Invalid publish topic '{topic}', does it contain '+' or '#'?\n")
        cfg.topic = topic
    else:
        if not sub_topic_ok(topic):
            raise ArgsError(f"Error: Invalid subscription topic '{topic}', are all '+' and '#' wildcards correct?\n")
        cfg.topics.append(topic)


def _sub_filter(topic: str, flag: str, what: str) -> str:
    if not valid_utf8(arg_bytes(topic)):
        raise ArgsError(_missing(f"Malformed UTF-8 in {flag} argument"))
    if not sub_topic_ok(topic):
        raise ArgsError(f"Error: Invalid {what} topic '{topic}', are all '+' and '#' wildcards correct?\n")
    return topic


# --- parsing ---------------------------------------------------------------------------


class _NoValue(Exception):
    """An option's argument is missing (the handler words the complaint)."""


def _apply(cfg: ClientConfig, words: Sequence[str]) -> None:
    """``client_config_line_proc``: apply the words left to right, stop at the first error."""
    it: Iterator[str] = iter(words)
    for word in it:
        entry = _OPTIONS.get(word)
        if entry is None or cfg.mode not in entry[0]:
            raise ArgsError(f"Error: Unknown option '{word}'.\n")
        _modes, missing, handler = entry

        def take(it: Iterator[str] = it, missing: str | None = missing) -> str:
            try:
                return next(it)
            except StopIteration:
                if missing is None:
                    raise _NoValue from None
                raise ArgsError(missing) from None

        handler(cfg, take)


def _check_whole(cfg: ClientConfig) -> None:
    """The checks ``client_config_load`` makes once every option is read."""
    if cfg.will_payload is not None and cfg.will_topic is None:
        raise ArgsError("Error: Will payload given, but no will topic given.\n")
    if cfg.will_retain and cfg.will_topic is None:
        raise ArgsError("Error: Will retain given, but no will topic given.\n")
    if (cfg.certfile is None) != (cfg.keyfile is None):
        raise ArgsError("Error: Both certfile and keyfile must be provided if one of them is set.\n")
    if cfg.keyform is not None and cfg.keyfile is None:
        raise ArgsError("Error: If keyform is set, keyfile must be also specified.\n")
    if cfg.tls_engine_kpass_sha1 is not None and (cfg.keyform is None or cfg.tls_engine is None):
        raise ArgsError("Error: when using tls-engine-kpass-sha1, both tls-engine and keyform must also be provided.\n")
    if (cfg.cafile or cfg.capath) and cfg.psk:
        raise ArgsError("Error: Only one of --psk or --cafile/--capath may be used at once.\n")
    if cfg.psk and not cfg.psk_identity:
        raise ArgsError("Error: --psk-identity required if --psk used.\n")
    if cfg.protocol == V5:
        if not cfg.clean_session and cfg.session_expiry == -1:
            cfg.session_expiry = UINT32_MAX
        if cfg.session_expiry == UINT32_MAX and (cfg.id_prefix is not None or cfg.id is None):
            raise ArgsError("Error: You must provide a client id if you are using an infinite session expiry interval.\n")
    elif not cfg.clean_session and (cfg.id_prefix is not None or cfg.id is None):
        raise ArgsError("Error: You must provide a client id if you are using the -c option.\n")
    if cfg.mode == "sub" and not cfg.topics and not cfg.unsub_topics:
        raise ArgsError("Error: You must specify a topic to subscribe to.\n")
    if cfg.host is None:
        cfg.host = "localhost"


def config_file(mode: Mode, env: Mapping[str, str]) -> Path | None:
    """Where mosquitto_{pub,sub} read their default options."""
    if env.get("XDG_CONFIG_HOME"):
        return Path(env["XDG_CONFIG_HOME"]) / f"mosquitto_{mode}"
    if env.get("HOME"):
        return Path(env["HOME"]) / ".config" / f"mosquitto_{mode}"
    return None


def config_file_words(text: bytes) -> Iterator[list[str]]:
    """Each line: the option, then (if any) everything after the first run of spaces."""
    for raw in text.split(b"\n"):
        line = raw.rstrip(b"\r\n")
        if line.startswith(b"#"):
            continue
        first, _, rest = line.lstrip(b" ").partition(b" ")  # strtok(NULL, "") keeps the rest verbatim
        if first:
            yield [os.fsdecode(first)] + ([os.fsdecode(rest)] if rest else [])


def parse(argv: Sequence[str], mode: Mode, *, defaults: bytes | None = None) -> ClientConfig:
    """argv (after the subcommand) -> ClientConfig; ArgsError, HelpRequested or
    VersionRequested when mosquitto would print an error, its usage or its version.

    ``defaults`` is the content of mosquitto's options file, if there is one."""
    cfg = ClientConfig(mode=mode)
    if defaults is not None:
        for words in config_file_words(defaults):
            _apply(cfg, words)
    _apply(cfg, argv)
    _check_whole(cfg)
    return cfg


def version_line(mode: Mode) -> str:
    """What ``--version`` prints."""
    try:
        ours = importlib.metadata.version("linguamq")
    except importlib.metadata.PackageNotFoundError:
        ours = "(not installed)"
    return f"linguamq {mode} version {ours} (the flags of mosquitto_{mode} {MOSQUITTO_VERSION}).\n"


def load(argv: Sequence[str], mode: Mode, env: Mapping[str, str]) -> ClientConfig:
    """``parse`` with mosquitto's options file, found through ``env``."""
    path = config_file(mode, env)
    try:
        defaults = path.read_bytes() if path is not None else None
    except OSError:
        defaults = None
    return parse(argv, mode, defaults=defaults)
