"""The connection of `linguamq pub` / `linguamq sub`: a paho client set up from a
``ClientConfig`` the way mosquitto 2.0.11's clients set up libmosquitto, with their
error messages and exit codes, and their ``-d`` log lines.

Why paho directly and not ``linguamq.topics.client.MqttClient``: these commands are
generic MQTT tools (any topic, any payload, QoS, retain, will, v3.1/v3.1.1/v5, TLS
options), with mosquitto's exact semantics; the typed client is for our own topics.
"""

from __future__ import annotations

import io
import os
import re
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any, BinaryIO

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from linguamq.tools.mosquitto.args import V5, V31, ClientConfig, arg_bytes, valid_utf8

# libmosquitto's mosquitto_strerror(), by error number (the exit codes of the clients).
STRERROR = {
    0: "No error.", 1: "Out of memory.",
    2: "A network protocol error occurred when communicating with the broker.",
    3: "Invalid function arguments provided.", 4: "The client is not currently connected.",
    5: "The connection was refused.", 6: "Message not found (internal error).",
    7: "The connection was lost.", 8: "A TLS error occurred.", 9: "Payload too large.",
    10: "This feature is not supported.", 11: "Authorisation failed.", 12: "Access denied by ACL.",
    13: "Unknown error.", 14: "Error defined by errno.", 15: "Lookup error.", 16: "Proxy error.",
    27: "Timed out.",
}
ERR_CONN_REFUSED, ERR_CONN_LOST, ERR_TLS, ERR_TIMEOUT = 5, 7, 8, 27

# mosquitto_connack_string() for MQTT v3.x CONNACK codes.
CONNACK_V3 = {
    0: "Connection Accepted.", 1: "Connection Refused: unacceptable protocol version.",
    2: "Connection Refused: identifier rejected.", 3: "Connection Refused: broker unavailable.",
    4: "Connection Refused: bad user name or password.", 5: "Connection Refused: not authorised.",
}
# paho reports a v3 CONNACK code as the v5 reason code of the same meaning: undo that.
_V3_FROM_V5_NAME = {"Unsupported protocol version": 1, "Client identifier not valid": 2,
                    "Server unavailable": 3, "Bad user name or password": 4, "Not authorized": 5}
# mosquitto_reason_string() for MQTT v5 reason codes.
REASON_V5 = {
    0: "Success", 1: "Granted QoS 1", 2: "Granted QoS 2", 4: "Disconnect with Will Message",
    16: "No matching subscribers", 17: "No subscription existed", 24: "Continue authentication",
    25: "Re-authenticate", 128: "Unspecified error", 129: "Malformed Packet", 130: "Protocol Error",
    131: "Implementation specific error", 132: "Unsupported Protocol Version",
    133: "Client Identifier not valid", 134: "Bad User Name or Password", 135: "Not authorized",
    136: "Server unavailable", 137: "Server busy", 138: "Banned", 139: "Server shutting down",
    140: "Bad authentication method", 141: "Keep Alive timeout", 142: "Session taken over",
    143: "Topic Filter invalid", 144: "Topic Name invalid", 145: "Packet Identifier in use",
    146: "Packet Identifier not found", 147: "Receive Maximum exceeded", 148: "Topic Alias invalid",
    149: "Packet too large", 150: "Message rate too high", 151: "Quota exceeded",
    152: "Administrative action", 153: "Payload format invalid", 154: "Retain not supported",
    155: "QoS not supported", 156: "Use another server", 157: "Server moved",
    158: "Shared Subscriptions not supported", 159: "Connection rate exceeded",
    160: "Maximum connect time", 161: "Subscription identifiers not supported",
    162: "Wildcard Subscriptions not supported",
}
_PROTOCOLS = {V31: paho.MQTTv31, 4: paho.MQTTv311, V5: paho.MQTTv5}
_TLS_VERSIONS = {"tlsv1.3": ssl.TLSVersion.TLSv1_3, "tlsv1.2": ssl.TLSVersion.TLSv1_2,
                 "tlsv1.1": ssl.TLSVersion.TLSv1_1}


class ClientError(Exception):
    """Setting up or connecting failed: ``text`` goes to stderr (unless ``--quiet`` and
    ``quiet_ok``), the command exits with ``rc``."""

    def __init__(self, text: str, rc: int = 1, *, quiet_ok: bool = True) -> None:
        super().__init__(text)
        self.text, self.rc, self.quiet_ok = text, rc, quiet_ok


# --- building the client ---------------------------------------------------------------


def build_client(cfg: ClientConfig, *, client_id: str, reconnect: bool, manual_ack: bool = False) -> paho.Client:
    """A paho client with everything of ``client_opts_set``; ClientError as mosquitto words it.

    ``manual_ack``: the caller acknowledges each incoming message (libmosquitto sends the
    PUBACK/PUBCOMP before it calls back, paho after; -d shows the difference)."""
    _reject_unsupported(cfg)
    if cfg.id == "" and cfg.id_prefix is None:  # mosquitto_new refuses it
        raise ClientError("Error: Invalid id and/or clean_session.\n" if cfg.mode == "sub" else "Error: Invalid id.\n")
    if not valid_utf8(client_id.encode("utf-8", "surrogateescape")):
        raise ClientError("")  # mosquitto_new fails with EPROTO: it says nothing
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                         clean_session=None if cfg.protocol == V5 else cfg.clean_session,
                         protocol=_PROTOCOLS[cfg.protocol], transport="unix" if _is_unix(cfg) else "tcp",
                         reconnect_on_failure=reconnect, manual_ack=manual_ack)
    if cfg.will_topic is not None:
        client.will_set(cfg.will_topic, cfg.will_payload or b"", cfg.will_qos, cfg.will_retain)
    if cfg.username is not None or cfg.password is not None:
        if (cfg.username is None and cfg.protocol != V5) or (
                cfg.username is not None and not valid_utf8(arg_bytes(cfg.username))):
            raise ClientError("Error: Problem setting username and/or password.\n")
        # paho annotates str but keeps bytes as they are: a mosquitto password need not be UTF-8
        client.username_pw_set(cfg.username, cfg.password)  # type: ignore[arg-type]
    context = tls_context(cfg)
    if context is not None:
        client.tls_set_context(context)
    client.max_inflight_messages_set(cfg.max_inflight)
    client.reconnect_delay_set(1, 1)  # libmosquitto retries every second
    if cfg.tcp_nodelay:
        client.on_socket_open = _no_delay
    return client


def _reject_unsupported(cfg: ClientConfig) -> None:
    """Flags mosquitto accepts but Python's ssl / our dependencies cannot honour."""
    if cfg.keyform is not None and cfg.keyform not in ("pem", "engine"):
        raise ClientError("Error: Problem setting key form, it must be one of 'pem' or 'engine'.\n")
    if cfg.tls_engine is not None or cfg.keyform == "engine":
        raise ClientError(f"Error: Problem setting TLS engine, is {cfg.tls_engine} a valid engine? "
                          "(TLS engines are not supported by linguamq)\n")
    if cfg.psk is not None:
        raise ClientError("Error: Problem setting TLS-PSK options (TLS-PSK is not supported by linguamq).\n")
    if cfg.proxy is not None:
        raise ClientError("Error: SOCKS proxies (--proxy) are not supported by linguamq.\n")


def tls_context(cfg: ClientConfig) -> ssl.SSLContext | None:
    """``client_tls_opts_set``: None without TLS; ClientError for what mosquitto rejects."""
    if not cfg.uses_tls:
        return None
    for path in (cfg.cafile, cfg.certfile, cfg.keyfile):
        if path is not None and not os.path.isfile(path):
            raise ClientError("Error: Problem setting TLS options: File not found.\n")
    if cfg.tls_version is not None and cfg.tls_version.lower() not in _TLS_VERSIONS:
        raise ClientError("Error: Problem setting TLS options, check the options are valid.\n")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = _TLS_VERSIONS[(cfg.tls_version or "tlsv1.2").lower()]
    try:
        if cfg.cafile or cfg.capath:
            context.load_verify_locations(cafile=cfg.cafile, capath=cfg.capath)
        if cfg.tls_use_os_certs or not (cfg.cafile or cfg.capath):
            context.load_default_certs()
        if cfg.certfile is not None:
            context.load_cert_chain(cfg.certfile, cfg.keyfile)
        if cfg.ciphers is not None:
            context.set_ciphers(cfg.ciphers)
        if cfg.tls_alpn is not None:
            context.set_alpn_protocols([cfg.tls_alpn])
    except (ssl.SSLError, OSError, ValueError):  # libmosquitto finds out when it connects
        raise ClientError(f"Unable to connect ({STRERROR[ERR_TLS]}).\n") from None
    context.check_hostname = not cfg.insecure  # --insecure: the chain is still verified
    return context


def _is_unix(cfg: ClientConfig) -> bool:
    return cfg.unix_socket or cfg.effective_port == 0


def _no_delay(client: paho.Client, userdata: Any, sock: Any) -> None:
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# --- connecting ------------------------------------------------------------------------


def connect(client: paho.Client, cfg: ClientConfig) -> None:
    """``client_connect``: open the connection and send CONNECT (blocking, bounded by
    paho's connect timeout); ClientError with mosquitto's words and exit code 1."""
    properties = None
    if cfg.protocol == V5:
        properties = Properties(PacketTypes.CONNECT)
        if cfg.session_expiry > 0:
            properties.SessionExpiryInterval = cfg.session_expiry
        if 0 < cfg.msg_count < 20:  # else the broker may send more than -C before we leave
            properties.ReceiveMaximum = cfg.msg_count
    extra: dict[str, Any] = {"clean_start": cfg.clean_session, "properties": properties} if cfg.protocol == V5 else {}
    unix = _is_unix(cfg)
    try:
        client.connect(cfg.host or "localhost", 1 if unix else cfg.effective_port, cfg.keepalive,
                       bind_address="" if unix else (cfg.bind_address or ""), **extra)
    except socket.gaierror:
        raise ClientError(f"Unable to connect ({STRERROR[15]}).\n") from None
    except ssl.SSLError:
        raise ClientError(f"Unable to connect ({STRERROR[8]}).\n") from None
    except TimeoutError:
        raise ClientError(f"Error: {os.strerror(110)}\n") from None
    except OSError as exc:
        raise ClientError(f"Error: {exc.strerror or exc}\n") from None
    except ValueError:
        raise ClientError(f"Unable to connect ({STRERROR[3]}).\n") from None


def connack_code(reason: Any, protocol: int) -> int:
    """The CONNACK result as mosquitto numbers it (v3.x: 0-5; v5: the reason code)."""
    value = int(getattr(reason, "value", reason))
    if protocol == V5 or value == 0:
        return value
    return _V3_FROM_V5_NAME.get(str(reason), value if value < 6 else 5)


def connack_error(code: int, protocol: int) -> str:
    """my_connect_callback's complaint about a refused connection."""
    if protocol == V5:
        text = REASON_V5.get(code, "Unknown reason")
        if code == 132:
            return f"Connection error: {text}. Try connecting to an MQTT v5 broker, or use MQTT v3.x mode.\n"
        return f"Connection error: {text}\n"
    return f"Connection error: {CONNACK_V3.get(code, 'Connection Refused: unknown reason.')}\n"


# --- -d: libmosquitto's log lines ------------------------------------------------------

_REWRITES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"Sending CONNECT\b.*", "sending CONNECT"),
    (r"Received PUBLISH \((d\d, q\d, r\d, m\d+)\), '(.*)', (?:properties=.*, )?\.\.\.  \((\d+) bytes\)",
     r"received PUBLISH (\1, '\2', ... (\3 bytes))"),
    (r"Sending PUBLISH \((d\d, q\d, r\d, m\d+)\), '(.*)', (?:properties=.*, )?\.\.\. \((\d+) bytes\)",
     r"sending PUBLISH (\1, '\2', ... (\3 bytes))"),
    (r"Sending PUBLISH \((d\d, q\d, r\d, m\d+)\), '(.*?)'(?:, properties=.*)? \(NULL payload\)",
     r"sending PUBLISH (\1, '\2', ... (0 bytes))"),
    (r"Sending PUBACK \(Mid: (\d+)\)", r"sending PUBACK (m\1, rc0)"),
    (r"Sending PUBREC \(Mid: (\d+)\)", r"sending PUBREC (m\1, rc0)"),
    (r"Sending PUBREL \(Mid: (\d+)\)", r"sending PUBREL (m\1)"),
    (r"Sending PUBCOMP \(Mid: (\d+)\)", r"sending PUBCOMP (m\1)"),
    (r"Received (PUBACK|PUBCOMP) \(Mid: (\d+)\)", r"received \1 (Mid: \2, RC:0)"),
    (r"Received (PUBREC|PUBREL) \(Mid: (\d+)\)", r"received \1 (Mid: \2)"),
    (r"Received (SUBACK|UNSUBACK)\b.*", r"received \1"),
    (r"Sending (DISCONNECT|PINGREQ|PINGRESP)\b.*", r"sending \1"),
    (r"Received (PINGREQ|PINGRESP)\b.*", r"received \1"),
))


_BYTES_TOPIC = re.compile(r"'b(['\"])(.*?)\1'")  # paho logs an outgoing topic as repr(bytes)


def debug_line(paho_line: str, client_id: str) -> str | None:
    """A paho log line as libmosquitto writes it (``Client ID sending ...``), or None
    for lines libmosquitto has no counterpart of (CONNACK, SUBSCRIBE and UNSUBSCRIBE
    lines are written by the commands themselves, with the details mosquitto shows)."""
    line = _BYTES_TOPIC.sub(lambda m: f"'{m.group(2)}'", paho_line, count=1)
    for pattern, replacement in _REWRITES:
        match = pattern.fullmatch(line)
        if match:
            return f"Client {client_id or '(null)'} {match.expand(replacement)}"
    return None


def log_prefix(client_id: str) -> Callable[[str], str]:
    return lambda what: f"Client {client_id or '(null)'} {what}"


# --- stdout / stderr -------------------------------------------------------------------


class Output:
    """stdout and stderr of a command, shared by paho's thread and the main thread.

    stdout gets raw bytes, flushed after every write (mosquitto flushes after every
    message); a closed pipe (``sub ... | head -1``) is remembered, not raised. Complaints
    go to stderr as the bytes the user typed (argv's surrogate escapes undone), and are
    dropped with ``--quiet`` where mosquitto uses ``err_printf``.
    """

    def __init__(self, out: BinaryIO, err: BinaryIO, *, quiet: bool = False) -> None:
        self._out, self._err, self.quiet = out, err, quiet
        self._lock = threading.Lock()
        self.broken_pipe = False

    def write(self, data: bytes) -> bool:
        """False once stdout is a closed pipe."""
        with self._lock:
            if self.broken_pipe:
                return False
            try:
                self._out.write(data)
                self._out.flush()
            except BrokenPipeError:
                self.broken_pipe = True
                _silence(self._out)
                return False
            return True

    def error(self, text: str, *, quiet_ok: bool = True) -> None:
        if quiet_ok and self.quiet:
            return
        with self._lock:
            self._err.write(os.fsencode(text))
            self._err.flush()

    def client_error(self, exc: ClientError) -> int:
        self.error(exc.text, quiet_ok=exc.quiet_ok)
        return exc.rc


def _silence(stream: BinaryIO) -> None:
    """Point a broken stdout at /dev/null so that the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass
