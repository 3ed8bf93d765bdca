"""``python -m dispatch.admin``: the chores of a production installation that must not have default accounts.

* ``keygen``: a new Ed25519 signing key for dispatch and its public key for the board(s), as environment lines.
  The signing key is a secret: put it in the secret store, never in a repository or a log.
* ``create-account USERNAME ROLE [--hospital ID] [--unit ID] [--totp]``: create an account (the first
  administrator, service accounts for boards) in the database of ``EMS_DISPATCH_DATABASE_URL`` (or
  ``--database-url``).  The password is asked for without echo (or read from standard input when it is not a
  terminal); with ``--totp`` the TOTP secret and its ``otpauth://`` URI are shown once.

Output goes to standard output on purpose (these are the operator's own secrets); nothing is logged.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from collections.abc import Sequence

from broker_config.identity import Role, generate_signing_key, signing_key_text, verify_key_text
from dispatch.accounts import totp_uri
from dispatch.errors import AuthError, StoreError
from dispatch.security import DispatchSecurity
from dispatch.sql_repository import SqlRepository

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dispatch.admin", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("keygen", help="a new signing key and its public key")
    create = commands.add_parser("create-account", help="create an account in dispatch's database")
    create.add_argument("username")
    create.add_argument("role", choices=[r.value for r in Role])
    create.add_argument("--hospital", dest="hospital_id")
    create.add_argument("--unit", dest="unit_id")
    create.add_argument("--totp", action="store_true", help="enrol a TOTP second factor")
    create.add_argument("--database-url", default=os.environ.get("EMS_DISPATCH_DATABASE_URL"))
    return parser


def _password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if first != getpass.getpass("again: "):
            raise AuthError("the passwords differ")
        return first
    return sys.stdin.readline().rstrip("\n")


async def _create(args: argparse.Namespace) -> int:
    if not args.database_url:
        sys.stderr.write("--database-url or EMS_DISPATCH_DATABASE_URL is required\n")
        return 2
    repo = SqlRepository.from_url(args.database_url)
    await repo.open()
    try:
        # Only the account store is used: the signing key plays no part in creating an account.
        accounts = DispatchSecurity.development().account_service(repo)
        record, secret = await accounts.create_account(
            args.username, Role(args.role), _password(), hospital_id=args.hospital_id, unit_id=args.unit_id,
            totp=args.totp,
        )  # fmt: skip
    finally:
        await repo.close()
    sys.stdout.write(f"created {record.username} ({record.role.value})\n")
    if secret:
        sys.stdout.write(f"TOTP secret (shown once): {secret}\n{totp_uri(secret, record.username)}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "keygen":
        key = generate_signing_key()
        sys.stdout.write(
            f"EMS_DISPATCH_SIGNING_KEY={signing_key_text(key)}\n"
            f"EMS_BOARD_VERIFY_KEYS={json.dumps([verify_key_text(key)])}\n"
        )
        return 0
    try:
        return asyncio.run(_create(args))
    except (AuthError, StoreError, ValueError) as exc:
        sys.stderr.write(f"refused: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
