"""Per-account query quotas and request rate limits (``bbt serve --quota/--quota-window/--rate-limit``).

Accounts are the ids `servers.auth` puts on ``request.state.account`` (one per API key; every
request shares ``anonymous`` on a server without keys).

- Quota: at most `quota` queries (candidates scored) per account per window of `window` seconds.
  A window opens with the account's first evaluate and closes `window` seconds later. An evaluate
  *reserves* its K queries before any model work; a request that would cross the quota is refused
  whole (429 ``quota_exhausted``, Retry-After: seconds to the reset). A reservation becomes a
  charge only when the request is answered 200; any failure releases it, so a refused or failed
  request costs nothing. Reserving (not just checking) keeps concurrent requests from jointly
  overshooting the quota.
- Rate: a token bucket per account, `rate` tokens a second, holding at most max(1, ceil(rate));
  every keyed request but the health check takes one (429 ``rate_limited``, Retry-After: whole
  seconds until a token is free).

Quota windows (their start and what was charged) live in the server's state database
(`servers.state`, `bbt serve --state FILE`): with a file, a restarted server goes on counting where
it stopped. Reservations of requests in flight and the rate buckets live in memory. Thread-safe
(routes run in a threadpool).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import datetime, timezone

from bbt.errors import ConfigError
from servers.state import ServerState


class QuotaExhausted(Exception):
    """An evaluate that would cross its account's quota: 429 quota_exhausted with Retry-After."""

    def __init__(self, detail: str, retry_after: int):
        super().__init__(detail)
        self.retry_after = retry_after


class RateLimited(Exception):
    """A request over its account's rate: 429 rate_limited with Retry-After."""

    def __init__(self, detail: str, retry_after: int):
        super().__init__(detail)
        self.retry_after = retry_after


class Quotas:
    """Quota windows and token buckets of every account seen.

    Args:
        quota: queries per account per window; None: no quota.
        window: seconds a quota window lasts.
        rate: requests per second per account; None: no rate limit.
        state: where the windows are kept (None: a database in memory, forgotten on restart).
        clock: seconds since the epoch: windows outlive the process (tests pass a fake clock).
    Raises ConfigError naming the `bbt serve` flag of a bad value.
    """

    def __init__(self, *, quota: int | None = None, window: float = 86400.0, rate: float | None = None,
                 state: ServerState | None = None, clock: Callable[[], float] = time.time):
        if quota is not None and (isinstance(quota, bool) or not isinstance(quota, int) or quota < 1):
            raise ConfigError(f"--quota must be a whole number of queries, at least 1 (got {quota})")
        if not (isinstance(window, (int, float)) and math.isfinite(window) and window > 0):
            raise ConfigError(f"--quota-window must be a positive number of seconds (got {window})")
        if rate is not None and not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
            raise ConfigError(f"--rate-limit must be a positive number of requests per second (got {rate})")
        self.quota, self.window, self.rate = quota, float(window), rate
        self.burst = max(1, math.ceil(rate)) if rate else 0
        self._clock = clock
        self.state = state or ServerState()
        self._lock = self.state.lock  # one lock with the database, so that a charge and its answer commit together
        self._reserved: dict[str, int] = {}  # account -> queries held by requests being scored
        self._buckets: dict[str, tuple[float, float]] = {}  # account -> (tokens, at)

    @property
    def active(self) -> bool:
        return self.quota is not None or self.rate is not None

    # ---- rate ---------------------------------------------------------------------------------
    def take_token(self, account: str) -> None:
        """One request of `account`; RateLimited when its bucket is empty."""
        if self.rate is None:
            return
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.get(account, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens >= 1:
                self._buckets[account] = (tokens - 1, now)
                return
            self._buckets[account] = (tokens, now)
        wait = (1 - tokens) / self.rate
        raise RateLimited(f"more than {self.rate:g} requests a second with this API key (bursts up to {self.burst}); "
                          f"the next one is allowed in {wait:.2f} s", max(1, math.ceil(wait)))

    # ---- quota --------------------------------------------------------------------------------
    def reserve(self, account: str, queries: int) -> None:
        """Hold `queries` of `account`'s quota for a request about to be scored; QuotaExhausted if they do not fit.

        Every reserve must be followed by exactly one `settle` (answered or not).
        """
        if self.quota is None or queries <= 0:
            return
        with self._lock:
            now = self._clock()
            start, charged = self._window(account, now)
            reserved = self._reserved.get(account, 0)
            if charged + reserved + queries <= self.quota:
                self._reserved[account] = reserved + queries
                return
        resets = max(1, math.ceil(start + self.window - now))
        at = datetime.fromtimestamp(time.time() + resets, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        in_flight = f" (+{int(reserved)} in requests being scored)" if reserved else ""
        too_big = f", more than the whole quota: send at most {self.quota} candidates a request" if queries > self.quota else ""
        raise QuotaExhausted(
            f"this API key has used {int(charged)}{in_flight} of its {self.quota} queries in this {self.window:g} s window; "
            f"this request asks for {queries}{too_big}; the quota resets in {resets} s (at {at})", resets)

    def settle(self, account: str, reserved: int, charged: int) -> None:
        """End a reservation of `reserved` queries, charging `charged` (0 for a request that failed);
        inside `state.transaction()` the charge commits with whatever else is written there."""
        if self.quota is None or (reserved <= 0 and charged <= 0):
            return
        with self._lock:
            self._window(account, self._clock())
            held = self._reserved.get(account, 0) - max(reserved, 0)
            if held > 0:
                self._reserved[account] = held
            else:
                self._reserved.pop(account, None)
            if charged > 0:
                self.state.execute("UPDATE quota_windows SET charged = charged + ? WHERE account = ?", (charged, account))

    def used(self, account: str) -> int:
        """Queries charged to `account` in its current window."""
        with self._lock:
            open_ = self._open_window(account, self._clock())
            return 0 if open_ is None else open_[1]

    def resets_in(self, account: str) -> float | None:
        """Seconds until `account`'s current window ends; None when it has none open."""
        with self._lock:
            now = self._clock()
            open_ = self._open_window(account, now)
            return None if open_ is None else open_[0] + self.window - now

    def _open_window(self, account: str, now: float) -> tuple[float, int] | None:
        """(start, charged) of the account's window if one is open at `now`, else None."""
        rows = self.state.execute("SELECT start, charged FROM quota_windows WHERE account = ?", (account,))
        return (rows[0][0], int(rows[0][1])) if rows and now < rows[0][0] + self.window else None

    def _window(self, account: str, now: float) -> tuple[float, int]:
        """(start, charged) of the account's current window, opened now when it has none or the
        last one is over. Reservations still in flight count against the new window (where they
        will be charged), so that none is lost and the new window never overshoots."""
        open_ = self._open_window(account, now)
        if open_ is not None:
            return open_
        self.state.execute("INSERT OR REPLACE INTO quota_windows (account, start, charged) VALUES (?, ?, 0)",
                           (account, now))
        return now, 0
