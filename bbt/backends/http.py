"""HTTP backend: queries a bbt server (protocol v1) with httpx. Imports no torch.

    backend = HTTPBackend(["http://gpu-a:8000", "http://gpu-b:8000"], api_key="...")
    backend.evaluate(request)   # K candidates split in contiguous parts, one per endpoint, sent at once

Failures are turned into bbt errors at this boundary:

- connection errors, timeouts, 5xx and 429 are retried, waiting a random time in
  [0, min(max_backoff, backoff * 2**attempt)] seconds ("full jitter"), or what the server's
  Retry-After says, for up to `wait` seconds (and `retries` attempts, if set): long enough by
  default to ride out a server restart. Each wait is logged (logger "bbt.backends.http", WARNING) in one
  short line (an HTML error page by its title, never its body). Then `ServerUnavailable` names the
  URL and the last error.
- an endpoint that has not yet answered as a bbt server would (its connection refused, or a page
  that is not bbt's JSON) gets `first_contact_wait` seconds (10) instead: a wrong address is a
  configuration problem, not an outage, and fails fast with one message. Retries of a refused
  first connection are not logged. Once it has answered, it gets the whole `wait`; a resumed run
  passes `first_contact_wait=None` for the server its run folder says answered before.
- a 429 whose Retry-After is longer than the wait left (a spent quota) fails at once:
  `QuotaExhausted`, with the server's detail.
- any other 4xx is the request's fault and is not retried: `RequestRejected(status, detail)`, or
  `AuthError` for 401/403, with the server's own explanation.

Every POST carries `Idempotency-Key: sha256 of its body`. A retried request, or the same request
sent again by a resumed run, has the same key, and the bundled server answers it from its store
without scoring or billing it a second time.

The jitter draws from a private `random.Random`, so retries never touch the random streams that
decide a run: the same seed gives the same result whether or not a request had to be retried.

Limits of what a client can know: a server without idempotency keys may have scored (and
billed) a request that timed out, and then bills its retry again; the run's ledger books
answered requests only. With several endpoints, a part that fails through all its retries fails
the whole population; the parts that were answered are lost with it.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import logging
import os
import random
import re
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from pydantic import BaseModel, ValidationError

from bbt.version import __version__
from bbt.errors import AuthError, BackendError, ConfigError, QuotaExhausted, RequestRejected, ServerUnavailable
from bbt.protocol import (
    ErrorBody,
    EvaluateRequest,
    EvaluateResponse,
    ModelInfo,
    PromptTensor,
    StatsRequest,
    StatsResponse,
    Tensor,
    Usage,
)

log = logging.getLogger(__name__)

API_KEY_ENV = "BBT_API_KEY"
MAX_RETRY_AFTER = 600.0  # seconds: a longer Retry-After is taken as this (a guard against nonsense)
FIRST_CONTACT_WAIT = 10.0  # seconds of retries for an endpoint that has never answered as a bbt server
TIMEOUT = 120.0  # seconds to wait for one answer, unless told otherwise (the CLI's --timeout, bbt.remote)
WAIT = 300.0  # seconds of retries for a server that answered before and is now down (a restart)
_NP = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}


class HTTPBackend:
    """A Backend whose models live on one or more bbt servers.

    Args:
        endpoints: server base URLs ('http://host:8000'; a trailing '/v1' is accepted). With several,
            each population is split across them and the parts are sent concurrently; every
            endpoint must serve the same model.
        api_key: sent as 'Authorization: Bearer KEY'; None: the BBT_API_KEY environment variable.
        timeout: seconds to wait for one answer (connect, send, read each).
        wait: seconds to keep retrying a server that does not answer or fails (connection errors,
            timeouts, 5xx, 429), counted from the first failure of a request.
        first_contact_wait: seconds of retries, at most `wait`, for an endpoint that has not yet
            answered as a bbt server (refused connections, pages that are not bbt's JSON); None:
            `wait` (a server known to have answered before, as a resumed run's).
        retries: if set, also stop after this many retries of one request.
        backoff: seconds; the first retry waits up to this, each later one up to twice as long.
        max_backoff: seconds; cap of one wait (except when the server sends Retry-After).

    Attributes (traffic since creation, for benchmarks): `bytes_sent` (request bodies),
    `bytes_received` (response bodies), `attempts` (HTTP requests made, retries included).
    """

    def __init__(self, endpoints: list[str] | str, *, api_key: str | None = None, timeout: float = TIMEOUT,
                 wait: float = WAIT, retries: int | None = None, backoff: float = 0.5, max_backoff: float = 10.0,
                 first_contact_wait: float | None = FIRST_CONTACT_WAIT):
        urls = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not urls:
            raise ConfigError("no endpoint given: pass --endpoint http://HOST:PORT")
        if not timeout > 0:
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout}")
        if retries is not None and retries < 0:
            raise ConfigError(f"retries must be 0 or more, got {retries}")
        if not wait >= 0:
            raise ConfigError(f"wait must be 0 or more seconds, got {wait}")
        if backoff < 0 or max_backoff < 0:
            raise ConfigError(f"backoff and max_backoff must be >= 0 seconds, got {backoff} and {max_backoff}")
        if first_contact_wait is not None and not first_contact_wait >= 0:
            raise ConfigError(f"first_contact_wait must be 0 or more seconds, got {first_contact_wait}")
        self.endpoints = [base_url(u) for u in urls]
        self.wait, self.retries, self.backoff, self.max_backoff = wait, retries, backoff, max_backoff
        self.first_contact_wait = wait if first_contact_wait is None else min(wait, first_contact_wait)
        self._answered = [first_contact_wait is None] * len(urls)  # per endpoint: has it answered as bbt's?
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        headers = {"User-Agent": f"bbt/{__version__}", "Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # one pooled client per endpoint: keep-alive connections are reused across requests
        self._clients = [httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(timeout))
                         for url in self.endpoints]
        self._pool = ThreadPoolExecutor(len(urls), thread_name_prefix="bbt-http") if len(urls) > 1 else None
        self._jitter = random.Random()  # private: retries never move the run's own random streams
        self._count = threading.Lock()  # the counters below are updated from the endpoint threads
        self.bytes_sent = self.bytes_received = self.attempts = 0

    def __repr__(self) -> str:
        return f"HTTPBackend({self.endpoints!r}, wait={self.wait}, retries={self.retries})"

    # ---- the Backend protocol ---------------------------------------------------------------
    def model_info(self, model: str) -> ModelInfo:
        """The model's info; with several endpoints, all must describe it the same way."""
        path = f"/v1/models/{urllib.parse.quote(model, safe='')}"  # a model served under a path name has '/'
        infos = self._each(lambda i: self.call(i, "GET", path, None, ModelInfo), range(len(self._clients)))
        for url, info in zip(self.endpoints[1:], infos[1:]):
            if info != infos[0]:
                raise ConfigError(f"{url} serves a different {model!r} than {self.endpoints[0]} "
                                  "(sizes or scales differ): split a population only across identical servers")
        return infos[0]

    def stats(self, request: StatsRequest) -> StatsResponse:
        return self.call(0, "POST", "/v1/stats", request.model_dump_json(), StatsResponse)

    def evaluate(self, request: EvaluateRequest) -> EvaluateResponse:
        """Score a population; K candidates are split in contiguous parts over the endpoints."""
        parts = _split(request, len(self._clients))
        answers = self._each(lambda i: self.call(i, "POST", "/v1/evaluate", parts[i].model_dump_json(), EvaluateResponse),
                             range(len(parts)))
        return answers[0] if len(answers) == 1 else _merge(answers)

    def close(self) -> None:
        for client in self._clients:
            client.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def __enter__(self) -> HTTPBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- one request, with retries ----------------------------------------------------------
    def _each(self, fn, indices) -> list:
        """fn(i) for each endpoint index, concurrently when there are several; results in order."""
        indices = list(indices)
        if len(indices) == 1 or self._pool is None:
            return [fn(i) for i in indices]
        return list(self._pool.map(fn, indices))  # re-raises the first failure, in order

    def call(self, i: int, method: str, path: str, body: str | None, answer: type[BaseModel]):
        """One request to endpoint i, retried on transient failures; the answer parsed as `answer`
        (a pydantic model: bbt's protocol, or another engine's wire format, `servers.upstream`)."""
        client, url = self._clients[i], self.endpoints[i] + path
        content = None if body is None else body.encode()
        headers = None if content is None else {"Idempotency-Key": hashlib.sha256(content).hexdigest()}
        first_failure, attempt = None, 0
        while True:
            with self._count:
                self.attempts += 1
                self.bytes_sent += 0 if content is None else len(content)
            retry_after, refused = None, False
            try:
                resp = client.request(method, path, content=content, headers=headers)
            except httpx.TimeoutException as exc:
                last = f"no answer within the timeout ({type(exc).__name__})"
            except httpx.TransportError as exc:
                last, refused = f"{type(exc).__name__}: {exc}", isinstance(exc, httpx.ConnectError)
            else:
                with self._count:
                    self.bytes_received += len(resp.content)
                if resp.status_code == 200 or _error_body(resp) is not None:
                    self._answered[i] = True  # a bbt server (or an engine speaking JSON) is there
                if resp.status_code == 200:
                    try:
                        return answer.model_validate_json(resp.content)
                    except ValidationError as exc:
                        err = exc.errors()[0]
                        raise BackendError(f"{url} answered 200 with something that is not a "
                                           f"{answer.__name__}: {err['msg']} at {err['loc']}") from exc
                detail = _detail(resp)
                if resp.status_code in (401, 403):
                    hint = "" if "--api-key" in detail else f"; pass --api-key KEY or set {API_KEY_ENV}"
                    raise AuthError(resp.status_code, f"{detail} [{url}{hint}]")
                if resp.status_code != 429 and resp.status_code < 500:
                    raise RequestRejected(resp.status_code, f"{detail} [{method} {url}]")
                last, retry_after = f"{resp.status_code} {detail}", _retry_after(resp)
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            waited = now - first_failure
            pause = self._pause(attempt, retry_after)
            known = self._answered[i]
            limit = self.wait if known else self.first_contact_wait
            if retry_after is not None and resp.status_code == 429 and retry_after > self.wait - waited:
                raise QuotaExhausted(429, f"{detail} [{url}: Retry-After {retry_after:g} s is longer than the "
                                          f"{max(0.0, self.wait - waited):.0f} s left to wait (--wait)]")
            if waited + pause > limit or (self.retries is not None and attempt >= self.retries):
                raise ServerUnavailable(_gave_up(url, self.endpoints[i], last, attempt + 1, waited, known, refused))
            log.log(logging.DEBUG if refused and not known else logging.WARNING,
                    "waiting for %s: %s; retry %d in %.1f s (%.0f s of at most %.0f s waited)",
                    url, last, attempt + 1, pause, waited, limit)
            time.sleep(pause)
            attempt += 1

    def _pause(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before the next attempt: the server's Retry-After, else full jitter."""
        if retry_after is not None:
            return min(retry_after, MAX_RETRY_AFTER)
        return self._jitter.uniform(0, min(self.max_backoff, self.backoff * 2**attempt))


# ---- splitting a population across endpoints ------------------------------------------------

def base_url(url: str) -> str:
    """`url` without a trailing slash or /v1: the root the client's paths are joined to."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"endpoint {url!r} is not an http(s) URL: write it as http://HOST:PORT")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _split(request: EvaluateRequest, n_endpoints: int) -> list[EvaluateRequest]:
    """The request cut along K into at most `n_endpoints` contiguous parts (sizes differ by <= 1)."""
    c = request.candidates
    if c is None or n_endpoints == 1:
        return [request]  # the zero-prompt model is one query: one endpoint
    tensor = c.prompts if isinstance(c, PromptTensor) else c.z
    k = tensor.shape[0]
    n = min(n_endpoints, k)
    if n == 1:
        return [request]
    bounds = np.cumsum([0] + [k // n + (1 if i < k % n else 0) for i in range(n)])
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        sliced = _slice(tensor, int(lo), int(hi))
        cand = c.model_copy(update={"prompts" if isinstance(c, PromptTensor) else "z": sliced})
        parts.append(request.model_copy(update={"candidates": cand}))
    return parts


def _raw(t: Tensor) -> np.ndarray:
    """The array in its own dtype (Tensor.to_numpy widens float16 to float32)."""
    return np.frombuffer(base64.b64decode(t.data), dtype=_NP[t.dtype]).reshape(t.shape)


def _slice(t: Tensor, lo: int, hi: int) -> Tensor:
    """Rows lo:hi of a tensor, in its own dtype and bytes (no round trip through float32)."""
    return Tensor.from_numpy(_raw(t)[lo:hi], dtype=t.dtype)


def _merge(answers: list[EvaluateResponse]) -> EvaluateResponse:
    """Parts' answers in order: losses and logits concatenated along K, usage summed."""
    losses = None
    if answers[0].losses is not None:
        losses = [x for a in answers for x in a.losses]
    logits = None
    if answers[0].logits is not None:
        t = answers[0].logits
        logits = Tensor.from_numpy(np.concatenate([_raw(a.logits) for a in answers]), dtype=t.dtype)  # (K, N, C)
    usage = Usage(
        queries=sum(a.usage.queries for a in answers),
        requests=sum(a.usage.requests for a in answers),  # one HTTP request per part
        examples=sum(a.usage.examples for a in answers),
        tokens=sum(a.usage.tokens for a in answers),
    )
    return EvaluateResponse(model=answers[0].model, losses=losses, logits=logits, usage=usage)


# ---- reading error answers --------------------------------------------------------------------

def _gave_up(url: str, base: str, last: str, attempts: int, waited: float, known: bool, refused: bool) -> str:
    """The one message of a request to `url` (on endpoint `base`) that failed through its retries;
    for an endpoint that never answered, what to check (the address), not how long it could have
    been waited for."""
    tried = f"{attempts} attempt{'s' * (attempts != 1)} over {waited:.0f} s"
    if known:
        return f"{url} did not answer after {tried}; last error: {last}"
    if refused:
        return (f"nothing answers at {base} ({last}; {tried}): check the address and that the server is running "
                "(bbt serve prints its URL when it is ready)")
    return (f"{base} does not answer as a bbt server ({last}; {tried}): check that this is the address of a bbt "
            "server (bbt serve) or of a vLLM server")


def _error_body(resp: httpx.Response) -> str | None:
    """The detail of an error body in bbt's JSON (or an OpenAI-style engine's); None for anything else."""
    try:
        body = ErrorBody.model_validate_json(resp.content)
        return f"{body.error}: {body.detail}"
    except ValidationError:
        pass
    try:  # OpenAI-style engines (vLLM): {"error": {"message": ..., "type": ...}}
        error = resp.json().get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return f"{error.get('type') or 'error'}: {error['message'][:1000]}"
    except (ValueError, AttributeError):
        pass
    return None


def _detail(resp: httpx.Response) -> str:
    """The server's ErrorBody detail, or one short line about whatever else it sent."""
    found = _error_body(resp)
    if found is not None:
        return found
    text = _excerpt(resp)
    hint = " (is this URL a bbt server?)" if resp.status_code == 404 or text.startswith("an HTML page") else ""
    return f"{resp.reason_phrase or 'error'}{': ' + text if text else ''}{hint}"


_EXCERPT = 120  # characters of a body that is not bbt's JSON, in a message
_HEADING = re.compile(r"<(title|h1)[^>]*>(.*?)</\1\s*>", re.IGNORECASE | re.DOTALL)


def _excerpt(resp: httpx.Response) -> str:
    """A body that is not bbt's JSON in a few words: an HTML page by its title (or first heading),
    anything else by its first `_EXCERPT` characters on one line."""
    text = resp.text.strip()
    if "html" in resp.headers.get("content-type", "") or text[:1] == "<":
        found = _HEADING.search(text)
        heading = " ".join(re.sub(r"<[^>]+>", " ", found.group(2)).split()) if found else ""
        return "an HTML page" + (f" titled {_cut(heading)!r}" if heading else "")
    return _cut(" ".join(text.split()))


def _cut(text: str) -> str:
    return text if len(text) <= _EXCERPT else text[: _EXCERPT - 3] + "..."


def _retry_after(resp: httpx.Response) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date; None when absent or unreadable."""
    value = resp.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
