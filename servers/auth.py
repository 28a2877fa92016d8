"""API keys: where a server reads them, how it keeps them, and the check every keyed route runs.

Clients send ``Authorization: Bearer KEY``. Keys come from a file (``bbt serve --api-keys FILE``)
or, when no file is given, the environment variable ``BBT_SERVER_API_KEYS`` (keys separated by
commas or whitespace). A file line is a key, or ``sha256:<64 hex>``, the digest of one, so that a
deployment need not store keys in plaintext. The server keeps only sha256 digests: a memory dump
or a stray log line holds no usable key.

Each authenticated request gets a non-secret account id on ``request.state.account`` (the first
12 hex characters of its key's digest; ``anonymous`` on a server without keys): quotas, rate
limits, idempotent replays and log lines use it, never the key. A server started without keys
takes every request (fine on 127.0.0.1; `serve` warns when it listens elsewhere without keys).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

from fastapi import Request

from bbt.errors import ConfigError

ENV_VAR = "BBT_SERVER_API_KEYS"
MIN_KEY_CHARS = 8  # shorter keys are guessable; refuse them at start-up
ANONYMOUS = "anonymous"  # the account of every request to a server without keys
_HOW = "send the header 'Authorization: Bearer KEY' (bbt: --api-key KEY or the BBT_API_KEY environment variable)"
_MAKE = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(24))'"
_DIGEST = re.compile(r"sha256:([0-9a-fA-F]{64})")


def digest(key: str) -> str:
    """The sha256 hex digest of a key: what the server keeps and compares."""
    return hashlib.sha256(key.encode()).hexdigest()


def account_of(key_digest: str) -> str:
    """A key's account id: short, stable, and useless for authenticating."""
    return key_digest[:12]


def parse_key(entry: str, where: str) -> str:
    """One key entry (a plaintext key or 'sha256:HEX') as its digest; ConfigError naming `where`.

    The message never repeats the entry: it may be a real key with a typo.
    """
    if entry.lower().startswith("sha256:"):
        match = _DIGEST.fullmatch(entry)
        if not match:
            raise ConfigError(f"{where}: a 'sha256:' entry needs exactly 64 hex characters after the colon "
                              "(python -c 'import hashlib,sys; print(hashlib.sha256(sys.argv[1].encode()).hexdigest())' KEY)")
        return match.group(1).lower()
    if len(entry) < MIN_KEY_CHARS or any(c.isspace() for c in entry):
        raise ConfigError(f"{where}: an API key needs at least {MIN_KEY_CHARS} characters and no spaces; {_MAKE}")
    return digest(entry)


def load_api_keys(path: str | Path) -> frozenset[str]:
    """Key digests from a file: one key or 'sha256:HEX' per line; blank lines and '#' lines are skipped.

    Raises ConfigError for a missing file, a file with no keys, or a bad entry, so that a server
    never starts believing it is protected when it is not.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"API keys file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read API keys file {path}: {exc}") from exc
    digests = {parse_key(line.strip(), f"{path}, line {number}") for number, line in enumerate(lines, 1)
               if line.strip() and not line.strip().startswith("#")}
    if not digests:
        raise ConfigError(f"API keys file {path} holds no keys (one per line, '#' starts a comment); "
                          "refusing to start an open server by mistake: add a key or drop --api-keys")
    return frozenset(digests)


def keys_from_env(value: str) -> frozenset[str]:
    """Key digests from the value of BBT_SERVER_API_KEYS: keys or 'sha256:HEX' entries split by commas or whitespace.

    A variable that is set but holds no key is an error, as an empty keys file is.
    """
    entries = [e for e in re.split(r"[,\s]+", value) if e]
    if not entries:
        raise ConfigError(f"{ENV_VAR} is set but holds no keys; refusing to start an open server by mistake: "
                          f"put keys in it (separated by commas or spaces) or unset it")
    return frozenset(parse_key(e, f"{ENV_VAR}, entry {i}") for i, e in enumerate(entries, 1))


def key_digests(keys: Iterable[str] | None) -> frozenset[str]:
    """Digests of `keys` given as a keys file holds them (plaintext or 'sha256:HEX'); for create_app."""
    return frozenset(parse_key(k, f"API key {i}") for i, k in enumerate(keys or (), 1))


class Unauthorized(Exception):
    """No key or a wrong key; the app answers 401 with an ErrorBody (which never repeats the key)."""


def require_key(request: Request) -> None:
    """Dependency of every keyed route: passes when the server has no keys or the key is one of them.

    Sets ``request.state.account``. The given key is hashed and its digest compared with every
    stored digest in constant time, with no early exit, so timing tells nothing about which
    digest came close.
    """
    digests: frozenset[str] = request.app.state.key_digests
    if not digests:
        request.state.account = ANONYMOUS
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise Unauthorized(f"this server needs an API key: {_HOW}")
    given_digest = digest(given.strip()).encode()
    matches = [d for d in digests if secrets.compare_digest(given_digest, d.encode())]
    if not matches:
        raise Unauthorized(f"the API key is not valid on this server: {_HOW}")
    request.state.account = account_of(matches[0])
