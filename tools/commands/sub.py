"""`linguamq sub`: mosquitto_sub with the same flags, output and exit codes, plus
``--decode`` to read our own messages (``linguamq.tools.mosquitto.render``).

    linguamq sub -h hub.local -t lmq/home/# -v --decode

Composition root: the words after ``sub`` go to ``mosquitto_args``; the connection is
``mosquitto_conn``'s; what is printed is ``mosquitto_format``'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, BinaryIO

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from linguamq import topics
from linguamq.tools.mosquitto import args as mosquitto_args
from linguamq.tools.mosquitto import conn as mosquitto_conn
from linguamq.tools.mosquitto.args import V5, ArgsError, ClientConfig, HelpRequested, VersionRequested
from linguamq.tools.mosquitto.conn import ClientError, Output
from linguamq.tools.mosquitto.format import Clock, Received, print_message

STOP_GRACE_S = 10.0  # how long a DISCONNECT may take once we decided to stop
POLL_S = 0.05  # how often the main thread looks at the clock and at signals


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mosquitto_args.take_raw_argv(parser)


def run(args: argparse.Namespace) -> int:
    return main(args.argv, out=sys.stdout.buffer, err=sys.stderr.buffer, env=os.environ)


def main(argv: Sequence[str], *, out: BinaryIO, err: BinaryIO, env: Mapping[str, str]) -> int:
    """mosquitto_sub's ``main``: the exit code (0, 1, 27 on -W timeout, a CONNACK code...)."""
    output = Output(out, err)
    try:
        cfg = mosquitto_args.load(argv, "sub", env)
    except ArgsError as exc:
        output.error(exc.text + ("\nUse 'linguamq sub --help' to see usage.\n" if exc.hint else ""), quiet_ok=False)
        return 1
    except HelpRequested:
        output.write(USAGE.encode())
        return 1
    except VersionRequested:
        output.write(version().encode())
        return 1
    if cfg.no_retain and cfg.retained_only:
        output.error("\nError: Combining '-R' and '--retained-only' makes no sense.\n", quiet_ok=False)
        return 1
    output.quiet = cfg.quiet
    return Subscriber(cfg, output).run()


class Subscriber:
    """One mosquitto_sub session: connect, subscribe, print, stop when told to."""

    def __init__(self, cfg: ClientConfig, output: Output, *, clock: Callable[[], Clock] = Clock.now) -> None:
        self.cfg, self.output, self.clock = cfg, output, clock
        self.client_id = cfg.client_id(os.getpid())
        self.log = mosquitto_conn.log_prefix(self.client_id)
        self.done = threading.Event()  # set once the connection is closed after we stopped
        self.processing = True
        self.stopping = False
        self.connack_received = False
        self.connack_result = 0
        self.count = 0
        self.last_mid = 0
        self.signalled = False
        self.render = _renderer() if cfg.decode else None

    def run(self) -> int:
        try:
            client = mosquitto_conn.build_client(self.cfg, client_id=self.client_id, reconnect=True, manual_ack=True)
            self._wire(client)
            mosquitto_conn.connect(client, self.cfg)
        except ClientError as exc:
            return self.output.client_error(exc)
        with _signals(self._on_signal):
            client.loop_start()
            outcome = "done"
            try:
                outcome = self._wait()
            finally:
                if outcome == "done" or self.connack_received:  # else mosquitto_sub just exits
                    self._stop(client, with_will=outcome != "done")
                    self.done.wait(STOP_GRACE_S)
                client.loop_stop()
        return self._exit_code(outcome)

    def _wire(self, client: paho.Client) -> None:
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_disconnect = self._on_disconnect
        if self.cfg.debug:
            client.on_log = self._on_log

    def _wait(self) -> str:
        """Until stopped: "done", "timeout" (-W ran out) or "signal" (SIGINT/SIGTERM)."""
        deadline = time.monotonic() + self.cfg.timeout if self.cfg.timeout else None
        while not self.done.wait(POLL_S):
            timed_out = deadline is not None and time.monotonic() >= deadline
            if timed_out or self.signalled:
                self.processing = False
                return "timeout" if timed_out else "signal"
        return "done"

    def _exit_code(self, outcome: str) -> int:
        if outcome != "done" and not self.connack_received:
            return 255  # mosquitto_sub exit(-1)s when stopped before its CONNACK
        if self.output.broken_pipe:
            return 141  # what a shell reports for mosquitto_sub killed by SIGPIPE
        if outcome == "timeout":
            self.output.error("Timed out\n")
            return mosquitto_conn.ERR_TIMEOUT
        return self.connack_result

    def _stop(self, client: paho.Client, *, with_will: bool = False) -> None:
        """Disconnect (once); ``done`` is set when the connection is closed. Stopped by -W
        or a signal, an MQTT v5 client asks the broker to send its will anyway."""
        if self.stopping:
            return
        self.stopping = True
        reason = None
        if with_will and self.cfg.protocol == V5:
            reason = ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
        if client.disconnect(reasoncode=reason) == paho.MQTT_ERR_NO_CONN:
            self.done.set()  # between two connections: nothing to close

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signalled = True

    # --- paho callbacks (paho's network thread) ---------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connack_received = True
        self.connack_result = code = mosquitto_conn.connack_code(reason, self.cfg.protocol)
        self._debug(self.log(f"received CONNACK ({code})"))
        if code != 0:
            self.output.error(mosquitto_conn.connack_error(code, self.cfg.protocol))
            self._stop(client)
            return
        if self.cfg.topics:
            self._subscribe(client)
        for topic in self.cfg.unsub_topics:
            _, mid = client.unsubscribe(topic)
            self._debug(self.log(f"sending UNSUBSCRIBE (Mid: {mid}, Topic: {topic})"))

    def _subscribe(self, client: paho.Client) -> None:
        cfg = self.cfg
        options = (0x20 if cfg.no_retain else 0) | (0x08 if cfg.retain_as_published else 0)
        if cfg.protocol == V5:
            opts = SubscribeOptions(qos=cfg.qos, retainAsPublished=cfg.retain_as_published,
                                    retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND if cfg.no_retain else 0)
            _, mid = client.subscribe([(topic, opts) for topic in cfg.topics])
        else:
            _, mid = client.subscribe([(topic, cfg.qos) for topic in cfg.topics])
        for topic in cfg.topics:
            self._debug(self.log(f"sending SUBSCRIBE (Mid: {mid}, Topic: {topic}, QoS: {cfg.qos}, "
                                 f"Options: 0x{options:02x})"))

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: list[Any], properties: Any) -> None:
        granted = [int(getattr(r, "value", r)) for r in reasons]
        if self.cfg.debug and not self.cfg.quiet:
            self.output.write(f"Subscribed (mid: {mid}): {', '.join(map(str, granted))}\n".encode())
        if granted and all(g >= 128 for g in granted):
            self._stop(client)
            self.output.error("All subscription requests were denied.\n")
        if self.cfg.exit_after_sub:
            self._stop(client)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        client.ack(msg.mid, msg.qos)  # first, as libmosquitto does
        cfg = self.cfg
        if not self.processing:
            return
        if cfg.retained_only and not msg.retain:
            self._finish(client)
            return
        if (msg.retain and cfg.no_retain) or any(topics.matches(f, msg.topic) for f in cfg.filter_outs):
            return
        if cfg.remove_retained and msg.retain:
            self.last_mid = client.publish(msg.topic, None, 1, True).mid
        self._print(client, msg)
        if cfg.msg_count > 0:
            self.count += 1
            if self.count == cfg.msg_count:
                self._finish(client)

    def _finish(self, client: paho.Client) -> None:
        """No more messages: stop now, or once the last --remove-retained is acknowledged."""
        self.processing = False
        if self.last_mid == 0:
            self._stop(client)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        if not self.processing and mid == self.last_mid:
            self._stop(client)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self.stopping:
            self.done.set()

    def _on_log(self, client: paho.Client, userdata: Any, level: int, line: str) -> None:
        self._debug(mosquitto_conn.debug_line(line, self.client_id))

    def _debug(self, line: str | None) -> None:
        if self.cfg.debug and line is not None:
            self.output.write(line.encode() + b"\n")

    def _print(self, client: paho.Client, msg: paho.MQTTMessage) -> None:
        cfg = self.cfg
        if cfg.random_filter < 10000 and random.randrange(2**31) % 10000 >= cfg.random_filter:
            return
        received = _received(msg)
        shown = None
        if self.render is not None:
            topic, shown_text = self.render(msg.topic, bytes(msg.payload))
            received, shown = dataclasses.replace(received, topic=topic), shown_text.encode()
        printed = print_message(cfg, received, self.clock(), shown)
        if printed.out and not self.output.write(bytes(printed.out)):
            self.processing = False  # stdout is gone: nobody reads what we would print
            self._stop(client)
        for text in printed.errors:
            self.output.error(text)


def _received(msg: paho.MQTTMessage) -> Received:
    return Received(topic=msg.topic, payload=bytes(msg.payload), qos=msg.qos, retain=bool(msg.retain), mid=msg.mid,
                    properties=_properties(msg))


def _renderer() -> Callable[[str, bytes], tuple[str, str]]:
    """--decode: (topic, payload) -> (topic safe to print, rendered payload).

    Imported here: numpy and the wire types take longer to import than the rest of the
    command, and only --decode needs them."""
    from linguamq.tools.mosquitto import render

    return lambda topic, payload: (render.safe(topic), render.render(topic, payload))


_PROPERTY_NAMES = {"PayloadFormatIndicator": "payload-format-indicator",
                   "MessageExpiryInterval": "message-expiry-interval", "ContentType": "content-type",
                   "ResponseTopic": "response-topic", "CorrelationData": "correlation-data",
                   "SubscriptionIdentifier": "subscription-identifier", "TopicAlias": "topic-alias",
                   "UserProperty": "user-property"}


def _properties(msg: paho.MQTTMessage) -> tuple[tuple[str, Any], ...]:
    props = getattr(msg, "properties", None)
    if props is None:
        return ()
    found = []
    for attr, name in _PROPERTY_NAMES.items():
        value = getattr(props, attr, None)
        if value is None:
            continue
        if attr == "SubscriptionIdentifier" and isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            found.append((name, value))
    return tuple(found)


class _signals:
    """SIGINT/SIGTERM call ``handler`` instead of killing us (main thread only)."""

    def __init__(self, handler: Callable[[int, Any], None]) -> None:
        self.handler = handler
        self.saved: dict[int, Any] = {}

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.saved[sig] = signal.signal(sig, self.handler)

    def __exit__(self, *exc: object) -> None:
        for sig, old in self.saved.items():
            signal.signal(sig, old)


def version() -> str:
    return mosquitto_args.version_line("sub")


USAGE = """\
linguamq sub subscribes to a set of topics and prints all messages it receives.
Its flags are mosquitto_sub's (version 2.0.11), with the same meaning, defaults and exit codes.

Usage: linguamq sub {[-h host] [--unix path] [-p port] [-u username] [-P password] -t topic | -L URL [-t topic]}
                    [-c] [-k keepalive] [-q qos] [-x session-expiry-interval]
                    [-C msg_count] [-E] [-R] [--retained-only] [--remove-retained] [-T filter_out] [-U topic ...]
                    [-F format] [--decode]
                    [-W timeout_secs]
                    [-A bind_address] [--nodelay]
                    [-i id] [-I id_prefix]
                    [-d] [-N] [--quiet] [-v]
                    [--will-topic [--will-payload payload] [--will-qos qos] [--will-retain]]
                    [{--cafile file | --capath dir} [--cert file] [--key file]
                      [--ciphers ciphers] [--insecure]
                      [--tls-alpn protocol] [--tls-version version]
                      [--tls-use-os-certs]
       linguamq sub --help

 -A : bind the outgoing socket to this host/ip address. Use to control which interface
      the client communicates over.
 -c : disable clean session/enable persistent client mode.
 -C : disconnect and exit after receiving the 'msg_count' messages.
 -d : enable debug messages.
 -E : Exit once all subscriptions have been acknowledged by the broker.
 -F : output format: %t topic, %p payload, %x/%X payload in hex, %l length, %q QoS,
      %r retained, %m message id, %I ISO-8601 time, %U Unix time, %j/%J JSON, %%;
      @X strftime's %X, @N nanoseconds, @@; escapes \\n \\t \\r \\0 \\a \\e \\v \\\\.
 -h : mqtt host to connect to. Defaults to localhost.
 -i : id to use for this client. Defaults to an id the broker assigns.
 -I : define the client id as id_prefix appended with the process id.
 -k : keep alive in seconds for this client. Defaults to 60.
 -L : specify user, password, hostname, port and topic as a URL in the form:
      mqtt(s)://[username[:password]@]host[:port]/topic
 -N : do not add an end of line character when printing the payload.
 -p : network port to connect to. Defaults to 1883 for plain MQTT and 8883 for MQTT over TLS.
 -P : provide a password
 -q : quality of service level to use for the subscription. Defaults to 0.
 -R : do not print stale messages (those with retain set).
 -t : mqtt topic to subscribe to. May be repeated multiple times.
 -T : topic string to filter out of results. May be repeated.
 -u : provide a username
 -U : unsubscribe from a topic. May be repeated.
 -v : print published messages verbosely.
 -V : specify the version of the MQTT protocol to use when connecting.
      Can be mqttv5, mqttv311 or mqttv31. Defaults to mqttv311.
 -W : Specifies a timeout in seconds how long to process incoming MQTT messages (exit code 27).
 -x : Set the session-expiry-interval property on the CONNECT packet (MQTT v5 only).
 --decode : render linguamq's messages: the topic's kind, JSON pretty printed, activation
            envelopes as header + tensor summary, blob chunks as header + size; other
            binary payloads as a hex summary.
 --help : display this message.
 --nodelay : disable Nagle's algorithm.
 --pretty : print formatted output rather than minimised output when using the
            JSON output format option.
 --quiet : don't print error messages.
 --random-filter : only print a percentage of received messages.
 --retained-only : only handle messages with the retained flag set, and exit when the
                   first non-retained message is received.
 --remove-retained : send a message to the server to clear any received retained messages
                     Use -T to filter out messages you do not want to be cleared.
 --retain-as-published : (MQTT v5) keep the retain flag of messages as published.
 --unix : connect to a broker through a unix domain socket instead of a TCP socket.
 --will-payload : payload for the client Will. If not given and will-topic is set, a zero
                  length message will be sent.
 --will-qos : QoS level for the client Will.
 --will-retain : if given, make the client Will retained.
 --will-topic : the topic on which to publish the client Will.
 --cafile : path to a file containing trusted CA certificates to enable encrypted
            certificate based communication.
 --capath : path to a directory containing trusted CA certificates.
 --cert : client certificate for authentication, if required by server.
 --key : client private key for authentication, if required by server.
 --ciphers : openssl compatible list of TLS ciphers to support.
 --tls-version : TLS protocol version, can be one of tlsv1.3 tlsv1.2 or tlsv1.1.
                 Defaults to tlsv1.2 if available.
 --insecure : do not check that the server certificate hostname matches the remote hostname.
 --tls-use-os-certs : Load and trust OS provided CA certificates.

Not supported (rejected with exit code 1): -D/--property, --psk, --proxy, --tls-engine.
"""


if __name__ == "__main__":  # `python -m linguamq.tools.commands.sub`: the command without the CLI's start-up cost
    try:
        sys.exit(main(sys.argv[1:], out=sys.stdout.buffer, err=sys.stderr.buffer, env=os.environ))
    except KeyboardInterrupt:
        sys.exit(130)
