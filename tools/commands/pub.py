"""`linguamq pub`: mosquitto_pub with the same flags, behaviour and exit codes.

    linguamq pub -h hub.local -t lmq/home/requests -m '{"id": "r1", "prompt": "Hi", "max_tokens": 8}'

Composition root: the words after ``pub`` go to ``mosquitto_args``; the connection is
``mosquitto_conn``'s.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO

import paho.mqtt.client as paho

from linguamq.tools.mosquitto import args as mosquitto_args
from linguamq.tools.mosquitto import conn as mosquitto_conn
from linguamq.tools.mosquitto.args import MQTT_MAX_PAYLOAD, V5, ArgsError, ClientConfig, HelpRequested, VersionRequested
from linguamq.tools.mosquitto.conn import REASON_V5, ClientError, Output

POLL_S = 0.05  # how often the main thread looks for due repeats
STOP_GRACE_S = 10.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mosquitto_args.take_raw_argv(parser)


def run(args: argparse.Namespace) -> int:
    return main(args.argv, out=sys.stdout.buffer, err=sys.stderr.buffer, stdin=sys.stdin.buffer, env=os.environ)


def main(argv: Sequence[str], *, out: BinaryIO, err: BinaryIO, stdin: BinaryIO, env: Mapping[str, str]) -> int:
    """mosquitto_pub's ``main``: the exit code (0, 1, a CONNACK code, 7 if the connection is lost...)."""
    output = Output(out, err)
    try:
        cfg = mosquitto_args.load(argv, "pub", env)
    except ArgsError as exc:
        output.error(exc.text + ("\nUse 'linguamq pub --help' to see usage.\n" if exc.hint else ""), quiet_ok=False)
        return 1
    except HelpRequested:
        output.write(USAGE.encode())
        return 1
    except VersionRequested:
        output.write(mosquitto_args.version_line("pub").encode())
        return 1
    output.quiet = cfg.quiet
    try:
        load_message(cfg, stdin)
    except ClientError as exc:
        return output.client_error(exc)
    if cfg.topic is None or cfg.pub_mode is None:
        output.error("Error: Both topic and message must be supplied.\n", quiet_ok=False)
        output.write(USAGE.encode())
        return 1
    return Publisher(cfg, output, stdin).run()


def load_message(cfg: ClientConfig, stdin: BinaryIO) -> None:
    """``-s`` and ``-f``: read the payload before connecting (``load_stdin``/``load_file``)."""
    if cfg.pub_mode == "stdin_file":
        data = stdin.read()
        if len(data) > MQTT_MAX_PAYLOAD:
            raise ClientError(f"Error: Message length must be less than {MQTT_MAX_PAYLOAD} bytes.\n\n"
                              "Error loading input from stdin.\n")
        if not data:
            raise ClientError("Error: Zero length input.\nError loading input from stdin.\n")
        cfg.message = data
    elif cfg.file_input is not None:
        name = cfg.file_input
        try:
            with open(name, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                if size > MQTT_MAX_PAYLOAD:
                    raise ClientError(f"Error: File must be less than {MQTT_MAX_PAYLOAD} bytes.\n\n"
                                      f'Error loading input file "{name}".\n')
                f.seek(0)
                cfg.message = f.read()
        except OSError:
            raise ClientError(f'Error: Unable to open file "{name}".\nError loading input file "{name}".\n') from None


class Publisher:
    """One mosquitto_pub session: connect, publish (repeatedly, or line by line), leave."""

    def __init__(self, cfg: ClientConfig, output: Output, stdin: BinaryIO) -> None:
        self.cfg, self.output, self.stdin = cfg, output, stdin
        self.client_id = cfg.client_id(os.getpid())
        self.log = mosquitto_conn.log_prefix(self.client_id)
        self.done = threading.Event()  # the connection is closed
        self.connected = threading.Event()  # CONNACK accepted (-l starts reading then)
        self.lock = threading.Lock()
        self.stopping = False
        self.connack_result = 0
        self.lost = False
        self.sent = self.acked = 0
        self.input_done = False
        self.next_repeat: float | None = None

    def run(self) -> int:
        try:
            client = mosquitto_conn.build_client(self.cfg, client_id=self.client_id, reconnect=False)
            self._wire(client)
            mosquitto_conn.connect(client, self.cfg)
        except ClientError as exc:
            return self.output.client_error(exc)
        client.loop_start()
        try:
            if self.cfg.pub_mode == "stdin_line":
                self._publish_lines(client)
            self._wait(client)
        finally:
            self._stop(client)
            self.done.wait(STOP_GRACE_S)
            client.loop_stop()
        return self._exit_code()

    def _wire(self, client: paho.Client) -> None:
        client.on_connect = self._on_connect
        client.on_publish = self._on_publish
        client.on_disconnect = self._on_disconnect
        if self.cfg.debug:
            client.on_log = self._on_log

    def _wait(self, client: paho.Client) -> None:
        """Until the connection closes; sends --repeat publishes when they are due."""
        while not self.done.wait(POLL_S):
            due = self.next_repeat
            if due is not None and time.monotonic() >= due:
                self.next_repeat = None
                self._publish(client, self._payload())

    def _publish_lines(self, client: paho.Client) -> None:
        """``-l``: one message per line of stdin (newline removed), then leave."""
        while not self.connected.wait(POLL_S):
            if self.done.is_set():
                return
        for line in self.stdin:
            if self.done.is_set():
                return
            self._publish(client, line[:-1] if line.endswith(b"\n") else line)
        with self.lock:
            self.input_done = True
            finished = self.acked == self.sent
        if finished:
            self._stop(client)

    def _payload(self) -> bytes | None:
        return None if self.cfg.pub_mode == "null" else self.cfg.message

    def _publish(self, client: paho.Client, payload: bytes | None) -> None:
        with self.lock:
            self.sent += 1
        info = client.publish(self.cfg.topic or "", payload, self.cfg.qos, self.cfg.retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            self.output.error(_PUBLISH_ERRORS.get(info.rc, f"Error: {mosquitto_conn.STRERROR.get(info.rc, '')}\n"))
            self._stop(client)

    def _stop(self, client: paho.Client) -> None:
        if not self.stopping:
            self.stopping = True
            if client.disconnect() == paho.MQTT_ERR_NO_CONN:
                self.done.set()  # the connection is already gone

    def _exit_code(self) -> int:
        if self.connack_result:
            self.output.error(f"Error: {mosquitto_conn.STRERROR[mosquitto_conn.ERR_CONN_REFUSED]}\n")
            return self.connack_result
        if self.lost:
            self.output.error(f"Error: {mosquitto_conn.STRERROR[mosquitto_conn.ERR_CONN_LOST]}\n")
            return mosquitto_conn.ERR_CONN_LOST
        return 0

    # --- paho callbacks (paho's network thread) ---------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        code = mosquitto_conn.connack_code(reason, self.cfg.protocol)
        self._debug(self.log(f"received CONNACK ({code})"))
        if code != 0:
            self.connack_result = code
            self.output.error(mosquitto_conn.connack_error(code, self.cfg.protocol))
            self._stop(client)
            return
        self.connected.set()
        if self.cfg.pub_mode != "stdin_line":
            self._publish(client, self._payload())

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        code = int(getattr(reason, "value", 0) or 0)
        if self.cfg.protocol == V5 and code > 127:
            self.output.error(f"Warning: Publish {mid} failed: {REASON_V5.get(code, 'Unknown reason')}.\n")
        with self.lock:
            self.acked += 1
            acked, line_mode, finished = self.acked, self.cfg.pub_mode == "stdin_line", self.input_done
        if line_mode:
            if finished and acked == self.sent:
                self._stop(client)
        elif acked < self.cfg.repeat_count:
            self.next_repeat = time.monotonic() + self.cfg.repeat_delay
        else:
            self._stop(client)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if not self.stopping:
            self.lost = True
        self.done.set()

    def _on_log(self, client: paho.Client, userdata: Any, level: int, line: str) -> None:
        self._debug(mosquitto_conn.debug_line(line, self.client_id))

    def _debug(self, line: str | None) -> None:
        if self.cfg.debug and line is not None:
            self.output.write(line.encode() + b"\n")


_PUBLISH_ERRORS = {
    paho.MQTT_ERR_INVAL: "Error: Invalid input. Does your topic contain '+' or '#'?\n",
    paho.MQTT_ERR_NOMEM: "Error: Out of memory when trying to publish message.\n",
    paho.MQTT_ERR_PROTOCOL: "Error: Protocol error when communicating with broker.\n",
    paho.MQTT_ERR_PAYLOAD_SIZE: "Error: Message payload is too large.\n",
}


USAGE = """\
linguamq pub publishes a message on a single topic and exits.
Its flags are mosquitto_pub's (version 2.0.11), with the same meaning, defaults and exit codes.

Usage: linguamq pub {[-h host] [--unix path] [-p port] [-u username] [-P password] -t topic | -L URL}
                    {-f file | -l | -n | -m message | -s}
                    [-c] [-k keepalive] [-q qos] [-r] [--repeat N] [--repeat-delay time] [-x session-expiry]
                    [-A bind_address] [--nodelay]
                    [-i id] [-I id_prefix]
                    [-d] [--quiet]
                    [-M max_inflight]
                    [-u username [-P password]]
                    [--will-topic [--will-payload payload] [--will-qos qos] [--will-retain]]
                    [{--cafile file | --capath dir} [--cert file] [--key file]
                      [--ciphers ciphers] [--insecure]
                      [--tls-alpn protocol] [--tls-version version]
                      [--tls-use-os-certs]
       linguamq pub --help

 -A : bind the outgoing socket to this host/ip address. Use to control which interface
      the client communicates over.
 -d : enable debug messages.
 -c : disable clean session/enable persistent client mode.
 -f : send the contents of a file as the message.
 -h : mqtt host to connect to. Defaults to localhost.
 -i : id to use for this client. Defaults to an id the broker assigns.
 -I : define the client id as id_prefix appended with the process id.
 -k : keep alive in seconds for this client. Defaults to 60.
 -L : specify user, password, hostname, port and topic as a URL in the form:
      mqtt(s)://[username[:password]@]host[:port]/topic
 -l : read messages from stdin, sending a separate message for each line.
 -m : message payload to send.
 -M : the maximum inflight messages for QoS 1/2.
 -n : send a null (zero length) message.
 -p : network port to connect to. Defaults to 1883 for plain MQTT and 8883 for MQTT over TLS.
 -P : provide a password
 -q : quality of service level to use for all messages. Defaults to 0.
 -r : message should be retained.
 -s : read message from stdin, sending the entire input as a message.
 -t : mqtt topic to publish to.
 -u : provide a username
 -V : specify the version of the MQTT protocol to use when connecting.
      Can be mqttv5, mqttv311 or mqttv31. Defaults to mqttv311.
 -x : Set the session-expiry-interval property on the CONNECT packet (MQTT v5 only).
 --help : display this message.
 --nodelay : disable Nagle's algorithm.
 --quiet : don't print error messages.
 --repeat : if publish mode is -f, -m, or -s, then repeat the publish N times.
 --repeat-delay : if using --repeat, wait time seconds between publishes. Defaults to 0.
 --unix : connect to a broker through a unix domain socket instead of a TCP socket.
 --will-payload : payload for the client Will. If not given and will-topic is set, a zero
                  length message will be sent.
 --will-qos : QoS level for the client Will.
 --will-retain : if given, make the client Will retained.
 --will-topic : the topic on which to publish the client Will.
 --cafile : path to a file containing trusted CA certificates to enable encrypted
            communication.
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


if __name__ == "__main__":  # `python -m linguamq.tools.commands.pub`: the command without the CLI's start-up cost
    try:
        sys.exit(main(sys.argv[1:], out=sys.stdout.buffer, err=sys.stderr.buffer, stdin=sys.stdin.buffer,
                      env=os.environ))
    except KeyboardInterrupt:
        sys.exit(130)
