"""Herald's command line: serve (default), migrate, createuser."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from server.ops.logs import configure_logging
from server.settings import Settings, SettingsError, load_settings


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run.py", description="Herald, a real-time event server.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--settings", metavar="PATH", help="settings file (default: settings.toml or $HERALD_SETTINGS)")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", parents=[common], help="run the server (default)")
    serve.add_argument("--workers", type=int, metavar="N", help="worker processes (default: one per core)")
    serve.add_argument("--host", metavar="H")
    serve.add_argument("--port", type=int, metavar="P")
    sub.add_parser("migrate", parents=[common], help="apply database migrations and exit")
    createuser = sub.add_parser("createuser", parents=[common], help="create a user (password from a prompt)")
    createuser.add_argument("username")
    createuser.add_argument("--role", action="append", default=[], dest="roles", help="a role; repeat for more")
    createuser.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["serve", *argv]
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    """Command-line flags are validated like any other override: they go in as HERALD_SERVER_*."""
    environ = dict(os.environ)
    for key in ("host", "port", "workers"):
        if (value := getattr(args, key, None)) is not None:
            environ[f"HERALD_SERVER_{key.upper()}"] = str(value)
    return load_settings(args.settings, environ)


def migrate(settings: Settings) -> int:
    from server.process.supervisor import database
    from server.storage import db

    with database(settings) as (settings, description):
        applied = asyncio.run(db.migrate(settings.database.url, schema=settings.database.schema))
        print(f"{description}: {len(applied)} migration(s) applied {' '.join(applied)}".rstrip())
    return 0


def read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    import getpass

    password = getpass.getpass("Password: ")
    if getpass.getpass("Repeat password: ") != password:
        raise SystemExit("herald: the passwords differ")
    return password


def createuser(settings: Settings, args: argparse.Namespace) -> int:
    from server.errors import ApiError
    from server.identity.users import validate_new_user
    from server.process.supervisor import database, with_user_store

    try:
        username, password, roles = validate_new_user(args.username, read_password(args.password_stdin), args.roles)
    except ApiError as exc:
        print(f"herald: {exc.detail}", file=sys.stderr)
        return 2
    with database(settings) as (settings, _):
        try:
            user = asyncio.run(with_user_store(settings, lambda users: users.create(username, password, roles)))
        except ApiError as exc:
            print(f"herald: {exc.detail}", file=sys.stderr)
            return 1
    print(f"created user {user.username} (id {user.id}) with roles {', '.join(user.roles) or 'none'}")
    return 0


def main(argv: list[str]) -> int:
    configure_logging()
    args = parse_args(argv)
    try:
        settings = settings_from(args)
    except SettingsError as exc:
        print(f"herald: bad setting {exc}", file=sys.stderr)
        return 2
    from server.storage.embedded_pg import EmbeddedPostgresError

    try:
        return run_command(settings, args)
    except EmbeddedPostgresError as exc:  # one line naming the data dir and the cause, as for a bad setting
        print(f"herald: {exc}", file=sys.stderr)
        return 2


def run_command(settings: Settings, args: argparse.Namespace) -> int:
    if args.command == "migrate":
        return migrate(settings)
    if args.command == "createuser":
        return createuser(settings, args)
    from server.errors import ApiError
    from server.process.supervisor import serve

    try:
        return serve(settings, reload=lambda: settings_from(args))
    except ApiError as exc:  # the bootstrap admin's name or password is refused
        print(f"herald: HERALD_ADMIN_USERNAME/HERALD_ADMIN_PASSWORD: {exc.detail}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
