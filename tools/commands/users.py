"""`linguamq users add|remove|list|export-mosquitto`: the users file of a secured cluster.

`linguamq hub --users FILE` admits only the users listed (hashed passwords, roles hub, node,
client; see broker/users.py and broker/acl.py); `export-mosquitto` writes the same users
and rules for a mosquitto broker (password_file, acl_file).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path

from linguamq.broker.acl import mosquitto_acl
from linguamq.broker.users import (
    ROLES,
    User,
    UsersError,
    hash_password,
    load_users,
    save_users,
    validate_name,
    validate_role,
    write_private,
)
from linguamq.gateway.keys import api_key
from linguamq.topics import TopicError, validate_id


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="add a user (asks for the password unless --password)")
    add.add_argument("name", help="user name: a node's --name, a client's id ([A-Za-z0-9_-], at most 64)")
    add.add_argument("--role", required=True, choices=ROLES, help="hub, node or client")
    add.add_argument("--password", help="the password (default: asked twice on a terminal, else one stdin line)")
    add.add_argument("--replace", action="store_true", help="replace the user if it exists (new password/role)")
    remove = sub.add_parser("remove", help="remove a user")
    remove.add_argument("name")
    listing = sub.add_parser("list", help="list users and roles (never passwords)")
    listing.add_argument("--json", action="store_true", help="one JSON array of {name, role}")
    export = sub.add_parser("export-mosquitto", help="write a mosquitto password_file and acl_file")
    export.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory to write them to")
    export.add_argument("--cluster", help="grant topics of this cluster only (default: any cluster)")
    for each in (add, remove, listing, export):
        each.add_argument("--file", required=True, type=Path, metavar="F", help="the users file")


def run(args: argparse.Namespace) -> int:
    try:
        return {"add": _add, "remove": _remove, "list": _list, "export-mosquitto": _export}[args.action](args)
    except (UsersError, TopicError, OSError) as exc:
        print(f"linguamq users: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, EOFError):
        print("linguamq users: cancelled", file=sys.stderr)
        return 130


def _load_or_empty(path: Path) -> dict[str, User]:
    return load_users(path) if path.exists() else {}


def _add(args: argparse.Namespace) -> int:
    name, role = validate_name(args.name), validate_role(args.role)
    users = _load_or_empty(args.file)
    if name in users and not args.replace:
        raise UsersError(f"user {name!r} is already in {args.file} (--replace to change it)")
    password = args.password if args.password is not None else _read_password(name)
    users[name] = User(name, role, hash_password(password))
    save_users(args.file, users.values())
    print(f"{'replaced' if args.replace else 'added'} {name} ({role}) in {args.file}", file=sys.stderr)
    if role == "client":  # its login as one bearer token, for the OpenAI API of `linguamq serve` / `hub --http`
        print(f"API key of {name} (Authorization: Bearer KEY; it holds the password, keep it as secret):",
              file=sys.stderr)
        print(api_key(name, password))
    return 0


def _remove(args: argparse.Namespace) -> int:
    users = load_users(args.file)
    if args.name not in users:
        raise UsersError(f"no user {args.name!r} in {args.file}")
    del users[args.name]
    save_users(args.file, users.values())
    print(f"removed {args.name} from {args.file}", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace) -> int:
    users = load_users(args.file)
    if args.json:
        print(json.dumps([{"name": u.name, "role": u.role} for u in users.values()]))
    else:
        for user in users.values():
            print(f"{user.name}\t{user.role}")
    return 0


def _export(args: argparse.Namespace) -> int:
    users = load_users(args.file)
    if args.cluster is not None:
        validate_id("cluster", args.cluster)
    args.out.mkdir(parents=True, exist_ok=True)
    # mosquitto's password_file is name:hash; ours adds the role between them.
    write_private(args.out / "password_file", "".join(f"{u.name}:{u.password_hash}\n" for u in users.values()))
    write_private(args.out / "acl_file", mosquitto_acl({u.name: u.role for u in users.values()}, args.cluster))
    print(f"wrote {args.out / 'password_file'} and {args.out / 'acl_file'} ({len(users)} users). In mosquitto.conf:\n"
          f"  allow_anonymous false\n  password_file {args.out.resolve() / 'password_file'}\n"
          f"  acl_file {args.out.resolve() / 'acl_file'}\n"
          "  set_tcp_nodelay true\n"
          "(without the last, mosquitto can hold a small message until the previous one is acknowledged.) "
          "The hub then connects with a hub-role user: linguamq hub --broker URL -u NAME (password in "
          "$LINGUAMQ_PASSWORD).")
    return 0


def _read_password(name: str) -> str:
    """Twice on a terminal (typos), else the first line of stdin (scripts)."""
    if sys.stdin.isatty():
        first = getpass.getpass(f"password for {name}: ")
        if first != getpass.getpass("again: "):
            raise UsersError("the two passwords differ")
        return first
    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        raise UsersError("no password on stdin (give --password, or pipe one line)")
    return line
