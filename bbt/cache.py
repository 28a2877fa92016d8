"""An on-disk cache of evaluations: the same question to the same model is paid for once.

    cache = EvaluationCache("~/.cache/bbt/evaluations.sqlite")
    backend = CachedBackend(HTTPBackend(url), cache)
    answer, cached = backend.evaluate_cached(request)   # cached: True when no query was paid

An entry is keyed by the sha256 of the model's identity (its `ModelInfo`: name, sizes and the
scales measured on it, so a different model served under the same name misses) and the whole
request as protocol JSON (task, inputs, labels, loss, candidate bytes). Only answers are stored,
never anything that is executed.

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
_SCHEMA = "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, kind TEXT NOT NULL, body BLOB NOT NULL)"


def default_cache_path() -> Path | None:
    """$BBT_CACHE, else ~/.cache/bbt/evaluations.sqlite (under $XDG_CACHE_HOME if set); None when BBT_CACHE=off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("off", "none", "0", "") else Path(value).expanduser()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "bbt" / "evaluations.sqlite"


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
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the evaluation cache {self.path}: {exc} "
                              f"(pass --cache PATH elsewhere, or --no-cache)") from None
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT body FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, kind: str, body: bytes) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO answers (key, kind, body) VALUES (?, ?, ?)", (key, kind, body))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def request_key(kind: str, info: ModelInfo, request: EvaluateRequest | StatsRequest) -> str:
    """sha256 of what decides an answer: the kind of call, the model's identity and the request."""
    h = hashlib.sha256()
    # candidates.layer only tells the server where the candidates start to differ: same answer either way
    body = request.model_dump_json(exclude={"candidates": {"layer"}} if getattr(request, "candidates", None) else None)
    for part in (kind, info.model_dump_json(), body):
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
        key = request_key("evaluate", self.model_info(request.model), request)
        body = self.cache.get(key)
        if body is not None:
            self.hits += 1
            return EvaluateResponse.model_validate_json(body), True
        self.misses += 1
        answer = self.backend.evaluate(request)
        self.cache.put(key, "evaluate", answer.model_dump_json().encode())
        return answer, False

    def evaluate(self, request: EvaluateRequest) -> EvaluateResponse:
        return self.evaluate_cached(request)[0]

    def close(self) -> None:
        self.backend.close()
        self.cache.close()

    def __enter__(self) -> CachedBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def evaluate(backend: Backend, request: EvaluateRequest) -> tuple[EvaluateResponse, bool]:
    """`backend.evaluate`, and whether the answer came from a cache (any backend works here)."""
    if isinstance(backend, CachedBackend):
        return backend.evaluate_cached(request)
    return backend.evaluate(request), False
