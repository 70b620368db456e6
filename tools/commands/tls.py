"""`linguamq tls init DIR [--host NAME ...]`: a CA and a server certificate for a home cluster
(``linguamq.broker.tls``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from linguamq.broker.tls import FILES, write_certificates


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = sub.add_parser("init", help="write ca.crt, ca.key, server.crt, server.key to DIR")
    init.add_argument("dir", type=Path, metavar="DIR")
    init.add_argument("--host", action="append", default=[], metavar="NAME",
                      help="another DNS name or IP address the hub is reached by (repeatable)")
    init.add_argument("--force", action="store_true", help="overwrite existing files")


def run(args: argparse.Namespace) -> int:
    try:
        names = write_certificates(args.dir, args.host, force=args.force)
    except (OSError, ValueError) as exc:
        print(f"linguamq tls: error: {exc}", file=sys.stderr)
        return 2
    d = args.dir
    print(f"wrote {', '.join(str(d / f) for f in FILES)}\n"
          f"server certificate for: {', '.join(names)}\n"
          f"hub:     linguamq hub --artifacts ART --tls-cert {d / 'server.crt'} --tls-key {d / 'server.key'} "
          "[--tls-only]\n"
          f"nodes:   linguamq node --broker mqtts://HOST:8883 --cafile {d / 'ca.crt'} ...\n"
          f"clients: linguamq generate --broker mqtts://HOST:8883 --cafile {d / 'ca.crt'} ...\n"
          f"Copy only ca.crt to nodes and clients; keep ca.key offline (it can sign for any name).")
    return 0
