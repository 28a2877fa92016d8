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
(least recently used go first). Kept in memory: a restarted server forgets them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

KEY_PATTERN = r"^[A-Za-z0-9_.:\-]{1,128}$"
REPLAYED_HEADER = "Idempotent-Replayed"


class KeyReused(Exception):
    """The same Idempotency-Key with another body: 422 idempotency_key_reused."""


@dataclass
class _Entry:
    body_hash: str
    created: float
    answer: bytes | None = None  # None while the first request is being served
    done: threading.Event = field(default_factory=threading.Event)


class IdempotencyStore:
    """Answers of recent keyed requests, by (account, key). Thread-safe."""

    def __init__(self, *, max_entries: int = 2048, ttl: float = 86400.0, max_bytes: int = 256 * 2**20,
                 clock: Callable[[], float] = time.monotonic):
        self.max_entries, self.ttl, self.max_bytes = max_entries, ttl, max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._bytes = 0

    def begin(self, account: str, key: str, body_hash: str) -> bytes | None:
        """The stored answer to replay, or None: the caller now owns the key and must call `finish`.

        Waits while another request with this key is in flight. Raises KeyReused when the key was
        used with another body.
        """
        while True:
            with self._lock:
                self._expire()
                entry = self._entries.get((account, key))
                if entry is None:
                    self._entries[(account, key)] = _Entry(body_hash, self._clock())
                    return None
                if entry.body_hash != body_hash:
                    raise KeyReused(f"Idempotency-Key {key!r} was used with another body; "
                                    "send a new key for a new request (bbt sends the sha256 of the body)")
                if entry.answer is not None:
                    self._entries.move_to_end((account, key))
                    return entry.answer
                done = entry.done
            done.wait()  # the first request's owner always calls finish (routes do so in `finally`)

    def finish(self, account: str, key: str, answer: bytes | None) -> None:
        """End the request that owns `key`: store its 200 answer, or (None) forget the key; wake waiters."""
        with self._lock:
            entry = self._entries.get((account, key))
            if entry is None or entry.answer is not None:
                return
            if answer is None:
                del self._entries[(account, key)]
            else:
                entry.answer = answer
                self._bytes += len(answer)
                self._entries.move_to_end((account, key))
                self._evict()
        entry.done.set()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _expire(self) -> None:
        """Drop stored answers older than ttl (oldest first; entries are in least-recently-used order)."""
        cutoff = self._clock() - self.ttl
        for k in [k for k, e in self._entries.items() if e.answer is not None and e.created < cutoff]:
            self._drop(k)

    def _evict(self) -> None:
        """Drop the least recently used stored answers until within bounds; in-flight entries stay."""
        for k in [k for k, e in self._entries.items() if e.answer is not None]:
            if len(self._entries) <= self.max_entries and self._bytes <= self.max_bytes:
                break
            self._drop(k)

    def _drop(self, k: tuple[str, str]) -> None:
        entry = self._entries.pop(k)
        self._bytes -= len(entry.answer or b"")
