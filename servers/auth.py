"""API keys: the file a server reads them from, and the check every keyed route runs.

Clients send ``Authorization: Bearer KEY``. A server started without a keys file takes every
request (fine on 127.0.0.1; `serve` warns when it listens elsewhere without keys).
"""

from __future__ import annotations

import secrets
from pathlib import Path

from fastapi import Request

from bbt.errors import ConfigError

MIN_KEY_CHARS = 8  # shorter keys are guessable; refuse them at start-up
_HOW = "send the header 'Authorization: Bearer KEY' (bbt: --api-key KEY or the BBT_API_KEY environment variable)"


def load_api_keys(path: str | Path) -> frozenset[str]:
    """Keys from a file: one per line; blank lines and lines starting with '#' are skipped.

    Raises ConfigError for a missing file, a file with no keys, or a key that is too short,
    so that a server never starts believing it is protected when it is not.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"API keys file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read API keys file {path}: {exc}") from exc
    keys = set()
    for number, line in enumerate(lines, 1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
            raise ConfigError(
                f"{path}, line {number}: an API key needs at least {MIN_KEY_CHARS} characters and no spaces; "
                "make one with: python -c 'import secrets; print(secrets.token_urlsafe(24))'"
            )
        keys.add(key)
    if not keys:
        raise ConfigError(f"API keys file {path} holds no keys (one per line, '#' starts a comment); "
                          "refusing to start an open server by mistake: add a key or drop --api-keys")
    return frozenset(keys)


class Unauthorized(Exception):
    """No key or a wrong key; the app answers 401 with an ErrorBody."""


def require_key(request: Request) -> None:
    """Dependency of every keyed route: passes when the server has no keys or the key is one of them."""
    keys: frozenset[str] | None = request.app.state.api_keys
    if not keys:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise Unauthorized(f"this server needs an API key: {_HOW}")
    given = given.strip()
    # compare against every key, in constant time each: no early exit that leaks which prefix matched
    if not any([secrets.compare_digest(given.encode(), k.encode()) for k in keys]):
        raise Unauthorized(f"the API key is not valid on this server: {_HOW}")
