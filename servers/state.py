"""What a server must not forget on a restart: each key's quota window and the answers it gave.

    state = ServerState("/srv/bbt/state.sqlite")     # bbt serve --state FILE; None: in memory only
    with state.transaction():                        # a charge and its stored answer land together
        quotas.settle(account, reserved, charged)
        idempotency.finish(account, key, answer)

One SQLite file in WAL mode beside the server: a process killed (kill -9 included) keeps every
committed transaction, and an evaluate's quota charge and its idempotent answer are committed in
one transaction, so a retried request after a restart is either replayed (it was charged) or
scored afresh (it was not): never paid twice. What a restart may forget is in memory on purpose:
reservations of requests in flight (they were never answered, so never charged) and rate-limit
buckets (seconds of history).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bbt.errors import ConfigError

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS quota_windows (account TEXT PRIMARY KEY, start REAL NOT NULL, charged INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS answers (account TEXT NOT NULL, key TEXT NOT NULL, body_hash TEXT NOT NULL, "
    "created REAL NOT NULL, used INTEGER NOT NULL, answer BLOB NOT NULL, PRIMARY KEY (account, key))",
)


class ServerState:
    """One SQLite database (a file, or memory when `path` is None) shared by the quotas and the
    idempotency store of one server. Thread-safe: one connection behind a re-entrant lock."""

    def __init__(self, path: str | Path | None = None):
        self.path = None if path is None else Path(path).expanduser()
        try:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(":memory:" if self.path is None else self.path, timeout=30,
                                       check_same_thread=False, isolation_level=None)
            if self.path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a killed process loses nothing committed
            for statement in _SCHEMA:
                self._db.execute(statement)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"--state {path}: cannot open it as the server's state database ({exc}); "
                              "pass a writable file path") from None
        self.lock = threading.RLock()
        self._depth = 0

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything written inside commits at once, or not at all; nests (the outer one commits)."""
        with self.lock:
            if self._depth == 0:
                self._db.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield
            except BaseException:
                self._depth -= 1
                if self._depth == 0:
                    self._db.execute("ROLLBACK")
                raise
            self._depth -= 1
            if self._depth == 0:
                self._db.execute("COMMIT")

    def execute(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Run one statement (inside the current transaction, if any); its rows."""
        with self.lock:
            return self._db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self.lock:
            self._db.close()
