"""An on-disk cache of evaluations: the same question to the same model is paid for once.

    cache = EvaluationCache("~/.cache/bbt/evaluations.sqlite")
    backend = CachedBackend(HTTPBackend(url), cache)
    answer, cached = backend.evaluate_cached(request)   # cached: True when no query was paid

An entry is keyed by the sha256 of the model's identity (its `ModelInfo`: name, sizes and the
scales measured on it, so a different model served under the same name misses) and the whole
request as protocol JSON (task, inputs, labels, loss, candidate bytes). Only answers are stored,
never anything that is executed. An answer may carry a *payer* tag (a run and its request step,
`Ledger.payer`): a run killed after the answer was stored but before its ledger line was written
finds its own tag when resumed, and books the request as paid instead of as a free hit.

The store is SQLite in WAL mode: several runs (threads or processes) may share one file, and a
process killed mid-write leaves the last committed entries intact (SQLite's journal rolls back a
torn transaction), so a crash never corrupts the cache.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from pathlib import Path

from bbt.backends.base import Backend
from bbt.errors import ConfigError
from bbt.protocol import EvaluateRequest, EvaluateResponse, ModelInfo, StatsRequest, StatsResponse

CACHE_ENV = "BBT_CACHE"  # a path, or "off"
_SCHEMA = "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, kind TEXT NOT NULL, body BLOB NOT NULL, payer TEXT)"


def default_cache_path() -> Path | None:
    """$BBT_CACHE, else ~/.cache/bbt/evaluations.sqlite (under $XDG_CACHE_HOME if set); None when BBT_CACHE=off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("off", "none", "0", "") else Path(value).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "bbt" / "evaluations.sqlite"


def with_cache(backend: Backend, path: str | Path | None = None, *, enabled: bool = True, warn=None) -> Backend:
    """`backend` behind the evaluation cache at `path` (None: `default_cache_path()`), or `backend`
    itself when `enabled` is False or $BBT_CACHE is off. A cache the user named (`path` or
    $BBT_CACHE) must open; the default one may not (a read-only home): then the run goes on
    without it, and `warn` (a callable taking one line) says so."""
    if not enabled:
        return backend
    named = path is not None or os.environ.get(CACHE_ENV) is not None
    path = Path(path) if path is not None else default_cache_path()
    if path is None:
        return backend
    try:
        return CachedBackend(backend, EvaluationCache(path))
    except ConfigError as exc:
        if named:
            raise
        if warn is not None:
            warn(f"{exc}; going on without a cache")
        return backend


class EvaluationCache:
    """Answers by key in one SQLite file; safe to share between threads, processes and runs."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer
            self._db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes; cheap commits
            self._db.execute(_SCHEMA)
            _add_payer_column(self._db)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the evaluation cache {self.path}: {exc} "
                              f"(pass --cache PATH elsewhere, or --no-cache)") from None
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        entry = self.entry(key)
        return None if entry is None else entry[0]

    def entry(self, key: str) -> tuple[bytes, str] | None:
        """The stored body and the tag of whoever paid for it ("" when untagged), or None."""
        with self._lock:
            row = self._db.execute("SELECT body, payer FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else (row[0], row[1] or "")

    def put(self, key: str, kind: str, body: bytes, payer: str | None = None) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO answers (key, kind, body, payer) VALUES (?, ?, ?, ?)",
                             (key, kind, body, payer))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _add_payer_column(db: sqlite3.Connection) -> None:
    """Caches written before payer tags existed gain the column; their old answers stay untagged."""
    if "payer" in {row[1] for row in db.execute("PRAGMA table_info(answers)")}:
        return
    try:
        db.execute("ALTER TABLE answers ADD COLUMN payer TEXT")
    except sqlite3.OperationalError as exc:
        if "duplicate column" not in str(exc):  # another process added it first
            raise


def request_key(kind: str, info: ModelInfo, request: EvaluateRequest | StatsRequest) -> str:
    """sha256 of what decides an answer: the kind of call, the model's identity and the request."""
    h = hashlib.sha256()
    # candidates.layer only tells the server where the candidates start to differ: same answer either way
    body = request.model_dump_json(exclude={"candidates": {"layer"}} if getattr(request, "candidates", None) else None)
    # the engine and the precision join the identity only where they are not bbt's own engine in
    # float32, so caches written before either existed still answer; a float32 answer never serves
    # a bfloat16 question or the other way round
    left_out = {name for name, default in (("engine", "bbt"), ("dtype", "float32")) if getattr(info, name) == default}
    identity = info.model_dump_json(exclude=left_out or None)
    for part in (kind, identity, body):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


class CachedBackend:
    """A Backend that answers from an `EvaluationCache` when it can and asks `backend` otherwise.

    `hits` and `misses` count evaluate calls since creation. Stats answers are cached too (they
    cost tokens on a billed server), model info is not (it is free and tells the cache which
    model it is talking to).
    """

    def __init__(self, backend: Backend, cache: EvaluationCache):
        self.backend, self.cache = backend, cache
        self._info: dict[str, ModelInfo] = {}
        self.hits = self.misses = 0

    def model_info(self, model: str) -> ModelInfo:
        if model not in self._info:
            self._info[model] = self.backend.model_info(model)
        return self._info[model]

    def stats(self, request: StatsRequest) -> StatsResponse:
        key = request_key("stats", self.model_info(request.model), request)
        body = self.cache.get(key)
        if body is not None:
            return StatsResponse.model_validate_json(body)
        answer = self.backend.stats(request)
        self.cache.put(key, "stats", answer.model_dump_json().encode())
        return answer

    def evaluate_cached(self, request: EvaluateRequest) -> tuple[EvaluateResponse, bool]:
        """The answer, and whether it came from the cache (then no query was paid for)."""
        answer, paid_by = self.evaluate_tagged(request)
        return answer, paid_by is not None

    def evaluate_tagged(self, request: EvaluateRequest, payer: str | None = None) -> tuple[EvaluateResponse, str | None]:
        """The answer, and None when the server was paid for it now, else the payer tag stored with
        it ("" when untagged). A newly paid answer is stored under `payer`."""
        key = request_key("evaluate", self.model_info(request.model), request)
        entry = self.cache.entry(key)
        if entry is not None:
            self.hits += 1
            return EvaluateResponse.model_validate_json(entry[0]), entry[1]
        self.misses += 1
        answer = self.backend.evaluate(request)
        self.cache.put(key, "evaluate", answer.model_dump_json().encode(), payer)
        return answer, None

    def evaluate(self, request: EvaluateRequest) -> EvaluateResponse:
        return self.evaluate_cached(request)[0]

    def close(self) -> None:
        self.backend.close()
        self.cache.close()

    def __enter__(self) -> CachedBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
