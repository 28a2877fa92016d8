"""Idempotent requests: a retried evaluate is answered from memory, not scored (and billed) twice.

A client may send ``Idempotency-Key: K`` (1 to 128 characters of ``A-Z a-z 0-9 _ . : -``) with
POST /v1/evaluate or /v1/stats; the bbt client sends the sha256 of the body and keeps it across
retries. Per account, the server remembers the 200 answers of recent keyed requests with the
sha256 of their body:

- same account, key and body again: the stored answer, with ``Idempotent-Replayed: true``; no
  model work, no quota charged;
- same key, another body: 422 ``idempotency_key_reused`` (a client bug; nothing is served);
- same key while the first request is still being scored: the second waits for the first and
  replays its answer, or, if the first failed, is processed itself;
- failed requests (not 200) are not stored: a retry is processed afresh.

Entries live `ttl` seconds, at most `max_entries` of them and `max_bytes` of answers in all
(least recently used go first). Stored answers live in the server's state database
(`servers.state`, `bbt serve --state FILE`): with a file, a retry after a restart is replayed, and
an answer is stored in the same transaction as its quota charge. Requests in flight are tracked
in memory (a restart ends them unanswered, so unstored and uncharged).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from servers.state import ServerState

KEY_PATTERN = r"^[A-Za-z0-9_.:\-]{1,128}$"
REPLAYED_HEADER = "Idempotent-Replayed"


class KeyReused(Exception):
    """The same Idempotency-Key with another body: 422 idempotency_key_reused."""


@dataclass
class _InFlight:
    body_hash: str
    done: threading.Event = field(default_factory=threading.Event)


class IdempotencyStore:
    """Answers of recent keyed requests, by (account, key). Thread-safe."""

    def __init__(self, *, max_entries: int = 2048, ttl: float = 86400.0, max_bytes: int = 256 * 2**20,
                 state: ServerState | None = None, clock: Callable[[], float] = time.time):
        """`state`: where answers are kept (None: a database in memory); `clock`: seconds since the
        epoch, as stored answers outlive the process (tests pass a fake clock)."""
        self.max_entries, self.ttl, self.max_bytes = max_entries, ttl, max_bytes
        self._clock = clock
        self.state = state or ServerState()
        self._lock = self.state.lock
        self._in_flight: dict[tuple[str, str], _InFlight] = {}

    def begin(self, account: str, key: str, body_hash: str) -> bytes | None:
        """The stored answer to replay, or None: the caller now owns the key and must call `finish`.

        Waits while another request with this key is in flight. Raises KeyReused when the key was
        used with another body.
        """
        while True:
            with self._lock:
                self.state.execute("DELETE FROM answers WHERE created < ?", (self._clock() - self.ttl,))
                flying = self._in_flight.get((account, key))
                if flying is None:
                    rows = self.state.execute("SELECT body_hash, answer FROM answers WHERE account = ? AND key = ?",
                                              (account, key))
                    if not rows:
                        self._in_flight[(account, key)] = _InFlight(body_hash)
                        return None
                    stored_hash, answer = rows[0]
                    if stored_hash != body_hash:
                        raise self._reused(key)
                    self.state.execute("UPDATE answers SET used = ? WHERE account = ? AND key = ?",
                                       (self._next_use(), account, key))
                    return bytes(answer)
                if flying.body_hash != body_hash:
                    raise self._reused(key)
                done = flying.done
            done.wait()  # the first request's owner always calls finish (routes do so in `finally`)

    def finish(self, account: str, key: str, answer: bytes | None) -> None:
        """End the request that owns `key`: store its 200 answer, or (None) forget the key; wake
        waiters. Inside `state.transaction()` the answer commits with the request's quota charge."""
        with self._lock:
            flying = self._in_flight.pop((account, key), None)
            if flying is None:
                return
            if answer is not None:
                self.state.execute(
                    "INSERT OR REPLACE INTO answers (account, key, body_hash, created, used, answer) "
                    "VALUES (?, ?, ?, ?, ?, ?)", (account, key, flying.body_hash, self._clock(), self._next_use(), answer))
                self._evict()
        flying.done.set()

    def __len__(self) -> int:
        with self._lock:
            return self.state.execute("SELECT COUNT(*) FROM answers")[0][0] + len(self._in_flight)

    def _next_use(self) -> int:
        return self.state.execute("SELECT COALESCE(MAX(used), 0) + 1 FROM answers")[0][0]

    def _evict(self) -> None:
        """Drop the least recently used stored answers until within bounds."""
        while True:
            count, size = self.state.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(answer)), 0) FROM answers")[0]
            if count + len(self._in_flight) <= self.max_entries and size <= self.max_bytes or count == 0:
                return
            self.state.execute("DELETE FROM answers WHERE rowid = (SELECT rowid FROM answers ORDER BY used LIMIT 1)")

    @staticmethod
    def _reused(key: str) -> KeyReused:
        return KeyReused(f"Idempotency-Key {key!r} was used with another body; "
                         "send a new key for a new request (bbt sends the sha256 of the body)")
