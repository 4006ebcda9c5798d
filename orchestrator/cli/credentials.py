"""Basic-auth credentials from the environment, checked the one way every server of the CLI checks them.

`orchestrator flower` and `orchestrator web` can revoke, kill and cancel work: neither starts with a
missing or empty password, nor with a `.env.example` placeholder, which is public knowledge.
"""

from __future__ import annotations

import click

from .display import clean

#: What every placeholder password in .env.example contains.
PLACEHOLDER = "change-me"


def basic_auth_pairs(variable: str, value: str | None, why: str) -> dict[str, str]:
    """{user: password} from `variable`'s value `user:password[,user:password...]`; a usage error (exit 2)
    naming `variable` when it is unset, malformed, has an empty password or a placeholder. `why` says
    what the server can do, so the refusal explains itself. A refused password is never echoed."""
    if not value:
        raise click.UsageError(f"set {variable}=user:password: {why}")
    pairs: dict[str, str] = {}
    for pair in value.split(","):
        user, sep, password = pair.partition(":")
        if not sep or not user.strip() or not password.strip():
            raise click.UsageError(
                f"{variable} must be user:password (comma-separate several), each with a user "
                "and a non-empty password"
            )
        if PLACEHOLDER in password.lower():
            raise click.UsageError(
                f"{variable}: the password of {clean(user)!r} is the .env.example placeholder; "
                "choose a real one"
            )
        pairs[user] = password
    return pairs
