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

Both are in-memory and per process: a restart forgets them. Thread-safe (routes run in a threadpool).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

from bbt.errors import ConfigError


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
        clock: monotonic seconds (tests pass a fake one).
    Raises ConfigError naming the `bbt serve` flag of a bad value.
    """

    def __init__(self, *, quota: int | None = None, window: float = 86400.0, rate: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if quota is not None and (isinstance(quota, bool) or not isinstance(quota, int) or quota < 1):
            raise ConfigError(f"--quota must be a whole number of queries, at least 1 (got {quota})")
        if not (isinstance(window, (int, float)) and math.isfinite(window) and window > 0):
            raise ConfigError(f"--quota-window must be a positive number of seconds (got {window})")
        if rate is not None and not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
            raise ConfigError(f"--rate-limit must be a positive number of requests per second (got {rate})")
        self.quota, self.window, self.rate = quota, float(window), rate
        self.burst = max(1, math.ceil(rate)) if rate else 0
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, list[float]] = {}  # account -> [window start, charged, reserved]
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
            win = self._window(account, now)
            start, charged, reserved = win
            if charged + reserved + queries <= self.quota:
                win[2] += queries
                return
        resets = max(1, math.ceil(start + self.window - now))
        at = datetime.fromtimestamp(time.time() + resets, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        in_flight = f" (+{int(reserved)} in requests being scored)" if reserved else ""
        too_big = f", more than the whole quota: send at most {self.quota} candidates a request" if queries > self.quota else ""
        raise QuotaExhausted(
            f"this API key has used {int(charged)}{in_flight} of its {self.quota} queries in this {self.window:g} s window; "
            f"this request asks for {queries}{too_big}; the quota resets in {resets} s (at {at})", resets)

    def settle(self, account: str, reserved: int, charged: int) -> None:
        """End a reservation of `reserved` queries, charging `charged` (0 for a request that failed)."""
        if self.quota is None or (reserved <= 0 and charged <= 0):
            return
        with self._lock:
            win = self._window(account, self._clock())
            win[2] = max(0.0, win[2] - max(reserved, 0))
            win[1] += charged

    def used(self, account: str) -> int:
        """Queries charged to `account` in its current window."""
        with self._lock:
            win = self._windows.get(account)
            return 0 if win is None or self._clock() >= win[0] + self.window else int(win[1])

    def _window(self, account: str, now: float) -> list[float]:
        """The account's current window, opened now when it has none or the last one is over.

        Reservations still in flight move to the new window (where they will be charged), so
        that none is lost and the new window never overshoots.
        """
        win = self._windows.get(account)
        if win is None or now >= win[0] + self.window:
            win = self._windows[account] = [now, 0.0, win[2] if win else 0.0]
        return win
